//! CSI Identity: name, version, capabilities, and readiness from a [`Probe`] the composition
//! hands over (standalone and node plugins: the daemon answers; a cluster controller is ready
//! when it runs).

use std::collections::HashMap;
use std::sync::Arc;

use qsd_csi_proto::csi::{self, identity_server::Identity};
use tonic::{Request, Response, Status};

/// What Identity asks of the process it describes.
#[tonic::async_trait]
pub trait Probe: Send + Sync {
    /// Whether the process can serve now (CSI `Probe`; the gRPC health service).
    async fn ready(&self) -> bool;

    /// Versions of what it runs on, for `GetPluginInfo`'s manifest (e.g. `qemu`).
    fn manifest(&self) -> HashMap<String, String> {
        HashMap::new()
    }
}

/// A process with nothing to wait for: always ready.
#[derive(Debug, Clone, Copy)]
pub struct AlwaysReady;

#[tonic::async_trait]
impl Probe for AlwaysReady {
    async fn ready(&self) -> bool {
        true
    }
}

/// The CSI driver name.
pub const PLUGIN_NAME: &str = "qsd.csi.dev";

/// The Identity service.
#[derive(Clone)]
pub struct IdentityService {
    probe: Arc<dyn Probe>,
    controller: bool,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService").field("controller", &self.controller).finish()
    }
}

impl IdentityService {
    /// An identity service whose readiness is `probe`'s, for a process that serves the
    /// Controller service or not.
    pub fn new(probe: Arc<dyn Probe>, controller: bool) -> Self {
        IdentityService { probe, controller }
    }

    /// Whether the process is ready, given at most `within` to say (a hung daemon is not).
    pub async fn ready_within(&self, within: std::time::Duration) -> bool {
        tokio::time::timeout(within, self.probe.ready()).await.unwrap_or(false)
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let manifest = self.probe.manifest();
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
            capabilities.splice(
                0..0,
                [
                    service::Type::ControllerService,
                    service::Type::GroupControllerService,
                    service::Type::SnapshotMetadataService,
                    service::Type::SnapshotAccessibilityConstraints,
                ]
                .map(service),
            );
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(self.probe.ready().await) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Switch(AtomicBool);

    #[tonic::async_trait]
    impl Probe for Switch {
        async fn ready(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
        fn manifest(&self) -> HashMap<String, String> {
            [("qemu".to_owned(), "11.1.3".to_owned())].into()
        }
    }

    struct Hung;

    #[tonic::async_trait]
    impl Probe for Hung {
        async fn ready(&self) -> bool {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn readiness_and_manifest_come_from_the_probe_handed_over() {
        let probe = Arc::new(Switch::default());
        let identity = IdentityService::new(probe.clone(), false);
        let ask = || identity.probe(Request::new(csi::ProbeRequest {}));
        assert_eq!(ask().await.expect("probe").into_inner().ready, Some(false));
        probe.0.store(true, Ordering::SeqCst);
        assert_eq!(ask().await.expect("probe").into_inner().ready, Some(true));
        let info = identity.get_plugin_info(Request::new(Default::default())).await;
        let info = info.expect("info").into_inner();
        assert_eq!(
            (info.name.as_str(), info.manifest.get("qemu").map(String::as_str)),
            (PLUGIN_NAME, Some("11.1.3"))
        );
        let caps = identity.get_plugin_capabilities(Request::new(Default::default())).await;
        let has_controller = caps.expect("caps").into_inner().capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s))
                if s.r#type == csi::plugin_capability::service::Type::ControllerService as i32)
        });
        assert!(!has_controller, "a node plugin does not advertise the Controller service");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_is_not_ready() {
        let identity = IdentityService::new(Arc::new(Hung), true);
        assert!(!identity.ready_within(std::time::Duration::from_secs(5)).await);
        assert!(
            IdentityService::new(Arc::new(AlwaysReady), true)
                .ready_within(std::time::Duration::from_secs(5))
                .await
        );
    }
}
