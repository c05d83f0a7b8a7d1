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
use qsd_csi_proto::convert;
use tonic::{Request, Response, Status};

use crate::csi::status;
use crate::engine::{
    CreateVolume, EngineCore, EngineEvent, SnapshotBatch, SnapshotInfo, VolumeInfo, VolumeSource,
    DEFAULT_BATCH,
};
use crate::graph::ExportKind;
use crate::pool::id::{IdKind, NodeName, ObjectId, ObjectName, PoolName};
use qsd_csi_proto::paging::page;
use tokio_stream::StreamExt;

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentService {
    engine: Arc<EngineCore>,
    /// Turns true once the server stops: the event watches end then (a graceful stop waits
    /// for every open stream, and the engine's events outlive the server).
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
}

impl AgentService {
    /// An agent over `engine`, whose event watches run until their clients leave.
    pub fn new(engine: Arc<EngineCore>) -> Self {
        AgentService { engine, stopping: None }
    }

    /// An agent whose event watches also end when `stopping` turns true (or its sender goes).
    pub fn ending_with(
        engine: Arc<EngineCore>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        AgentService { engine, stopping: Some(stopping) }
    }
}

/// Resolves once `stopping` turns true or its sender is gone; never without one.
async fn stopped(stopping: Option<&mut tokio::sync::watch::Receiver<bool>>) {
    match stopping {
        Some(s) => drop(s.wait_for(|s| *s).await),
        None => std::future::pending().await,
    }
}

fn wire_volume(v: VolumeInfo) -> agent::Volume {
    let export = match v.export {
        None => agent::ExportKind::ExportNone,
        Some(ExportKind::Nbd) => agent::ExportKind::ExportNbd,
        Some(ExportKind::Fuse) => agent::ExportKind::ExportFuse,
        Some(ExportKind::VhostUserBlk) => agent::ExportKind::ExportVhostUserBlk,
    };
    agent::Volume {
        volume_id: v.id.to_string(),
        size_bytes: v.size,
        chain_depth: v.chain_depth as u32,
        source: convert::volume_source(v.source),
        export: export as i32,
        labels: v.labels,
        auto_expand: v.auto_expand.map(agent::AutoExpand::from),
    }
}

fn snapshot(s: SnapshotInfo) -> agent::Snapshot {
    agent::Snapshot {
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume_id.to_string(),
        size_bytes: s.size,
        created_unix: s.created_unix,
        group_snapshot_id: s.group_id.map(|g| g.to_string()).unwrap_or_default(),
        node: s.node.map(String::from).unwrap_or_default(),
    }
}

/// `CreateVolumeRequest` → the engine's request.
fn create_request(r: agent::CreateVolumeRequest) -> Result<CreateVolume, Status> {
    CreateVolume::try_from(r).map_err(|e| status(e.into()))
}

/// An ID off the wire: one that does not parse names nothing of ours (NOT_FOUND).
fn wire_id(kind: IdKind, s: &str) -> Result<ObjectId, Status> {
    ObjectId::parse(kind, s).map_err(|e| status(e.into()))
}

/// A name off the wire (a snapshot's, a group's, a node's, a pool's): one that does not
/// parse is a bad argument.
fn name<N: std::str::FromStr<Err = qsd_csi_model::Error>>(s: &str) -> Result<N, Status> {
    s.parse().map_err(|e: qsd_csi_model::Error| status(e.into()))
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
            auto_expand,
            filesystem,
            pool_free,
        } => (
            volume.to_string(),
            labels,
            Kind::WriteThresholdCrossed(agent::WriteThresholdCrossed {
                threshold_bytes: threshold,
                exceeded_bytes: exceeded,
                missed,
                rearmed_at_bytes: rearmed_at,
                size_bytes: size,
                auto_expand: auto_expand.map(agent::AutoExpand::from),
                filesystem_used_bytes: filesystem.map(|f| f.used),
                filesystem_size_bytes: filesystem.map(|f| f.total),
                pool_free_bytes: pool_free,
            }),
        ),
        EngineEvent::CloneProgress { volume, source, done, total, labels } => (
            volume.to_string(),
            labels,
            Kind::CloneProgress(agent::CloneProgress {
                source_volume_id: source.to_string(),
                done_bytes: done,
                total_bytes: total,
            }),
        ),
        EngineEvent::CloneFinished { volume, source, error, elapsed, labels } => (
            volume.to_string(),
            labels,
            Kind::CloneFinished(agent::CloneFinished {
                source_volume_id: source.to_string(),
                error: error.unwrap_or_default(),
                elapsed_millis: elapsed.as_millis().try_into().unwrap_or(u64::MAX),
            }),
        ),
        EngineEvent::Reconciled { .. } => return None,
    };
    Some(agent::VolumeEvent { volume_id, labels, kind: Some(kind) })
}

pub use qsd_csi_proto::agent::{ChangesStream, CopyExportStream, EventStream, HeldStream};

/// The longest a node holds writes for a caller of `HoldWrites` that does not hang up.
pub const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

fn snapshot_list(taken: Vec<SnapshotInfo>) -> agent::SnapshotList {
    agent::SnapshotList {
        snapshots: taken.into_iter().map(snapshot).collect(),
        next_token: String::new(),
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type WatchEventsStream = EventStream;
    type SnapshotChangesStream = ChangesStream;
    type ExportForCopyStream = CopyExportStream;
    type HoldWritesStream = HeldStream;

    async fn hold_writes(
        &self,
        request: Request<agent::HoldWritesRequest>,
    ) -> Result<Response<HeldStream>, Status> {
        let ids = request.into_inner().volume_ids;
        let ids: Vec<ObjectId> =
            ids.iter().map(|v| wire_id(IdKind::Volume, v)).collect::<Result<_, _>>()?;
        let held = self.engine.hold_writes(&ids).await.map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // Held in a task of its own until the caller hangs up, or HOLD_LIMIT at most.
        tokio::spawn(async move {
            if tx.send(Ok(agent::Held {})).await.is_ok()
                && tokio::time::timeout(HOLD_LIMIT, tx.closed()).await.is_err()
            {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                tracing::warn!(volumes = ?ids, "writes held past the limit; letting go");
            }
            drop(held);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn export_for_copy(
        &self,
        request: Request<agent::ExportForCopyRequest>,
    ) -> Result<Response<CopyExportStream>, Status> {
        let request = request.into_inner();
        let source =
            request.source.ok_or_else(|| Status::invalid_argument("a copy needs a source"))?;
        let source = VolumeSource::try_from(source).map_err(|e| status(e.into()))?;
        let reader: NodeName = name(&request.reader_node)?;
        let export = self.engine.export_for_copy(&source, &reader).await;
        let export = export.map_err(status)?;
        let first = agent::CopyExport::from(export.remote());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        // The export lives in a task of its own until the caller hangs up, so it is closed
        // (its snapshot deleted) whatever becomes of this request.
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_ok() {
                tx.closed().await;
            }
            export.close().await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn watch_events(
        &self,
        _: Request<agent::Empty>,
    ) -> Result<Response<EventStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let mut events = self.engine.subscribe();
        let mut stopping = self.stopping.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = tx.closed() => return,
                    () = stopped(stopping.as_mut()) => return,
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
        Ok(Response::new(wire_volume(info)))
    }

    async fn delete_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::Empty>, Status> {
        let volume = wire_id(IdKind::Volume, &request.into_inner().volume_id)?;
        self.engine.delete_volume(&volume).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn get_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::Volume>, Status> {
        let volume = wire_id(IdKind::Volume, &request.into_inner().volume_id)?;
        let info = self.engine.get_volume(&volume).map_err(status)?;
        Ok(Response::new(wire_volume(info)))
    }

    async fn locate_volume(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::VolumeLocation>, Status> {
        let volume = wire_id(IdKind::Volume, &request.into_inner().volume_id)?;
        let node = self.engine.attached_node(&volume).map_err(status)?;
        let attached_node = node.map(String::from).unwrap_or_default();
        Ok(Response::new(agent::VolumeLocation { attached_node }))
    }

    async fn locate_snapshot(
        &self,
        request: Request<agent::SnapshotRef>,
    ) -> Result<Response<agent::VolumeLocation>, Status> {
        let snapshot = wire_id(IdKind::Snapshot, &request.into_inner().snapshot_id)?;
        let node = self.engine.snapshot_source_node(&snapshot).map_err(status)?;
        let attached_node = node.map(String::from).unwrap_or_default();
        Ok(Response::new(agent::VolumeLocation { attached_node }))
    }

    async fn list_volumes(
        &self,
        request: Request<agent::ListRequest>,
    ) -> Result<Response<agent::VolumeList>, Status> {
        let all =
            self.engine.list_volumes().map_err(status)?.into_iter().map(wire_volume).collect();
        let (volumes, next_token) = page(all, |v| &v.volume_id, request.get_ref());
        Ok(Response::new(agent::VolumeList { volumes, next_token }))
    }

    async fn expand_volume(
        &self,
        request: Request<agent::ExpandVolumeRequest>,
    ) -> Result<Response<agent::Volume>, Status> {
        let r = request.into_inner();
        let volume = wire_id(IdKind::Volume, &r.volume_id)?;
        self.engine.expand_volume(&volume, r.size_bytes).await.map_err(status)?;
        self.engine.grow_staged(&volume).await;
        let info = self.engine.get_volume(&volume).map_err(status)?;
        Ok(Response::new(wire_volume(info)))
    }

    async fn modify_volume(
        &self,
        request: Request<agent::ModifyVolumeRequest>,
    ) -> Result<Response<agent::Empty>, Status> {
        let r = request.into_inner();
        let volume = wire_id(IdKind::Volume, &r.volume_id)?;
        self.engine.set_qos(&volume, r.qos.unwrap_or_default().into()).await.map_err(status)?;
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
        let items: Vec<(ObjectId, ObjectName)> = r
            .snapshots
            .iter()
            .map(|s| Ok((wire_id(IdKind::Volume, &s.volume_id)?, name(&s.name)?)))
            .collect::<Result<_, Status>>()?;
        let group: Option<ObjectName> =
            (!r.group.is_empty()).then(|| name(&r.group)).transpose()?;
        let batch = SnapshotBatch { items: &items, group: group.as_ref(), freeze: !r.no_freeze };
        let taken = self.engine.create_snapshot_group(batch).await.map_err(status)?;
        Ok(Response::new(snapshot_list(taken)))
    }

    async fn get_snapshot_group(
        &self,
        request: Request<agent::SnapshotGroupRef>,
    ) -> Result<Response<agent::SnapshotList>, Status> {
        let group = wire_id(IdKind::Group, &request.into_inner().group_snapshot_id)?;
        Ok(Response::new(snapshot_list(self.engine.group_snapshots(&group).map_err(status)?)))
    }

    async fn delete_snapshot_group(
        &self,
        request: Request<agent::SnapshotGroupRef>,
    ) -> Result<Response<agent::Empty>, Status> {
        let group = wire_id(IdKind::Group, &request.into_inner().group_snapshot_id)?;
        self.engine.delete_group(&group).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn snapshot_changes(
        &self,
        request: Request<agent::ChangesRequest>,
    ) -> Result<Response<ChangesStream>, Status> {
        let r = request.into_inner();
        let base = (!r.base_snapshot_id.is_empty())
            .then(|| wire_id(IdKind::Snapshot, &r.base_snapshot_id))
            .transpose()?;
        let target = wire_id(IdKind::Snapshot, &r.target_snapshot_id)?;
        let per_batch = match r.max_results {
            0 => DEFAULT_BATCH,
            n => n as usize,
        };
        let changes = self
            .engine
            .snapshot_changes(base.as_ref(), &target, r.starting_offset, per_batch)
            .await
            .map_err(status)?;
        let size = changes.volume_size;
        let stream =
            tokio_stream::wrappers::ReceiverStream::new(changes.batches).map(move |batch| {
                batch
                    .map(|ranges| agent::ChangedRanges {
                        volume_size_bytes: size,
                        ranges: ranges
                            .into_iter()
                            .map(|r| agent::ByteRange { offset: r.offset, length: r.length })
                            .collect(),
                    })
                    .map_err(status)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_volume_health(
        &self,
        request: Request<agent::VolumeRef>,
    ) -> Result<Response<agent::VolumeHealth>, Status> {
        let volume_id = request.into_inner().volume_id;
        let volume = wire_id(IdKind::Volume, &volume_id)?;
        let found = self.engine.volume_health(&volume).await.map_err(status)?;
        Ok(Response::new(convert::agent_volume_health(volume_id, &found)))
    }

    async fn list_volume_health(
        &self,
        request: Request<agent::ListRequest>,
    ) -> Result<Response<agent::VolumeHealthList>, Status> {
        let all = self.engine.list_volume_health().await.map_err(status)?;
        let all = all
            .into_iter()
            .map(|(v, found)| convert::agent_volume_health(v.to_string(), &found))
            .collect();
        let (volumes, next_token) = page(all, |v| &v.volume_id, request.get_ref());
        Ok(Response::new(agent::VolumeHealthList { volumes, next_token }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<agent::SnapshotRef>,
    ) -> Result<Response<agent::Empty>, Status> {
        let snapshot = wire_id(IdKind::Snapshot, &request.into_inner().snapshot_id)?;
        self.engine.delete_snapshot(&snapshot).await.map_err(status)?;
        Ok(Response::new(agent::Empty {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<agent::ListRequest>,
    ) -> Result<Response<agent::SnapshotList>, Status> {
        let all = self.engine.list_snapshots().map_err(status)?.into_iter().map(snapshot).collect();
        let (snapshots, next_token) = page(all, |s| &s.snapshot_id, request.get_ref());
        Ok(Response::new(agent::SnapshotList { snapshots, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<agent::PoolRef>,
    ) -> Result<Response<agent::Capacity>, Status> {
        let pool: PoolName = name(&request.into_inner().pool)?;
        let pool = self.engine.requested_pool(&pool).map_err(status)?;
        let usage = crate::mount::usage(pool.root()).map_err(status)?;
        Ok(Response::new(agent::Capacity { available_bytes: usage.bytes_available }))
    }
}
