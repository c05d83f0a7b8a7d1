//! The node agent: `agent.proto` served over the engine.
//!
//! ```text
//!   controller ── Agent gRPC ──► AgentService ──► Engine (the same calls the CSI layer makes)
//! ```
//! Each request is turned into the engine's typed request; errors leave through the same
//! status mapping as the CSI services. Transport security (mutual TLS) is the caller's
//! `Server` configuration, not this module's.

use std::sync::Arc;

use qsd_csi_proto::agent::{self, agent_server::Agent};
use tonic::{Request, Response, Status};

use crate::csi::status;
use crate::engine::{
    CloneMode, CreateVolume, EngineCore, EngineEvent, SnapshotInfo, VolumeInfo, VolumeSource,
};
use crate::graph::ExportKind;
use crate::qmp::commands::{Preallocation, ThrottleLimits};

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentService {
    engine: Arc<EngineCore>,
}

impl AgentService {
    /// An agent over `engine`.
    pub fn new(engine: Arc<EngineCore>) -> Self {
        AgentService { engine }
    }
}

fn qos(q: Option<agent::Qos>) -> ThrottleLimits {
    let q = q.unwrap_or_default();
    ThrottleLimits {
        iops_total: q.iops_total,
        iops_read: q.iops_read,
        iops_write: q.iops_write,
        bps_total: q.bps_total,
        bps_read: q.bps_read,
        bps_write: q.bps_write,
    }
}

fn volume(v: VolumeInfo) -> agent::Volume {
    let export = match v.export {
        None => agent::ExportKind::ExportNone,
        Some(ExportKind::Nbd) => agent::ExportKind::ExportNbd,
        Some(ExportKind::Fuse) => agent::ExportKind::ExportFuse,
        Some(ExportKind::VhostUserBlk) => agent::ExportKind::ExportVhostUserBlk,
    };
    agent::Volume {
        volume_id: v.id,
        size_bytes: v.size,
        chain_depth: v.chain_depth as u32,
        source: v.source.unwrap_or_default(),
        export: export as i32,
        labels: v.labels,
    }
}

fn snapshot(s: SnapshotInfo) -> agent::Snapshot {
    agent::Snapshot {
        snapshot_id: s.id,
        source_volume_id: s.source_volume_id,
        size_bytes: s.size,
        created_unix: s.created_unix,
    }
}

/// The engine's QoS limits as the agent's message (what a controller sends).
pub fn qos_message(q: &ThrottleLimits) -> agent::Qos {
    agent::Qos {
        iops_total: q.iops_total,
        iops_read: q.iops_read,
        iops_write: q.iops_write,
        bps_total: q.bps_total,
        bps_read: q.bps_read,
        bps_write: q.bps_write,
    }
}

/// The engine's request as the agent's `CreateVolumeRequest` (what a controller sends; the
/// inverse of what the agent decodes).
pub fn create_volume_message(c: &CreateVolume) -> agent::CreateVolumeRequest {
    use agent::create_volume_request::Source;
    agent::CreateVolumeRequest {
        pool: c.pool.clone(),
        name: c.name.clone(),
        size_bytes: c.size,
        preallocation: match c.preallocation {
            Preallocation::Off => agent::Preallocation::Off,
            Preallocation::Metadata => agent::Preallocation::Metadata,
            Preallocation::Falloc => agent::Preallocation::Falloc,
            Preallocation::Full => agent::Preallocation::Full,
        } as i32,
        qos: Some(qos_message(&c.qos)),
        max_chain_depth: c.max_chain_depth,
        source: c.source.as_ref().map(|s| match s {
            VolumeSource::Snapshot(id) => Source::SnapshotId(id.clone()),
            VolumeSource::Volume(id) => Source::VolumeId(id.clone()),
        }),
        clone_mode: match c.clone_mode {
            CloneMode::Copy => agent::CloneMode::Copy,
            CloneMode::Linked => agent::CloneMode::Linked,
        } as i32,
        labels: c.labels.clone(),
    }
}

/// `CreateVolumeRequest` → the engine's request.
fn create_request(r: agent::CreateVolumeRequest) -> Result<CreateVolume, Status> {
    use agent::create_volume_request::Source;
    let preallocation = match agent::Preallocation::try_from(r.preallocation) {
        Ok(agent::Preallocation::Off) => Preallocation::Off,
        Ok(agent::Preallocation::Metadata) => Preallocation::Metadata,
        Ok(agent::Preallocation::Falloc) => Preallocation::Falloc,
        Ok(agent::Preallocation::Full) => Preallocation::Full,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown preallocation {}",
                r.preallocation
            )))
        }
    };
    let clone_mode = match agent::CloneMode::try_from(r.clone_mode) {
        Ok(agent::CloneMode::Copy) => CloneMode::Copy,
        Ok(agent::CloneMode::Linked) => CloneMode::Linked,
        Err(_) => {
            return Err(Status::invalid_argument(format!("unknown clone mode {}", r.clone_mode)))
        }
    };
    Ok(CreateVolume {
        pool: r.pool,
        name: r.name,
        size: r.size_bytes,
        preallocation,
        qos: qos(r.qos),
        max_chain_depth: r.max_chain_depth,
        source: r.source.map(|s| match s {
            Source::SnapshotId(id) => VolumeSource::Snapshot(id),
            Source::VolumeId(id) => VolumeSource::Volume(id),
        }),
        clone_mode,
        labels: r.labels,
    })
}

/// The engine's event as the agent streams it; `None` for events that concern no volume.
pub fn volume_event(event: EngineEvent) -> Option<agent::VolumeEvent> {
    use agent::volume_event::Kind;
    let (volume_id, labels, kind) = match event {
        EngineEvent::WriteThresholdCrossed {
            volume,
            threshold,
            exceeded,
            missed,
            rearmed_at,
            size,
            labels,
        } => (
            volume,
            labels,
            Kind::WriteThresholdCrossed(agent::WriteThresholdCrossed {
                threshold_bytes: threshold,
                exceeded_bytes: exceeded,
                missed,
                rearmed_at_bytes: rearmed_at,
                size_bytes: size,
            }),
        ),
        EngineEvent::CloneProgress { volume, source, done, total, labels } => (
            volume,
            labels,
            Kind::CloneProgress(agent::CloneProgress {
                source_volume_id: source,
                done_bytes: done,
                total_bytes: total,
            }),
        ),
        EngineEvent::CloneFinished { volume, source, error, elapsed, labels } => (
            volume,
            labels,
            Kind::CloneFinished(agent::CloneFinished {
                source_volume_id: source,
                error: error.unwrap_or_default(),
                elapsed_millis: elapsed.as_millis().try_into().unwrap_or(u64::MAX),
            }),
        ),
        EngineEvent::Reconciled { .. } => return None,
    };
    Some(agent::VolumeEvent { volume_id, labels, kind: Some(kind) })
}

/// A stream of volume events, ending when the watcher hangs up.
pub type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<agent::VolumeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<agent::Empty>,
    ) -> Result<Response<EventStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let mut events = self.engine.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = tx.closed() => return,
                };
                match event {
                    Ok(event) => {
                        let Some(message) = volume_event(event) else { continue };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "an event watcher fell behind; events were dropped");
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn create_volume(
        &self,
        request: Request<agent::CreateVolumeRequest>,
    ) -> Result<Response<agent::Volume>, Status> {
        let command = create_request(request.into_inner())?;
        let info = self.engine.create_volume(&command).await.map_err(status)?;
        Ok(Response::new(volume(info)))
    }

    async fn delete_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::Empty>, Status> {
        self.engine.delete_volume(&request.into_inner().volume_id).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn get_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::Volume>, Status> {
        let info = self.engine.get_volume(&request.into_inner().volume_id).map_err(status)?;
        Ok(Response::new(volume(info)))
    }

    async fn locate_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::VolumeLocation>, Status> {
        let node = self.engine.attached_node(&request.into_inner().volume_id).map_err(status)?;
        Ok(Response::new(agent::VolumeLocation { attached_node: node.unwrap_or_default() }))
    }

    async fn locate_snapshot(
        &self,
        request: Request<agent::SnapshotRef>,
    ) -> Result<Response<agent::VolumeLocation>, Status> {
        let id = request.into_inner().snapshot_id;
        let node = self.engine.snapshot_source_node(&id).map_err(status)?;
        Ok(Response::new(agent::VolumeLocation { attached_node: node.unwrap_or_default() }))
    }

    async fn list_volumes(
        &self,
        _: Request<agent::Empty>,
    ) -> Result<Response<agent::VolumeList>, Status> {
        let volumes = self.engine.list_volumes().map_err(status)?.into_iter().map(volume).collect();
        Ok(Response::new(agent::VolumeList { volumes }))
    }

    async fn expand_volume(
        &self,
        request: Request<agent::ExpandVolumeRequest>,
    ) -> Result<Response<agent::Volume>, Status> {
        let r = request.into_inner();
        self.engine.expand_volume(&r.volume_id, r.size_bytes).await.map_err(status)?;
        let info = self.engine.get_volume(&r.volume_id).map_err(status)?;
        Ok(Response::new(volume(info)))
    }

    async fn modify_volume(
        &self,
        request: Request<agent::ModifyVolumeRequest>,
    ) -> Result<Response<agent::Empty>, Status> {
        let r = request.into_inner();
        self.engine.set_qos(&r.volume_id, qos(r.qos)).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn create_snapshots(
        &self,
        request: Request<agent::CreateSnapshotsRequest>,
    ) -> Result<Response<agent::SnapshotList>, Status> {
        let r = request.into_inner();
        if r.snapshots.is_empty() {
            return Err(Status::invalid_argument("no snapshots requested"));
        }
        let items: Vec<(&str, &str)> =
            r.snapshots.iter().map(|s| (s.volume_id.as_str(), s.name.as_str())).collect();
        let taken = self.engine.create_snapshot_group(&items).await.map_err(status)?;
        Ok(Response::new(agent::SnapshotList {
            snapshots: taken.into_iter().map(snapshot).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<agent::SnapshotRef>,
    ) -> Result<Response<agent::Empty>, Status> {
        self.engine.delete_snapshot(&request.into_inner().snapshot_id).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn list_snapshots(
        &self,
        _: Request<agent::Empty>,
    ) -> Result<Response<agent::SnapshotList>, Status> {
        let snapshots =
            self.engine.list_snapshots().map_err(status)?.into_iter().map(snapshot).collect();
        Ok(Response::new(agent::SnapshotList { snapshots }))
    }

    async fn get_capacity(
        &self,
        request: Request<agent::PoolRef>,
    ) -> Result<Response<agent::Capacity>, Status> {
        let pool = self.engine.pool(&request.into_inner().pool).map_err(status)?;
        let usage = crate::mount::usage(pool.root()).map_err(status)?;
        Ok(Response::new(agent::Capacity { available_bytes: usage.bytes_available }))
    }
}
