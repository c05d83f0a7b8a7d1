//! Volumes made from other objects: restore from a snapshot as a linked overlay (O(1)), a
//! linked clone (O(1), sharing the source's data as of now), and a copy clone — a live,
//! point-in-time `blockdev-backup` while the source stays writable.
//!
//! ```text
//!   restore R from S            linked clone K of V          copy clone K of V
//!   [S] ◄─ [R']                 [H] ◄─ [V'] (V's new head)   [V…] ══ backup job ══► [K]
//!                                ▲                            (reports progress; K is
//!                               [K']                           recorded when the copy ends)
//! ```

use std::sync::Arc;
use std::time::Duration;

use super::ops::Operation;
use super::snapshot::Planned;
use super::volume::{source_label, CreateVolume, NewHead, Preallocation, VolumeInfo, VolumeSource};
use super::{EngineCore, EngineEvent, Guard};
use crate::error::{Error, Result};
use crate::graph::{self, Names, NewImage};
use crate::pool::id::{parse_size, IdKind, ObjectId};
use crate::pool::{LayerId, LayerRecord, Pool, RecordedSource, VolumeRecord};
use crate::qmp::Job;

impl EngineCore {
    /// Creates a volume as a linked overlay on a snapshot's layer: O(1), whatever the size.
    pub(super) async fn restore_snapshot(&self, request: &CreateVolume) -> Result<VolumeInfo> {
        let Some(VolumeSource::Snapshot(snapshot_id)) = &request.source else {
            return Err(Error::invalid("source", "not a snapshot"));
        };
        let (pool, snap) = self.resolve(IdKind::Snapshot, snapshot_id)?;
        if *pool.name() != request.pool {
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
            Self::key(IdKind::Snapshot, &pool, &snap.name),
        ])?;
        let snapshot = pool
            .snapshot(&snap.name)
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: snapshot_id.to_string() })?;
        let size = requested.unwrap_or(snapshot.size);
        if let Some(existing) = pool.volume(&request.name) {
            return self.check_recreate(&pool, &existing, request, size, &source);
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
        let _graph = self.graph.change().await;
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
        if *pool.name() != request.pool {
            return Err(Error::invalid("pool", "a clone lives in its source's pool"));
        }
        let max_chain_depth = self.max_depth(request.max_chain_depth)?;
        self.object_id(IdKind::Volume, &pool, &request.name)?;
        let requested = request.size.map(parse_size).transpose()?;
        let source = source_label(&request.source, self)?;
        let guard = self.lock(vec![
            Self::key(IdKind::Volume, &pool, &request.name),
            Self::key(IdKind::Volume, &pool, &src.name),
        ])?;
        let source_record = pool
            .volume(&src.name)
            .ok_or_else(|| Error::NotFound { what: "volume", id: source_id.to_string() })?;
        self.held_here(&pool, &source_record, source_id)?;
        let size = requested.unwrap_or(source_record.size);
        if let Some(existing) = pool.volume(&request.name) {
            return self
                .check_recreate(&pool, &existing, request, size, &source)
                .map(|info| ClonePlan::Exists(Box::new(info)));
        }
        if size < source_record.size {
            return Err(Error::OutOfRange {
                requested: request.size.unwrap_or_default(),
                reason: format!("the source volume holds {} bytes", source_record.size),
            });
        }
        Ok(ClonePlan::New(Box::new(PreparedClone {
            pool,
            source_record,
            size,
            source,
            max_chain_depth,
            guard,
        })))
    }

    /// Creates a linked clone: the source moves onto a fresh overlay (as for a snapshot, online
    /// or offline), and the clone is an overlay on the source's previous head, which both now
    /// share read-only. O(1) whatever the size; the shared layer lives while either needs it.
    pub(super) async fn linked_clone(&self, request: &CreateVolume) -> Result<VolumeInfo> {
        let prepared = match self.prepare_clone(request)? {
            ClonePlan::Exists(info) => return Ok(*info),
            ClonePlan::New(p) => p,
        };
        let PreparedClone { pool, source_record, size, source, max_chain_depth, guard: _guard } =
            *prepared;
        let source_id = &source_record.name;
        let _graph = self.graph.change().await;
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
            snapshot_name: None,
            overlay: LayerId::random(),
        };
        match self.switch_to_overlays(std::slice::from_ref(&planned), None).await {
            Ok(intent) => drop(intent),
            Err(e) => {
                let _ = std::fs::remove_file(pool.layer_path(planned.overlay));
                let _ = pool.release(planned.overlay);
                return Err(e);
            }
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
            ClonePlan::Exists(info) => return Ok(CloneTask::done(self.clone(), *info)),
            ClonePlan::New(p) => p,
        };
        let PreparedClone { pool, source_record, size, source, max_chain_depth, guard } = *prepared;
        let graph_guard = self.graph.change().await;
        let (target, intent) = self.copy_target(&pool, request, source_record.size).await?;
        crate::fault_point!("clone:after-target-image");
        let (job, open) = self.start_copy(&pool, &source_record, target, speed).await?;
        let source_id = self.volume_id(&pool, &source_record)?;
        tracing::info!(volume = %request.name, source = %source_id, speed, "full clone started");
        crate::fault_point!("clone:after-job-start");
        let record = new_record(request, size, target, max_chain_depth, source);
        let running = Running {
            job,
            volume_id: self.object_id(IdKind::Volume, &pool, &request.name)?,
            source_id,
            pool,
            record,
            open,
            intents: vec![intent],
            _guard: guard,
            _graph: graph_guard,
        };
        Ok(CloneTask::running(self.clone(), running, CLONE_PROGRESS_PERIOD))
    }

    /// Records that a copy's new volume begins, and creates its image (`size`, no backing).
    pub(super) async fn copy_target(
        &self,
        pool: &Pool,
        request: &CreateVolume,
        size: u64,
    ) -> Result<(LayerId, super::ops::Intent)> {
        let target = LayerId::random();
        let intent = self.operations.begin(Operation::NewVolume {
            pool: pool.name().clone(),
            name: request.name.clone(),
            head: target,
        })?;
        let image = NewImage {
            path: &pool.layer_path(target),
            size,
            backing: None,
            preallocation: request.preallocation,
            format: request.format,
        };
        graph::create_image(&self.daemon.qmp(), image).await?;
        Ok((target, intent))
    }

    /// Opens the clone's source (the attached volume's own graph, or its chain under a fresh
    /// tag) and its target image, and starts the copy job; on failure closes what it opened
    /// and removes the target image.
    async fn start_copy(
        &self,
        pool: &Pool,
        source_record: &VolumeRecord,
        target: LayerId,
        speed: Option<u64>,
    ) -> Result<(Job, OpenNodes)> {
        let qmp = self.daemon.qmp();
        let chain = pool.chain(source_record.head)?;
        let source_names = match self.journal.get(source_record.uid) {
            Some(_) => None,
            None => Some(Names::new(graph::fresh_tag())),
        };
        let target_names = Names::new(graph::fresh_tag());
        let mut open = OpenNodes::default();
        let started = async {
            let source_node = match &source_names {
                Some(names) => {
                    let top = graph::open_chain(&qmp, pool, names, &chain, true).await?;
                    open.source = Some((names.clone(), chain.clone()));
                    top
                }
                None => Names::new(source_record.uid.to_string()).format(source_record.head),
            };
            let target_node = graph::open_copy_target(&qmp, pool, &target_names, target).await?;
            open.target = Some(target_names.clone());
            graph::start_backup(&qmp, &target_names, source_node, target_node, speed).await
        }
        .await;
        open.started(&qmp, pool, target, started).await
    }
}

/// The record of a copy's new volume, as `request` asks for it.
pub(super) fn new_record(
    request: &CreateVolume,
    size: u64,
    head: LayerId,
    max_chain_depth: u32,
    source: Option<RecordedSource>,
) -> VolumeRecord {
    VolumeRecord {
        name: request.name.clone(),
        uid: LayerId::random(),
        size,
        head,
        preallocation: request.preallocation,
        qos: request.qos,
        max_chain_depth,
        source,
        labels: request.labels.clone(),
        format: request.format,
        auto_expand: request.auto_expand,
        home: None,
    }
}

enum ClonePlan {
    Exists(Box<VolumeInfo>),
    New(Box<PreparedClone>),
}

struct PreparedClone {
    pool: Arc<Pool>,
    source_record: VolumeRecord,
    size: u64,
    source: Option<RecordedSource>,
    max_chain_depth: u32,
    guard: Guard,
}

/// What a copy opened in the daemon: a local source chain under a fresh tag, a remote source
/// (its `nbd` node, TLS object and key directory), the target image.
#[derive(Default)]
pub(super) struct OpenNodes {
    source: Option<(Names, Vec<LayerId>)>,
    remote: Option<(String, std::path::PathBuf)>,
    pub(super) target: Option<Names>,
}

impl OpenNodes {
    /// A copy whose source is another node's export, tagged `tag`, its key in `dir`.
    pub(super) fn remote(tag: String, dir: std::path::PathBuf) -> Self {
        OpenNodes { remote: Some((tag, dir)), ..OpenNodes::default() }
    }

    /// A copy's start as its caller takes it: the job and what it opened, or (the start
    /// failed) all of that closed and the target image removed.
    pub(super) async fn started(
        self,
        qmp: &crate::qmp::QmpClient,
        pool: &Pool,
        target: LayerId,
        started: Result<Job>,
    ) -> Result<(Job, OpenNodes)> {
        match started {
            Ok(job) => Ok((job, self)),
            Err(e) => {
                self.close(qmp, target).await;
                let _ = std::fs::remove_file(pool.layer_path(target));
                Err(e)
            }
        }
    }

    pub(super) async fn close(&self, qmp: &crate::qmp::QmpClient, target: LayerId) {
        if let Some(names) = &self.target {
            let _ = graph::close_chain(qmp, names, &[target]).await;
        }
        if let Some((names, chain)) = &self.source {
            let _ = graph::close_chain(qmp, names, chain).await;
        }
        if let Some((tag, dir)) = &self.remote {
            if let Err(e) = super::copy::close_remote(qmp, tag).await {
                tracing::warn!(error = %e.with_causes(), "closing a copy's remote source");
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A copy in progress: the job, what it will record, and what it holds until it ends.
pub(super) struct Running {
    pub(super) job: Job,
    pub(super) volume_id: ObjectId,
    pub(super) source_id: ObjectId,
    pub(super) pool: Arc<Pool>,
    pub(super) record: VolumeRecord,
    pub(super) open: OpenNodes,
    /// Removed when the copy ends (finished, or undone).
    pub(super) intents: Vec<super::ops::Intent>,
    pub(super) _guard: Guard,
    pub(super) _graph: super::GraphChange,
}

enum CloneState {
    Done(Box<VolumeInfo>),
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
    /// A clone that needs no copy: the volume exists.
    pub(super) fn done(engine: Arc<EngineCore>, info: VolumeInfo) -> Self {
        CloneTask {
            engine,
            state: CloneState::Done(Box::new(info)),
            report_every: CLONE_PROGRESS_PERIOD,
        }
    }

    /// A copy under way.
    pub(super) fn running(engine: Arc<EngineCore>, running: Running, every: Duration) -> Self {
        CloneTask { engine, state: CloneState::Running(Box::new(running)), report_every: every }
    }

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

    /// [`CloneTask::finish`] in a task of its own: a caller that stops waiting (a CO's
    /// request timing out) leaves the copy to complete and be recorded (its retry meanwhile
    /// finds the volume busy, then made), never a job copying into an image nobody records.
    pub async fn finish_detached(self) -> Result<VolumeInfo> {
        tokio::spawn(self.finish())
            .await
            .map_err(|e| Error::Inconsistent(format!("a copy's task ended: {e}")))?
    }

    /// Waits for the copy (reporting its progress as events), grows the new volume if a larger
    /// size was asked for, records it, and reports the outcome. On failure the new image is
    /// removed.
    pub async fn finish(self) -> Result<VolumeInfo> {
        let running = match self.state {
            CloneState::Done(info) => return Ok(*info),
            CloneState::Running(running) => *running,
        };
        let Running { job, volume_id, source_id, pool, record, open, intents, _guard, _graph } =
            running;
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
                graph::resize_node(&qmp, names.format(record.head), record.size).await
            }
            _ => Ok(()),
        };
        open.close(&qmp, record.head).await;
        let labels = record.labels.clone();
        let outcome = match copied.and(resized) {
            Ok(()) => {
                crate::fault_point!("clone:after-copy");
                engine.commit_new_volume(
                    &pool,
                    LayerRecord { id: record.head, backing: None },
                    record,
                )
            }
            Err(e) => {
                let _ = std::fs::remove_file(pool.layer_path(record.head));
                Err(e)
            }
        };
        drop(intents);
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
