//! Standalone mode's growth of auto-expanding volumes: no orchestrator resizes them, so the
//! driver does what Kubernetes' resizer and kubelet would — ControllerExpandVolume, then
//! NodeExpandVolume on the staged volume — through the same CSI services it serves.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qsd_csi_controller::grow::{Grower, Grown};
use qsd_csi_controller::ControllerService;
use qsd_csi_model::grow::size;
use qsd_csi_proto::agent;
use qsd_csi_proto::csi::{self, controller_server::Controller, node_server::Node};
use qsd_node::csi::NodeService;
use tonic::{Code, Request, Status};

/// How long a growth waits for another operation on the volume (a stage) to end.
const BUSY_WAIT: Duration = Duration::from_secs(60);
const BUSY_RETRY: Duration = Duration::from_millis(100);

/// Grows volumes in place, through this process's Controller and Node services.
#[derive(Debug, Clone)]
pub struct InPlaceGrower {
    /// The Controller service (block_resize through the agent).
    pub controller: ControllerService,
    /// The Node service (device and filesystem).
    pub node: Arc<NodeService>,
}

/// Runs `call` until it is not ABORTED (the volume busy with another operation: a crossing
/// found while the volume is being staged arrives while that stage holds it), for at most
/// [`BUSY_WAIT`].
async fn when_free<T, F: Future<Output = Result<T, Status>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, Status> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match call().await {
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(BUSY_RETRY).await; // until the other operation ends
            }
            other => return other,
        }
    }
}

#[tonic::async_trait]
impl Grower for InPlaceGrower {
    async fn grow(&self, event: &agent::VolumeEvent, _from: u64, to: u64) -> Result<Grown, String> {
        let volume_id = event.volume_id.clone();
        let range = csi::CapacityRange { required_bytes: to as i64, limit_bytes: 0 };
        let expand = csi::ControllerExpandVolumeRequest {
            volume_id: volume_id.clone(),
            capacity_range: Some(range),
            ..Default::default()
        };
        let expanded =
            when_free(|| self.controller.controller_expand_volume(Request::new(expand.clone())))
                .await
                .map_err(|s| format!("ControllerExpandVolume: {}", s.message()))?
                .into_inner();
        let Some(path) = self.node.expansion_path(&volume_id) else {
            return Ok(Grown::Done(format!(
                "grown to {} (not staged here: its filesystem grows when it is next staged)",
                size(expanded.capacity_bytes as u64)
            )));
        };
        let request = csi::NodeExpandVolumeRequest {
            volume_id,
            volume_path: path.display().to_string(),
            capacity_range: Some(range),
            ..Default::default()
        };
        when_free(|| self.node.node_expand_volume(Request::new(request.clone())))
            .await
            .map_err(|s| format!("NodeExpandVolume: {}", s.message()))?;
        Ok(Grown::Done(format!(
            "grown here: its device (and filesystem, if it has one) now hold {}",
            size(expanded.capacity_bytes as u64)
        )))
    }
}
