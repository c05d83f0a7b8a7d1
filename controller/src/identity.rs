//! CSI Identity: name, version, capabilities, and a probe that asks the daemon.

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
    engine: Arc<EngineCore>,
}

impl IdentityService {
    /// An identity service for `engine`.
    pub fn new(engine: Arc<EngineCore>) -> Self {
        IdentityService { engine }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let qemu = self.engine.daemon().version().qemu;
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: PLUGIN_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: [(
                "qemu".to_owned(),
                format!("{}.{}.{}", qemu.major, qemu.minor, qemu.micro),
            )]
            .into(),
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
        let capabilities = vec![
            service(service::Type::ControllerService),
            service(service::Type::VolumeAccessibilityConstraints),
            csi::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the daemon answers on our monitor; not ready while it is being recovered.
        let ready = self.engine.daemon().qmp().call(&QueryVersion {}).await.is_ok();
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
