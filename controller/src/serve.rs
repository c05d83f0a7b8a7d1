//! Serving a CSI router on its unix socket, with the gRPC health service beside it when asked,
//! both until one stop future resolves. Every mode (standalone, node, controller) serves this
//! way; readiness is Identity's.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use qsd_csi_proto::transport::{self, TransportError, HEALTH_PERIOD};
use tokio::sync::watch;

use crate::identity::IdentityService;

/// One stop for several servers and tasks: set once — by the caller's stop, or by the first
/// server to end — and seen by every waiter, late ones included.
#[derive(Debug, Clone)]
pub struct Latch(Arc<watch::Sender<bool>>);

impl Latch {
    /// Not set yet.
    pub fn new() -> Self {
        Latch(Arc::new(watch::channel(false).0))
    }

    /// Sets it; every waiter wakes.
    pub fn set(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once it is set.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut set = self.0.subscribe();
        async move {
            let _ = set.wait_for(|s| *s).await;
        }
    }

    /// Runs `work` and sets the latch when it ends: a server that stops stops the rest.
    pub async fn on_end<T>(&self, work: impl Future<Output = T>) -> T {
        let out = work.await;
        self.set();
        out
    }

    /// Sets the latch when `stop` resolves; returns once it is set, whoever set it.
    pub async fn follow(&self, stop: impl Future<Output = ()>) {
        tokio::select! {
            () = stop => self.set(),
            () = self.wait() => {}
        }
    }
}

impl Default for Latch {
    fn default() -> Self {
        Latch::new()
    }
}

/// `router` with the controller side of CSI over `agents`: Controller (`controller`),
/// GroupController and SnapshotMetadata.
pub fn controller_services(
    router: tonic::transport::server::Router,
    controller: crate::controller::ControllerService,
    agents: crate::agents::Agents,
) -> tonic::transport::server::Router {
    use qsd_csi_proto::csi::controller_server::ControllerServer;
    use qsd_csi_proto::csi::group_controller_server::GroupControllerServer;
    use qsd_csi_proto::csi::snapshot_metadata_server::SnapshotMetadataServer;
    use qsd_csi_proto::failures::logged;
    router
        .add_service(logged(ControllerServer::new(controller)))
        .add_service(logged(GroupControllerServer::new(crate::groups::GroupService::new(
            agents.clone(),
        ))))
        .add_service(logged(SnapshotMetadataServer::new(crate::metadata::MetadataService::new(
            agents,
        ))))
}

/// Serves `router` on the unix socket at `socket` (and, with `health`, the health service
/// there, SERVING while `identity` is ready) until `stop` resolves. The socket is removed
/// when serving ends.
pub async fn csi_and_health(
    socket: &Path,
    router: tonic::transport::server::Router,
    health: Option<SocketAddr>,
    identity: IdentityService,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::run::RunError> {
    let latch = Latch::new();
    let listener = transport::listen_unix(socket)?;
    tracing::info!(endpoint = %socket.display(), "serving CSI");
    let csi = async {
        let served = router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                latch.wait(),
            )
            .await
            .map_err(|source| TransportError::Server { what: "CSI server", source });
        let _ = std::fs::remove_file(socket);
        served
    };
    let health = async {
        let Some(addr) = health else { return Ok(()) };
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| TransportError::Io {
                op: "listen for health checks on",
                path: addr.to_string().into(),
                source,
            })?;
        let ready = move || {
            let identity = identity.clone();
            async move { identity.ready_within(HEALTH_PERIOD).await }
        };
        transport::serve_health(listener, ready, latch.wait()).await
    };
    // A server that fails ends the other too (health without an address ends at once, Ok).
    let (served, checked, ()) = tokio::join!(
        latch.on_end(csi),
        async {
            let r = health.await;
            if r.is_err() {
                latch.set();
            }
            r
        },
        latch.follow(stop),
    );
    served?;
    checked?;
    tracing::info!("stopped serving CSI");
    Ok(())
}
