//! CSI Identity: name, version, capabilities, and a probe that asks the daemon (where this
//! process runs one: standalone and node plugins; a cluster controller is ready when it runs).

use std::sync::Arc;

use qsd_csi_proto::csi::{self, identity_server::Identity};
use qsd_node::engine::EngineCore;
use qsd_node::qmp::commands::QueryVersion;
use tonic::{Request, Response, Status};

/// The CSI driver name.
pub const PLUGIN_NAME: &str = "qsd.csi.dev";

/// The Identity service.
#[derive(Debug, Clone)]
pub struct IdentityService {
    engine: Option<Arc<EngineCore>>,
    controller: bool,
}

impl IdentityService {
    /// An identity service for a process with `engine` (if it runs one) that serves the
    /// Controller service or not.
    pub fn new(engine: Option<Arc<EngineCore>>, controller: bool) -> Self {
        IdentityService { engine, controller }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let manifest = self
            .engine
            .iter()
            .map(|e| {
                let qemu = e.daemon().version().qemu;
                ("qemu".to_owned(), format!("{}.{}.{}", qemu.major, qemu.minor, qemu.micro))
            })
            .collect();
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: PLUGIN_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest,
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![
            service(service::Type::VolumeAccessibilityConstraints),
            csi::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        if self.controller {
            capabilities.insert(0, service(service::Type::ControllerService));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the daemon answers on our monitor; not ready while it is being recovered.
        let ready = match &self.engine {
            Some(e) => e.daemon().qmp().call(&QueryVersion {}).await.is_ok(),
            None => true,
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
