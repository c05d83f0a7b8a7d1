//! Attaching volumes to exports, and write thresholds.

use super::journal::{AttachmentRecord, ThresholdRecord};
use super::{EngineCore, EngineEvent};
use crate::error::{Error, Result};
use crate::graph::{self, ExportEndpoint, ExportKind, Names};
use crate::pool::id::{IdKind, NodeName, ObjectId};
use crate::pool::{LayerId, VolumeRecord};
use crate::qmp::Event;
use qsd_csi_model::grow::FsUsage;

/// An attached volume as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    /// The volume's ID.
    pub volume_id: ObjectId,
    /// Where to reach the export.
    pub endpoint: ExportEndpoint,
}

/// A volume's threshold as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThresholdState {
    /// What the journal says is armed.
    pub armed_at: Option<u64>,
    /// What the daemon says is armed on the head's file node (0 = none).
    pub daemon_threshold: u64,
}

impl EngineCore {
    fn endpoint_for(&self, uid: LayerId, kind: ExportKind) -> ExportEndpoint {
        let names = Names::new(uid.to_string());
        let exports = self.config.state_dir.join("exports");
        let path = match kind {
            ExportKind::Nbd => self.daemon.config().nbd_socket(),
            ExportKind::Fuse => exports.join(format!("{uid}.img")),
            ExportKind::VhostUserBlk => exports.join(format!("{uid}.sock")),
        };
        ExportEndpoint { kind, path, name: names.export(), writethrough: false }
    }

    /// Opens a volume in the daemon and exports it. Idempotent for the same export kind.
    pub async fn attach(&self, volume_id: &ObjectId, kind: ExportKind) -> Result<AttachmentInfo> {
        self.attach_with(volume_id, kind, false).await
    }

    /// [`attach`](Self::attach), choosing whether the export flushes every write before
    /// acknowledging it (see [`ExportEndpoint::writethrough`]).
    pub async fn attach_with(
        &self,
        volume_id: &ObjectId,
        kind: ExportKind,
        writethrough: bool,
    ) -> Result<AttachmentInfo> {
        let (pool, parsed, _) = self.resolve_volume(volume_id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        let record = pool
            .volume(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: volume_id.to_string() })?;
        if let Some(existing) = self.journal.get(record.uid) {
            if existing.endpoint.kind != kind || existing.endpoint.writethrough != writethrough {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is already attached with a {:?} export{}",
                    existing.endpoint.kind,
                    if existing.endpoint.writethrough { " (writethrough)" } else { "" }
                )));
            }
            return Ok(AttachmentInfo {
                volume_id: volume_id.clone(),
                endpoint: existing.endpoint,
            });
        }
        let _graph = self.graph.change().await;
        let endpoint = ExportEndpoint { writethrough, ..self.endpoint_for(record.uid, kind) };
        let attachment = AttachmentRecord {
            volume_id: volume_id.clone(),
            pool: pool.name().clone(),
            name: record.name.clone(),
            uid: record.uid,
            endpoint: endpoint.clone(),
            threshold: None,
        };
        self.journal.put(attachment)?;
        let node = &self.config.node;
        let previous = pool.owner(&record.name)?.filter(|owner| owner != node);
        if let Some(previous) = &previous {
            // QEMU's image lock refuses a second writer (and the record is put back); a record
            // left by a node that died with the volume attached is taken over.
            tracing::warn!(
                volume = %volume_id,
                previous = %previous,
                "the owner record names another node; taking it over"
            );
        }
        if let Err(e) = pool.set_owner(&record.name, node) {
            self.journal.remove(record.uid)?;
            return Err(e);
        }
        let qmp = self.daemon.qmp();
        let built = async {
            if kind == ExportKind::Nbd {
                graph::ensure_nbd_server(&qmp, &endpoint.path).await?;
            }
            let chain = pool.chain(record.head)?;
            graph::attach(
                &qmp,
                &pool,
                &Names::new(record.uid.to_string()),
                &chain,
                record.qos,
                record.format.l2_cache_size,
                &endpoint,
            )
            .await
        }
        .await;
        if let Err(e) = built {
            match &previous {
                Some(previous) => pool.set_owner(&record.name, previous)?,
                None => pool.clear_owner(&record.name, node)?,
            }
            self.journal.remove(record.uid)?;
            return Err(e);
        }
        if kind == ExportKind::Fuse {
            self.daemon.guard_fuse_reads();
        }
        tracing::info!(volume = %volume_id, ?kind, "attached");
        Ok(AttachmentInfo { volume_id: volume_id.clone(), endpoint })
    }

    /// Removes a volume's export and nodes. Idempotent.
    pub async fn detach(&self, volume_id: &ObjectId) -> Result<()> {
        let (pool, parsed, _) = self.resolve_volume(volume_id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        let record = pool
            .volume(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: volume_id.to_string() })?;
        let Some(attachment) = self.journal.get(record.uid) else {
            return Ok(());
        };
        let _graph = self.graph.change().await;
        let chain = pool.chain(record.head)?;
        graph::detach(&self.daemon.qmp(), &Names::new(record.uid.to_string()), &chain).await?;
        if attachment.endpoint.kind != ExportKind::Nbd {
            let _ = std::fs::remove_file(&attachment.endpoint.path);
        }
        self.journal.remove(record.uid)?;
        pool.clear_owner(&record.name, &self.config.node)?;
        tracing::info!(volume = %volume_id, "detached");
        Ok(())
    }

    /// The node a volume is attached on: this one if attached here; in a shared pool, the node
    /// its owner record names (read from disk now); `None` if attached nowhere.
    pub fn attached_node(&self, volume_id: &ObjectId) -> Result<Option<NodeName>> {
        let (pool, _, record) = self.resolve_volume(volume_id)?;
        self.node_holding(&pool, &record)
    }

    /// Where a snapshot's source volume is attached (see [`attached_node`](Self::attached_node)):
    /// deleting the snapshot may shorten that volume's chain, which is the holder's work.
    /// `None` when the source is attached nowhere or no longer exists.
    pub fn snapshot_source_node(&self, snapshot_id: &ObjectId) -> Result<Option<NodeName>> {
        let (pool, parsed) = self.resolve(IdKind::Snapshot, snapshot_id)?;
        let snapshot = pool
            .snapshot(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: snapshot_id.to_string() })?;
        match pool.volume(&snapshot.source_volume) {
            Some(record) => self.node_holding(&pool, &record),
            None => Ok(None),
        }
    }

    /// The attachment of a volume, if attached.
    pub fn attachment(&self, volume_id: &ObjectId) -> Result<Option<AttachmentInfo>> {
        let (_, _, record) = self.resolve_volume(volume_id)?;
        Ok(self
            .journal
            .get(record.uid)
            .map(|a| AttachmentInfo { volume_id: a.volume_id, endpoint: a.endpoint }))
    }

    /// Arms (bytes > 0) or disarms (0) the write threshold on an attached volume's head file:
    /// when host allocation passes `bytes`, an event fires once and the threshold is re-armed
    /// `step` bytes above the highest write.
    pub async fn set_write_threshold(
        &self,
        volume_id: &ObjectId,
        bytes: u64,
        step: u64,
    ) -> Result<()> {
        if bytes > 0 && step == 0 {
            return Err(Error::invalid("step", "must be greater than zero"));
        }
        let armed = (bytes > 0).then_some(ThresholdRecord { armed_at: bytes, step, percent: None });
        self.arm(volume_id, armed).await
    }

    /// Arms the thin-provisioning alert of an attached volume at `percent` of its size, kept
    /// across restarts, re-armed higher each time it fires and at the same percentage of the
    /// new size when the volume grows. A threshold already armed is left alone.
    pub async fn arm_write_threshold_percent(
        &self,
        volume_id: &ObjectId,
        percent: u64,
    ) -> Result<()> {
        if self.write_threshold(volume_id).await?.armed_at.is_some() {
            return Ok(());
        }
        let size = self.get_volume(volume_id)?.size;
        self.arm(volume_id, Some(ThresholdRecord::at_percent(size, percent))).await
    }

    /// Reports a crossing when an attached volume's head already holds more than its armed
    /// threshold — it filled while nobody listened (detached, or while a plugin was down) and
    /// the daemon fires only on a write past it — so an auto-expanding volume grows at its
    /// next stage at the latest. Best effort: a failure is logged.
    pub async fn report_past_threshold(&self, volume_id: &ObjectId) {
        let found = self.resolve_volume(volume_id).map(|(pool, _, record)| {
            let armed = self.journal.get(record.uid).and_then(|a| a.threshold).map(|t| t.armed_at);
            (record.uid, armed, head_length(&pool.layer_path(record.head)))
        });
        let Ok((uid, Some(armed), allocated)) = found else { return };
        if allocated <= armed {
            return;
        }
        let _graph = self.graph.change().await;
        if let Err(e) = self.threshold_crossed(uid, armed, allocated - armed, true).await {
            tracing::warn!(volume = %volume_id, error = %e, "reporting a threshold crossed while nobody watched failed");
        }
    }

    async fn arm(&self, volume_id: &ObjectId, armed: Option<ThresholdRecord>) -> Result<()> {
        let (pool, parsed, _) = self.resolve_volume(volume_id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Volume, &pool, &parsed.name)])?;
        let record = pool
            .volume(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: volume_id.to_string() })?;
        let mut attachment = self.journal.get(record.uid).ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {volume_id} is not attached"))
        })?;
        let _graph = self.graph.change().await;
        let names = Names::new(record.uid.to_string());
        let bytes = armed.map_or(0, |a| a.armed_at);
        graph::arm_write_threshold(&self.daemon.qmp(), &names, record.head, bytes).await?;
        attachment.threshold = armed;
        self.journal.put(attachment)
    }

    /// The threshold of an attached volume, as journaled and as the daemon has it.
    pub async fn write_threshold(&self, volume_id: &ObjectId) -> Result<ThresholdState> {
        let (pool, parsed, _) = self.resolve_volume(volume_id)?;
        let record = pool
            .volume(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: volume_id.to_string() })?;
        let armed_at = self.journal.get(record.uid).and_then(|a| a.threshold).map(|t| t.armed_at);
        let file = Names::new(record.uid.to_string()).file(record.head);
        let nodes = graph::named_nodes(&self.daemon.qmp()).await?;
        let daemon_threshold =
            nodes.into_iter().find(|n| n.node_name == file).map(|n| n.write_threshold).unwrap_or(0);
        Ok(ThresholdState { armed_at, daemon_threshold })
    }

    /// Handles one daemon event (called by the supervisor task).
    pub(super) async fn handle_event(&self, event: Event) {
        if event.event != "BLOCK_WRITE_THRESHOLD" {
            return;
        }
        let node = event.data.get("node-name").and_then(|v| v.as_str()).unwrap_or_default();
        let threshold = event.data.get("write-threshold").and_then(|v| v.as_u64()).unwrap_or(0);
        let exceeded = event.data.get("amount-exceeded").and_then(|v| v.as_u64()).unwrap_or(0);
        let Some(uid) = node.get(2..14).and_then(|s| LayerId::parse(s).ok()) else {
            return;
        };
        let _graph = self.graph.change().await;
        if let Err(e) = self.threshold_crossed(uid, threshold, exceeded, false).await {
            tracing::error!(error = %e, node, "re-arming a write threshold failed");
        }
    }

    pub(super) async fn threshold_crossed(
        &self,
        uid: LayerId,
        threshold: u64,
        exceeded: u64,
        missed: bool,
    ) -> Result<()> {
        let Some(mut attachment) = self.journal.get(uid) else {
            return Ok(());
        };
        let Some(armed) = attachment.threshold else {
            return Ok(());
        };
        let pool = self.pool(&attachment.pool)?;
        let Some(record) = pool.volume(&attachment.name) else {
            return Ok(());
        };
        let rearm = threshold.max(armed.armed_at) + exceeded + armed.step;
        let names = Names::new(uid.to_string());
        graph::arm_write_threshold(&self.daemon.qmp(), &names, record.head, rearm).await?;
        attachment.threshold = Some(ThresholdRecord { armed_at: rearm, ..armed });
        self.journal.put(attachment.clone())?;
        tracing::warn!(volume = %attachment.volume_id, threshold, exceeded, missed, rearm, "write threshold crossed");
        self.metrics.crossed(&attachment.volume_id);
        let filesystem = self.mounts.get().and_then(|m| m.filesystem_usage(&attachment.volume_id));
        let pool_free = super::health::pool_free(&pool);
        let _ = self.events.send(EngineEvent::WriteThresholdCrossed {
            volume: attachment.volume_id,
            threshold,
            exceeded,
            missed,
            rearmed_at: rearm,
            size: record.size,
            labels: record.labels.clone(),
            auto_expand: record.auto_expand,
            filesystem,
            pool_free,
        });
        Ok(())
    }

    /// After a volume grew: its kernel device and filesystem, if it is staged here, grow now
    /// (best effort: the orchestrator's NodeExpandVolume does it too, later).
    pub async fn grow_staged(&self, volume_id: &ObjectId) {
        let Some(mounts) = self.mounts.get() else { return };
        if let Err(e) = mounts.grown(volume_id).await {
            tracing::warn!(volume = %volume_id, error = %e, "growing the staged device and filesystem failed; NodeExpandVolume will try again");
        }
    }

    /// After a volume grew to `size`: a threshold armed at a percentage of the size moves to
    /// that percentage of the new size (never lower), so the alert — and auto-expansion —
    /// repeats as the volume fills again. The caller holds the volume and the graph.
    pub(super) async fn rearm_for_size(&self, record: &VolumeRecord, size: u64) -> Result<()> {
        let Some(mut attachment) = self.journal.get(record.uid) else {
            return Ok(());
        };
        let Some(armed) = attachment.threshold else {
            return Ok(());
        };
        let Some(percent) = armed.percent else {
            return Ok(());
        };
        let grown = ThresholdRecord::at_percent(size, percent);
        if grown.armed_at <= armed.armed_at {
            return Ok(());
        }
        let names = Names::new(record.uid.to_string());
        graph::arm_write_threshold(&self.daemon.qmp(), &names, record.head, grown.armed_at).await?;
        attachment.threshold = Some(grown);
        self.journal.put(attachment)
    }
}

/// The length of a head image's file: how far the daemon has written into it, which is what
/// its write threshold is compared with.
fn head_length(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The volumes staged on this node, as the Node service (which stages them) provides them.
#[tonic::async_trait]
pub trait MountedFilesystems: Send + Sync + std::fmt::Debug {
    /// The filesystem staged on `volume_id`, if there is one.
    fn filesystem_usage(&self, volume_id: &ObjectId) -> Option<FsUsage>;
    /// `volume_id` grew: its kernel device and filesystem, if staged here, grow now.
    async fn grown(&self, volume_id: &ObjectId) -> Result<()>;
}
