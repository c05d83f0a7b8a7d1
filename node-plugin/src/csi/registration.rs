//! Registration with the kubelet: what node-driver-registrar does, served by the plugin itself.
//!
//! ```text
//!   kubelet plugin watcher ── finds <registration dir>/<driver>-reg.sock ──► GetInfo
//!        ◄── CSIPlugin, the driver's name, its CSI socket as the kubelet sees it, CSI 1.0.0
//!   kubelet ── NotifyRegistrationStatus (taken, or why not) ──► logged, and on `status()`
//!   kubelet ── NodeGetInfo etc. on the CSI socket (the Node service)
//! ```
//! The kubelet dials the socket again whenever it re-registers plugins (its restart), so the
//! socket stays for the life of the node plugin.

use std::path::{Path, PathBuf};

use qsd_csi_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use qsd_csi_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};

/// The CSI versions the kubelet may speak to us.
pub const CSI_VERSIONS: &[&str] = &["1.0.0"];

/// Where the registration socket of `driver` goes in the kubelet's registration directory.
pub fn socket_path(dir: &Path, driver: &str) -> PathBuf {
    dir.join(format!("{driver}-reg.sock"))
}

/// The registration service for one driver.
#[derive(Debug, Clone)]
pub struct Registrar {
    info: PluginInfo,
    status: watch::Sender<Option<RegistrationStatus>>,
}

impl Registrar {
    /// Registers `driver`, whose CSI socket the kubelet reaches at `endpoint`.
    pub fn new(driver: &str, endpoint: &Path) -> Self {
        let info = PluginInfo {
            r#type: "CSIPlugin".into(),
            name: driver.into(),
            endpoint: endpoint.display().to_string(),
            supported_versions: CSI_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
        };
        Registrar { info, status: watch::channel(None).0 }
    }

    /// What the kubelet last said of the registration (`None` until it says).
    pub fn status(&self) -> watch::Receiver<Option<RegistrationStatus>> {
        self.status.subscribe()
    }

    /// Serves the registration socket in `dir` until `shutdown`, then removes it.
    pub async fn serve(
        self,
        dir: &Path,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let socket = socket_path(dir, &self.info.name);
        let listener = crate::grpc::listen_unix(&socket)?;
        tracing::info!(socket = %socket.display(), endpoint = self.info.endpoint, "waiting for the kubelet to register the driver");
        let served = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(self))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                shutdown,
            )
            .await
            .map_err(|e| Error::Transport(format!("registration server: {e}")));
        let _ = std::fs::remove_file(&socket);
        served
    }
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = self.info.name, "the kubelet registered the driver");
        } else {
            tracing::error!(
                driver = self.info.name,
                error = status.error,
                "the kubelet refused the driver"
            );
        }
        self.status.send_replace(Some(status));
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
