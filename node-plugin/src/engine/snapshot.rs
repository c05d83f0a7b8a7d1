//! Snapshots (single and grouped), restore as a linked overlay, clone as a live point-in-time
//! copy, and chain shortening.
//!
//! ```text
//!   before          after snapshot S          after restore R from S
//!   [H] ← volume    [H] ← S (immutable)       [H] ← S
//!                    ▲                         ▲  ▲
//!                   [N] ← volume (new head)   [N] [R'] ← volume R
//! ```
//! A snapshot is O(1): a new empty overlay becomes the volume's head (`blockdev-snapshot` when
//! attached) and the old head becomes the snapshot's immutable layer.
//!
//! Shortening removes a layer X that nothing but its single child needs, keeping every visible
//! byte: `block-commit` X into its backing B when B is needed by X alone (intermediate commit,
//! always with `top-node`), otherwise `block-stream` X into its child C. Streaming into the active
//! layer is refused while a FUSE export holds the RESIZE permission, so that case waits.

use std::sync::Arc;
use std::time::Duration;

use super::volume::{source_label, CreateVolume, NewHead, VolumeInfo, VolumeSource};
use super::{EngineCore, EngineEvent, Guard};
use crate::error::{Error, Result};
use crate::graph::{self, ExportKind, Names, NewImage};
use crate::pool::id::{parse_size, IdKind};
use crate::pool::{LayerId, LayerRecord, Pool, SnapshotRecord, VolumeRecord};
use crate::qmp::commands::{
    BlockCommit, BlockResize, BlockSetWriteThreshold, BlockStream, BlockdevBackup,
    BlockdevSnapshot, ManualJob, Preallocation, Transaction, TransactionAction,
};
use crate::qmp::{Job, JobOptions};

/// What callers see of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's ID.
    pub id: String,
    /// The ID of the volume it was taken from.
    pub source_volume_id: String,
    /// The volume's size at the time.
    pub size: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
}

struct Planned {
    pool: Arc<Pool>,
    record: VolumeRecord,
    snapshot_name: String,
    overlay: LayerId,
}

impl EngineCore {
    fn snapshot_info(&self, pool: &Pool, record: &SnapshotRecord) -> Result<SnapshotInfo> {
        Ok(SnapshotInfo {
            id: self.object_id(IdKind::Snapshot, pool, &record.name)?.to_string(),
            source_volume_id: self
                .object_id(IdKind::Volume, pool, &record.source_volume)?
                .to_string(),
            size: record.size,
            created_unix: record.created_unix,
        })
    }

    /// Every snapshot in every pool.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut all = Vec::new();
        for pool in self.pools()? {
            for record in pool.snapshots() {
                all.push(self.snapshot_info(&pool, &record)?);
            }
        }
        Ok(all)
    }

    /// Takes a snapshot of a volume. Idempotent by name.
    pub async fn create_snapshot(&self, volume_id: &str, name: &str) -> Result<SnapshotInfo> {
        let mut taken = self.create_snapshot_group(&[(volume_id, name)]).await?;
        taken.pop().ok_or_else(|| Error::Inconsistent("snapshot group returned nothing".into()))
    }

    /// Takes snapshots of several volumes at one instant: the attached ones switch to their new
    /// overlays in one QMP `transaction`.
    pub async fn create_snapshot_group(&self, items: &[(&str, &str)]) -> Result<Vec<SnapshotInfo>> {
        let mut keys = Vec::new();
        let mut resolved = Vec::new();
        for (volume_id, name) in items {
            let (pool, parsed) = self.resolve(IdKind::Volume, volume_id)?;
            self.object_id(IdKind::Snapshot, &pool, name)?;
            keys.push(Self::key(IdKind::Volume, &pool, parsed.name.as_str()));
            keys.push(Self::key(IdKind::Snapshot, &pool, name));
            resolved.push((pool, parsed, *name));
        }
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        if unique.len() != keys.len() {
            return Err(Error::invalid("snapshots", "a volume or snapshot name appears twice"));
        }
        let _guard = self.lock(keys)?;
        let _graph = self.graph.read().await;
        let mut done = Vec::new();
        let mut planned = Vec::new();
        for (pool, parsed, name) in resolved {
            let record = pool
                .volume(parsed.name.as_str())
                .ok_or_else(|| Error::NotFound { what: "volume", id: parsed.to_string() })?;
            if let Some(existing) = pool.snapshot(name) {
                if existing.source_volume != record.name {
                    return Err(Error::AlreadyExists {
                        what: "snapshot",
                        name: name.to_owned(),
                        difference: format!("it was taken from volume {}", existing.source_volume),
                    });
                }
                done.push(self.snapshot_info(&pool, &existing)?);
                continue;
            }
            self.held_here(&pool, &record, &parsed.to_string())?;
            // Make room for one more layer.
            while pool.chain(record.head)?.len() + 1 > record.max_chain_depth as usize {
                if !self.shorten_once(&pool, &record.name).await? {
                    return Err(Error::ResourceExhausted(format!(
                        "volume {} already has {} layers, its limit; delete snapshots of it first",
                        parsed,
                        pool.chain(record.head)?.len()
                    )));
                }
            }
            let record = pool.volume(&record.name).unwrap_or(record);
            planned.push(Planned {
                pool,
                record,
                snapshot_name: name.to_owned(),
                overlay: LayerId::random(),
            });
        }
        let result = self.switch_to_overlays(&planned).await;
        if let Err(e) = result {
            for p in &planned {
                let _ = std::fs::remove_file(p.pool.layer_path(p.overlay));
                let _ = p.pool.release(p.overlay);
            }
            return Err(e);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for p in planned {
            let record = SnapshotRecord {
                name: p.snapshot_name,
                source_volume: p.record.name.clone(),
                layer: p.record.head,
                size: p.record.size,
                created_unix: now,
            };
            p.pool.put_snapshot(record.clone())?;
            done.push(self.snapshot_info(&p.pool, &record)?);
        }
        Ok(done)
    }

    /// Creates each overlay, records it as the new head, and switches attached volumes to it.
    async fn switch_to_overlays(&self, planned: &[Planned]) -> Result<()> {
        let qmp = self.daemon.qmp();
        for p in planned {
            let image = NewImage {
                path: &p.pool.layer_path(p.overlay),
                size: p.record.size,
                backing: Some(Pool::layer_file_name(p.record.head)),
                preallocation: Preallocation::Off,
            };
            graph::create_image(&qmp, image).await?;
            p.pool.put_layer(LayerRecord { id: p.overlay, backing: Some(p.record.head) })?;
        }
        let mut actions = Vec::new();
        let mut added: Vec<String> = Vec::new();
        for p in planned.iter().filter(|p| self.journal.get(p.record.uid).is_some()) {
            let names = Names::new(p.record.uid.to_string());
            let overlay = graph::layer_options(&p.pool, &names, p.overlay, false, None);
            let add = graph::call(&qmp, &crate::qmp::commands::BlockdevAdd(overlay)).await;
            if let Err(e) = add {
                for node in &added {
                    let _ = graph::delete_node_if_owned(&qmp, node).await;
                }
                return Err(e);
            }
            added.push(names.format(p.overlay));
            actions.push(TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: names.format(p.record.head),
                overlay: names.format(p.overlay),
            }));
        }
        // Record the new heads first: if we crash after the switch, the journal rebuilds the
        // graph on the overlay that is receiving writes (an empty overlay reads the same).
        for p in planned {
            p.pool.put_volume(VolumeRecord { head: p.overlay, ..p.record.clone() })?;
        }
        if !actions.is_empty() {
            if let Err(e) = graph::call(&qmp, &Transaction { actions }).await {
                for p in planned {
                    p.pool.put_volume(p.record.clone())?;
                }
                for node in &added {
                    let _ = graph::delete_node_if_owned(&qmp, node).await;
                }
                return Err(e);
            }
        }
        // Thresholds watch the head's file: move them to the new heads.
        for p in planned {
            if let Some(threshold) = self.journal.get(p.record.uid).and_then(|a| a.threshold) {
                let names = Names::new(p.record.uid.to_string());
                let arm = BlockSetWriteThreshold {
                    node_name: names.file(p.overlay),
                    write_threshold: threshold.armed_at,
                };
                graph::call(&qmp, &arm).await?;
            }
        }
        Ok(())
    }

    /// Deletes a snapshot. Its layer stays while a volume's chain needs it; chains past their
    /// depth limit are shortened.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let (pool, parsed) = self.resolve(IdKind::Snapshot, id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Snapshot, &pool, parsed.name.as_str())])?;
        let record = pool
            .snapshot(parsed.name.as_str())
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: id.to_owned() })?;
        pool.remove_snapshot(&record.name)?;
        if pool.layer(record.layer).is_none() {
            return Ok(());
        }
        // The layer lives on inside one or more chains; shorten those that are too deep.
        for volume in pool.volumes() {
            if !pool.chain(volume.head)?.contains(&record.layer)
                || pool.owner(&volume.name)?.is_some_and(|o| o != self.config.node.as_str())
            {
                // Not affected, or attached on another node of a shared pool: that node's
                // daemon holds the chain, and its next snapshot of the volume shortens it.
                continue;
            }
            let Ok(_volume_guard) = self.lock(vec![Self::key(IdKind::Volume, &pool, &volume.name)])
            else {
                continue; // busy: its own operation will shorten later
            };
            let _graph = self.graph.read().await;
            while pool.volume(&volume.name).is_some_and(|v| {
                pool.chain(v.head).map(|c| c.len() > v.max_chain_depth as usize).unwrap_or(false)
            }) {
                if !self.shorten_once(&pool, &volume.name).await? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Removes one layer from a volume's chain if one can go; returns false if none can.
    /// Callers hold the volume's guard and the graph read lock.
    async fn shorten_once(&self, pool: &Pool, volume: &str) -> Result<bool> {
        let Some(record) = pool.volume(volume) else {
            return Ok(false);
        };
        let chain = pool.chain(record.head)?;
        let attachment = self.journal.get(record.uid);
        let refs: Vec<_> = chain.iter().map(|l| pool.referrers(*l)).collect();
        // Layers above X must be opened by this chain alone (one child each; the head none).
        let exclusive_above = |i: usize| {
            (0..i).all(|j| {
                if j == 0 {
                    refs[0].children.is_empty()
                } else {
                    refs[j].children == [chain[j - 1]]
                }
            })
        };
        let mut plan = None;
        for i in 1..chain.len() {
            let x = &refs[i];
            if x.snapshots > 0
                || x.volumes > 0
                || x.children != [chain[i - 1]]
                || !exclusive_above(i)
            {
                continue;
            }
            let base_free = chain.get(i + 1).is_some_and(|_| {
                let b = &refs[i + 1];
                b.snapshots == 0 && b.volumes == 0 && b.children == [chain[i]]
            });
            let fuse_head =
                i == 1 && attachment.as_ref().is_some_and(|a| a.endpoint.kind == ExportKind::Fuse);
            if base_free {
                plan = Some((i, true));
                break;
            }
            if !fuse_head {
                plan = Some((i, false));
                break;
            }
        }
        let Some((i, commit)) = plan else {
            return Ok(false);
        };
        let (child, layer, base) = (chain[i - 1], chain[i], chain.get(i + 1).copied());
        let qmp = self.daemon.qmp();
        let (names, root, temporary) = match &attachment {
            Some(_) => {
                let names = Names::new(record.uid.to_string());
                let root = names.throttle();
                (names, root, false)
            }
            None => {
                let names = Names::new(graph::fresh_tag());
                let root = graph::open_chain(&qmp, pool, &names, &chain, false).await?;
                (names, root, true)
            }
        };
        let merged = async {
            if commit {
                let base =
                    base.ok_or_else(|| Error::Inconsistent("commit without a base".into()))?;
                let id = names.job("commit");
                let command = BlockCommit {
                    job_id: id.clone(),
                    device: root.clone(),
                    top_node: names.format(layer),
                    base_node: names.format(base),
                    backing_file: Some(Pool::layer_file_name(base)),
                    manual: ManualJob::MANUAL,
                };
                Job::run(&qmp, id, "commit", &command, JobOptions { manual_finalize: true }).await
            } else {
                let id = names.job("stream");
                let command = BlockStream {
                    job_id: id.clone(),
                    device: names.format(child),
                    base_node: base.map(|b| names.format(b)),
                    backing_file: base.map(Pool::layer_file_name),
                    manual: ManualJob::MANUAL,
                };
                Job::run(&qmp, id, "stream", &command, JobOptions { manual_finalize: true }).await
            }
        }
        .await;
        if merged.is_ok() {
            // An old head stays monitor-owned after leaving the chain.
            graph::delete_node_if_owned(&qmp, &names.format(layer)).await?;
        }
        if temporary {
            let remaining: Vec<_> =
                chain.iter().copied().filter(|l| merged.is_err() || *l != layer).collect();
            graph::close_chain(&qmp, &names, &remaining).await?;
        }
        merged?;
        pool.set_backing(child, base)?;
        pool.release(layer)?;
        tracing::info!(volume, layer = %layer, how = if commit { "commit" } else { "stream" }, "shortened chain");
        Ok(true)
    }

    /// Creates a volume as a linked overlay on a snapshot's layer: O(1), whatever the size.
    pub(super) async fn restore_snapshot(&self, request: &CreateVolume) -> Result<VolumeInfo> {
        let Some(VolumeSource::Snapshot(snapshot_id)) = &request.source else {
            return Err(Error::invalid("source", "not a snapshot"));
        };
        let (pool, snap) = self.resolve(IdKind::Snapshot, snapshot_id)?;
        if pool.name().as_str() != request.pool {
            return Err(Error::invalid(
                "pool",
                "a volume restored from a snapshot lives in the snapshot's pool",
            ));
        }
        let max_chain_depth = self.max_depth(request.max_chain_depth)?;
        self.object_id(IdKind::Volume, &pool, &request.name)?;
        let requested = request.size.map(parse_size).transpose()?;
        let source = source_label(&request.source, self)?;
        let _guard = self.lock(vec![
            Self::key(IdKind::Volume, &pool, &request.name),
            Self::key(IdKind::Snapshot, &pool, snap.name.as_str()),
        ])?;
        let snapshot = pool
            .snapshot(snap.name.as_str())
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: snapshot_id.clone() })?;
        let size = requested.unwrap_or(snapshot.size);
        if let Some(existing) = pool.volume(&request.name) {
            return self.check_recreate(&pool, &existing, Some(size), &source);
        }
        if size < snapshot.size {
            return Err(Error::OutOfRange {
                requested: request.size.unwrap_or_default(),
                reason: format!("the snapshot holds {} bytes", snapshot.size),
            });
        }
        let depth = pool.chain(snapshot.layer)?.len() + 1;
        if depth > max_chain_depth as usize {
            return Err(Error::ResourceExhausted(format!(
                "a linked restore would have {depth} layers, over the limit of {max_chain_depth}; clone the volume instead"
            )));
        }
        let _graph = self.graph.read().await;
        let head =
            NewHead { size, backing: Some(snapshot.layer), preallocation: Preallocation::Off };
        self.create_with_head(&pool, request, head, max_chain_depth, source).await
    }

    /// Validates a clone request and takes the guards of the source and the new volume; an
    /// existing volume of that name satisfies it only if size and source match.
    fn prepare_clone(&self, request: &CreateVolume) -> Result<ClonePlan> {
        let Some(VolumeSource::Volume(source_id)) = &request.source else {
            return Err(Error::invalid("source", "not a volume"));
        };
        let (pool, src) = self.resolve(IdKind::Volume, source_id)?;
        if pool.name().as_str() != request.pool {
            return Err(Error::invalid("pool", "a clone lives in its source's pool"));
        }
        let max_chain_depth = self.max_depth(request.max_chain_depth)?;
        self.object_id(IdKind::Volume, &pool, &request.name)?;
        let requested = request.size.map(parse_size).transpose()?;
        let source = source_label(&request.source, self)?;
        let guard = self.lock(vec![
            Self::key(IdKind::Volume, &pool, &request.name),
            Self::key(IdKind::Volume, &pool, src.name.as_str()),
        ])?;
        let source_record = pool
            .volume(src.name.as_str())
            .ok_or_else(|| Error::NotFound { what: "volume", id: source_id.clone() })?;
        self.held_here(&pool, &source_record, source_id)?;
        let size = requested.unwrap_or(source_record.size);
        if let Some(existing) = pool.volume(&request.name) {
            return self
                .check_recreate(&pool, &existing, Some(size), &source)
                .map(ClonePlan::Exists);
        }
        if size < source_record.size {
            return Err(Error::OutOfRange {
                requested: request.size.unwrap_or_default(),
                reason: format!("the source volume holds {} bytes", source_record.size),
            });
        }
        Ok(ClonePlan::New(PreparedClone {
            pool,
            source_record,
            size,
            source,
            max_chain_depth,
            guard,
        }))
    }

    /// Creates a linked clone: the source moves onto a fresh overlay (as for a snapshot, online
    /// or offline), and the clone is an overlay on the source's previous head, which both now
    /// share read-only. O(1) whatever the size; the shared layer lives while either needs it.
    pub(super) async fn linked_clone(&self, request: &CreateVolume) -> Result<VolumeInfo> {
        let prepared = match self.prepare_clone(request)? {
            ClonePlan::Exists(info) => return Ok(info),
            ClonePlan::New(p) => p,
        };
        let PreparedClone { pool, source_record, size, source, max_chain_depth, guard: _guard } =
            prepared;
        let source_id = request.source_id();
        let _graph = self.graph.read().await;
        while pool.chain(source_record.head)?.len() + 1 > source_record.max_chain_depth as usize {
            if !self.shorten_once(&pool, &source_record.name).await? {
                return Err(Error::ResourceExhausted(format!(
                    "volume {source_id} is at its chain-depth limit; delete snapshots of it or clone with cloneMode=copy"
                )));
            }
        }
        let source_record = pool.volume(&source_record.name).unwrap_or(source_record);
        let depth = pool.chain(source_record.head)?.len() + 1;
        if depth > max_chain_depth as usize {
            return Err(Error::ResourceExhausted(format!(
                "a linked clone would have {depth} layers, over its limit of {max_chain_depth}; use cloneMode=copy"
            )));
        }
        let shared = source_record.head;
        let planned = Planned {
            pool: pool.clone(),
            record: source_record,
            snapshot_name: String::new(),
            overlay: LayerId::random(),
        };
        if let Err(e) = self.switch_to_overlays(std::slice::from_ref(&planned)).await {
            let _ = std::fs::remove_file(pool.layer_path(planned.overlay));
            let _ = pool.release(planned.overlay);
            return Err(e);
        }
        let head = NewHead { size, backing: Some(shared), preallocation: Preallocation::Off };
        self.create_with_head(&pool, request, head, max_chain_depth, source).await
    }

    /// Starts a clone: a new image receiving a point-in-time copy of the source while the source
    /// stays writable. `speed` (bytes/s) limits the copy; [`CloneTask::finish`] completes it.
    pub async fn start_clone(self: &Arc<Self>, request: &CreateVolume) -> Result<CloneTask> {
        self.start_clone_with_speed(request, None).await
    }

    /// [`EngineCore::start_clone`] with a rate limit on the copy.
    pub async fn start_clone_with_speed(
        self: &Arc<Self>,
        request: &CreateVolume,
        speed: Option<u64>,
    ) -> Result<CloneTask> {
        let prepared = match self.prepare_clone(request)? {
            ClonePlan::Exists(info) => {
                return Ok(CloneTask {
                    engine: self.clone(),
                    state: CloneState::Done(info),
                    report_every: CLONE_PROGRESS_PERIOD,
                })
            }
            ClonePlan::New(p) => p,
        };
        let PreparedClone { pool, source_record, size, source, max_chain_depth, guard } = prepared;
        let graph_guard = self.graph.clone().read_owned().await;
        let qmp = self.daemon.qmp();
        let target = LayerId::random();
        let image = NewImage {
            path: &pool.layer_path(target),
            size: source_record.size,
            backing: None,
            preallocation: request.preallocation,
        };
        graph::create_image(&qmp, image).await?;
        let chain = pool.chain(source_record.head)?;
        let source_names = match self.journal.get(source_record.uid) {
            Some(_) => None,
            None => Some(Names::new(graph::fresh_tag())),
        };
        let target_names = Names::new(graph::fresh_tag());
        let mut open = OpenNodes { source: None, target: None };
        let started = async {
            let source_node = match &source_names {
                Some(names) => {
                    let top = graph::open_chain(&qmp, &pool, names, &chain, true).await?;
                    open.source = Some((names.clone(), chain.clone()));
                    top
                }
                None => Names::new(source_record.uid.to_string()).format(source_record.head),
            };
            let target_node =
                graph::open_chain(&qmp, &pool, &target_names, &[target], false).await?;
            open.target = Some(target_names.clone());
            let id = target_names.job("clone");
            let backup = BlockdevBackup {
                job_id: id.clone(),
                device: source_node,
                target: target_node,
                sync: "full",
                speed,
                manual: ManualJob::MANUAL,
            };
            Job::start(&qmp, id, "backup", &backup, JobOptions { manual_finalize: true }).await
        }
        .await;
        let job = match started {
            Ok(job) => job,
            Err(e) => {
                open.close(&qmp, target).await;
                let _ = std::fs::remove_file(pool.layer_path(target));
                return Err(e);
            }
        };
        let record = VolumeRecord {
            name: request.name.clone(),
            uid: LayerId::random(),
            size,
            head: target,
            preallocation: request.preallocation,
            qos: request.qos,
            max_chain_depth,
            source,
            labels: request.labels.clone(),
        };
        Ok(CloneTask {
            engine: self.clone(),
            state: CloneState::Running(Box::new(Running {
                job,
                volume_id: self.object_id(IdKind::Volume, &pool, &request.name)?.to_string(),
                source_id: request.source_id().to_owned(),
                pool,
                record,
                open,
                _guard: guard,
                _graph: graph_guard,
            })),
            report_every: CLONE_PROGRESS_PERIOD,
        })
    }
}

enum ClonePlan {
    Exists(VolumeInfo),
    New(PreparedClone),
}

struct PreparedClone {
    pool: Arc<Pool>,
    source_record: VolumeRecord,
    size: u64,
    source: Option<String>,
    max_chain_depth: u32,
    guard: Guard,
}

struct OpenNodes {
    source: Option<(Names, Vec<LayerId>)>,
    target: Option<Names>,
}

impl OpenNodes {
    async fn close(&self, qmp: &crate::qmp::QmpClient, target: LayerId) {
        if let Some(names) = &self.target {
            let _ = graph::close_chain(qmp, names, &[target]).await;
        }
        if let Some((names, chain)) = &self.source {
            let _ = graph::close_chain(qmp, names, chain).await;
        }
    }
}

struct Running {
    job: Job,
    volume_id: String,
    source_id: String,
    pool: Arc<Pool>,
    record: VolumeRecord,
    open: OpenNodes,
    _guard: Guard,
    _graph: tokio::sync::OwnedRwLockReadGuard<()>,
}

enum CloneState {
    Done(VolumeInfo),
    Running(Box<Running>),
}

/// How often a running clone reports its progress ([`EngineEvent::CloneProgress`]).
pub const CLONE_PROGRESS_PERIOD: Duration = Duration::from_secs(10);

/// A clone in progress. Holds the guards of the source and the new volume until finished.
pub struct CloneTask {
    engine: Arc<EngineCore>,
    state: CloneState,
    report_every: Duration,
}

impl std::fmt::Debug for CloneTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = match &self.state {
            CloneState::Done(_) => None,
            CloneState::Running(r) => Some(r.job.id().to_owned()),
        };
        f.debug_struct("CloneTask").field("job", &job).finish()
    }
}

impl CloneTask {
    /// The copy job, while it runs (`None` for a clone that already existed).
    pub fn job(&mut self) -> Option<&mut Job> {
        match &mut self.state {
            CloneState::Done(_) => None,
            CloneState::Running(r) => Some(&mut r.job),
        }
    }

    /// Reports progress every `period` instead of [`CLONE_PROGRESS_PERIOD`].
    pub fn report_every(mut self, period: Duration) -> Self {
        self.report_every = period;
        self
    }

    /// Waits for the copy (reporting its progress as events), grows the new volume if a larger
    /// size was asked for, records it, and reports the outcome. On failure the new image is
    /// removed.
    pub async fn finish(self) -> Result<VolumeInfo> {
        let running = match self.state {
            CloneState::Done(info) => return Ok(info),
            CloneState::Running(running) => *running,
        };
        let Running { job, volume_id, source_id, pool, record, open, _guard, _graph } = running;
        let engine = self.engine;
        let qmp = engine.daemon.qmp();
        let started = tokio::time::Instant::now();
        let job_id = job.id().to_owned();
        let copy = job.wait();
        tokio::pin!(copy);
        let mut ticker = tokio::time::interval_at(started + self.report_every, self.report_every);
        let copied = loop {
            tokio::select! {
                outcome = &mut copy => break outcome,
                _ = ticker.tick() => {
                    if let Ok(Some((done, total))) = crate::qmp::job_progress(&qmp, &job_id).await {
                        let _ = engine.events.send(EngineEvent::CloneProgress {
                            volume: volume_id.clone(),
                            source: source_id.clone(),
                            done,
                            total,
                            labels: record.labels.clone(),
                        });
                    }
                }
            }
        };
        let resized = match (&copied, &open.target) {
            (Ok(()), Some(names)) => {
                let resize =
                    BlockResize { node_name: names.format(record.head), size: record.size };
                graph::call(&qmp, &resize).await.map(|_| ())
            }
            _ => Ok(()),
        };
        open.close(&qmp, record.head).await;
        let labels = record.labels.clone();
        let outcome = match copied.and(resized) {
            Ok(()) => engine.commit_new_volume(
                &pool,
                LayerRecord { id: record.head, backing: None },
                record,
            ),
            Err(e) => {
                let _ = std::fs::remove_file(pool.layer_path(record.head));
                Err(e)
            }
        };
        let _ = engine.events.send(EngineEvent::CloneFinished {
            volume: volume_id,
            source: source_id,
            error: outcome.as_ref().err().map(Error::with_causes),
            elapsed: started.elapsed(),
            labels,
        });
        outcome
    }
}
