//! The block-graph engine: every volume operation, online (attached) or offline.
//!
//! ```text
//!   request ─► parse (IDs, sizes) ─► per-volume guard ─► pool records ◄─► QMP (graph, jobs)
//!                                     (second caller:        (truth)        (rebuilt from
//!                                      Busy → ABORTED)                       records + journal)
//! ```
//!
//! One operation per volume at a time; different volumes proceed in parallel. Operations share a
//! read lock on the graph, which the reconciler takes exclusively after a (re)connect to rebuild
//! what the journal says must exist. A supervisor task watches the QMP connection: when the
//! daemon dies it is restarted (or re-adopted) and every attached volume's graph is rebuilt; write
//! threshold events are turned into [`EngineEvent`]s and re-armed higher.

mod attach;
mod changes;
mod clone;
mod config;
mod copy;
mod counters;
mod health;
mod hold;
mod ids;
mod journal;
mod ops;
mod plan;
mod reconcile;
pub mod shorten;
mod snapshot;
mod volume;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, RwLock};

use crate::claims::Claims;
use crate::error::{Error, Result};
use crate::pool::id::{IdKind, NodeName, ObjectId, ObjectName};
use crate::pool::{Pool, PoolName, VolumeRecord};
use crate::qmp::Event;
use crate::qsd::{Daemon, Origin};

pub use attach::{AttachmentInfo, MountedFilesystems, ThresholdState};
pub use changes::{ByteRange, ChangeStream, DEFAULT_BATCH};
pub use clone::{CloneTask, CLONE_PROGRESS_PERIOD};
pub use config::{EngineConfig, PoolConfig};
pub use copy::CopyExport;
pub use counters::EngineCounters;
pub use journal::STEP_PERCENT as WRITE_THRESHOLD_STEP_PERCENT;
pub use journal::{AttachmentRecord, ThresholdRecord};
use qsd_csi_model::grow::{AutoExpand, FsUsage};
pub use snapshot::{Quiesce, SnapshotBatch, SnapshotInfo};
pub use volume::{
    CloneMode, CreateVolume, Format, PoolFacts, Preallocation, Qos, VolumeFacts, VolumeInfo,
    VolumeSource,
};

/// Default longest chain (layers, head included) before stream / commit shorten it.
pub const DEFAULT_MAX_CHAIN_DEPTH: u32 = 16;

/// Something the engine noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// A volume's head file grew past its write threshold (thin-provisioning alert).
    WriteThresholdCrossed {
        /// The volume's ID.
        volume: ObjectId,
        /// The threshold that was crossed.
        threshold: u64,
        /// Bytes written past it (0 when it fired while we were disconnected).
        exceeded: u64,
        /// It fired while we were not connected and was found on reconnect.
        missed: bool,
        /// Where it is armed now.
        rearmed_at: u64,
        /// The volume's virtual size.
        size: u64,
        /// The volume's labels.
        labels: BTreeMap<String, String>,
        /// Its policy, if it grows itself.
        auto_expand: Option<AutoExpand>,
        /// The filesystem staged on it, if any.
        filesystem: Option<FsUsage>,
        /// Free bytes in its pool, if known.
        pool_free: Option<u64>,
    },
    /// A full clone is copying (reported every [`CloneTask::report_every`] period).
    CloneProgress {
        /// The new volume's ID.
        volume: ObjectId,
        /// The volume being copied.
        source: ObjectId,
        /// Bytes copied so far.
        done: u64,
        /// Bytes to copy in all.
        total: u64,
        /// The new volume's labels.
        labels: BTreeMap<String, String>,
    },
    /// A full clone ended: the volume exists (`error: None`) or its image was removed.
    CloneFinished {
        /// The new volume's ID.
        volume: ObjectId,
        /// The volume that was copied.
        source: ObjectId,
        /// Why it failed, if it did.
        error: Option<String>,
        /// How long the copy took.
        elapsed: Duration,
        /// The new volume's labels.
        labels: BTreeMap<String, String>,
    },
    /// The engine (re)connected to the daemon and brought its graph in line with the journal.
    Reconciled {
        /// Whether the daemon was fresh or adopted.
        origin: Origin,
        /// How many attached volumes had to be rebuilt.
        rebuilt: usize,
    },
}

/// Shared engine state; [`Engine`] derefs to it.
#[derive(Debug)]
pub struct EngineCore {
    config: EngineConfig,
    daemon: Daemon,
    pools: BTreeMap<PoolName, Arc<Pool>>,
    journal: journal::Journal,
    /// Multi-command operations in flight (completed or undone after a kill).
    operations: ops::Operations,
    /// What the last reconcile could not tidy (retried by the supervisor).
    unreconciled: reconcile::Unreconciled,
    busy: Claims,
    graph: GraphGate,
    events: broadcast::Sender<EngineEvent>,
    /// Subscribed before the first reconcile; handed to the first subscriber so that events
    /// found while opening (thresholds that fired while we were away) are not lost.
    first_events: Mutex<Option<broadcast::Receiver<EngineEvent>>>,
    /// Freezes mounted filesystems around snapshots (set by the Node service).
    quiesce: std::sync::OnceLock<Arc<dyn Quiesce>>,
    /// Knows the filesystems mounted on volumes (set by the Node service).
    mounts: std::sync::OnceLock<Arc<dyn MountedFilesystems>>,
    /// What the engine counts for its metrics.
    metrics: EngineCounters,
}

/// The engine. Dropping it stops supervision but leaves the daemon, its graph and every export
/// running: a restarted plugin adopts them.
#[derive(Debug)]
pub struct Engine {
    core: Arc<EngineCore>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Deref for Engine {
    type Target = EngineCore;
    fn deref(&self) -> &EngineCore {
        &self.core
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl Engine {
    /// A shared handle to the engine's state, for work that outlives a borrow (clone tasks).
    pub fn core_arc(&self) -> Arc<EngineCore> {
        self.core.clone()
    }

    /// Opens the pools and the journal, connects to (or starts) the daemon and reconciles.
    pub async fn open(config: EngineConfig) -> Result<Engine> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [config.state_dir.clone(), config.state_dir.join("exports")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io("create state directory", &dir, e))?;
        }
        let mut pools = BTreeMap::new();
        for p in &config.pools {
            report_pool(p).await;
            pools.insert(p.name.clone(), Arc::new(Pool::open(&p.path, p.name.clone(), p.kind)?));
        }
        crate::fault::arm_from_env();
        let journal = journal::Journal::open(config.state_dir.join("attachments"))?;
        let operations = ops::Operations::open(config.state_dir.join("operations"))?;
        let (daemon, origin) = Daemon::connect(config.daemon.clone()).await?;
        // Subscribe before reconciling so that no threshold event is lost in between.
        let events_rx = daemon.qmp().subscribe();
        let (events, first_events) = broadcast::channel(1024);
        let core = Arc::new(EngineCore {
            config,
            daemon,
            pools,
            journal,
            operations,
            unreconciled: reconcile::Unreconciled::default(),
            busy: Claims::default(),
            graph: GraphGate::default(),
            events,
            first_events: Mutex::new(Some(first_events)),
            quiesce: std::sync::OnceLock::new(),
            mounts: std::sync::OnceLock::new(),
            metrics: EngineCounters::default(),
        });
        core.reconcile(origin).await?;
        core.sweep_copies();
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&core), events_rx));
        Ok(Engine { core, supervisor })
    }
}

/// `pool check` in report mode (records and references; images are not opened) before the
/// pool opens: what it finds is logged, and what opening collects (a local pool's images and
/// layers nothing uses) is collected then.
async fn report_pool(pool: &PoolConfig) {
    use crate::pool::check::{check, Depth};
    match check(&pool.path, pool.kind, Depth::Records).await {
        Ok(report) => {
            for finding in &report.findings {
                tracing::warn!(pool = pool.name.as_str(), %finding, repairable = finding.repairable(), "pool check at start-up");
            }
        }
        Err(e) => {
            tracing::warn!(pool = pool.name.as_str(), error = %e.with_causes(), "pool check at start-up could not run")
        }
    }
}

/// How long the supervisor waits before reconciling again what a reconcile left untidied; the
/// wait doubles, up to [`RETRY_RECONCILE_MAX`], while something stays untidied.
const RETRY_RECONCILE: Duration = Duration::from_secs(5);
const RETRY_RECONCILE_MAX: Duration = Duration::from_secs(60);

async fn supervise(core: Weak<EngineCore>, mut events: mpsc::UnboundedReceiver<Event>) {
    let mut retry_in = RETRY_RECONCILE;
    loop {
        loop {
            let retry = core.upgrade().is_some_and(|c| !c.unreconciled.is_empty());
            if !retry {
                retry_in = RETRY_RECONCILE;
            }
            let next = async {
                if retry {
                    tokio::time::timeout(retry_in, events.recv()).await.ok()
                } else {
                    Some(events.recv().await)
                }
            };
            match next.await {
                Some(Some(event)) => {
                    let Some(core) = core.upgrade() else { return };
                    core.handle_event(event).await;
                }
                Some(None) => break, // the connection ended
                None => {
                    let Some(core) = core.upgrade() else { return };
                    if let Err(e) = core.reconcile(Origin::Adopted).await {
                        tracing::error!(error = %e.with_causes(), "reconciling again failed");
                    }
                    retry_in = (retry_in * 2).min(RETRY_RECONCILE_MAX);
                }
            }
        }
        tracing::warn!("lost the connection to qemu-storage-daemon; recovering");
        let mut delay = Duration::from_millis(100);
        loop {
            let Some(core) = core.upgrade() else { return };
            let recovered = async {
                let origin = core.daemon.reconnect().await?;
                let rx = core.daemon.qmp().subscribe();
                core.reconcile(origin).await?;
                Ok::<_, Error>(rx)
            }
            .await;
            match recovered {
                Ok(rx) => {
                    events = rx;
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "recovering the daemon failed; retrying");
                    drop(core);
                    tokio::time::sleep(delay).await; // retry backoff
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Who may change the daemon's node graph: every operation that adds or removes nodes holds it
/// shared, a reconcile holds it exclusive, so a reconcile never sees (and sweeps away) the
/// half-built graph of an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct GraphGate(Arc<RwLock<()>>);

/// Held while an operation changes the graph (see [`GraphGate`]).
pub type GraphChange = tokio::sync::OwnedRwLockReadGuard<()>;

impl GraphGate {
    /// Waits until no reconcile runs; holds others off a reconcile while it lives.
    pub async fn change(&self) -> GraphChange {
        self.0.clone().read_owned().await
    }

    /// Waits until no operation changes the graph; holds them off while it lives.
    pub async fn reconcile(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.0.clone().write_owned().await
    }
}

/// The claim an engine operation holds on the objects it touches (see [`crate::claims`]).
pub type Guard = crate::claims::Claim;

impl EngineCore {
    /// This engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The daemon connection.
    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    /// Subscribes to engine events. The first subscriber also receives every event since the
    /// engine opened, including those of its initial reconcile.
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        let first = self.first_events.lock().unwrap_or_else(|p| p.into_inner()).take();
        first.unwrap_or_else(|| self.events.subscribe())
    }

    /// Hands the engine what freezes mounted filesystems around snapshots (the Node service,
    /// which knows the mounts). Only the first call counts.
    pub fn set_quiesce(&self, quiesce: Arc<dyn Quiesce>) {
        let _ = self.quiesce.set(quiesce);
    }

    /// Hands the engine what knows the filesystems mounted on volumes (the Node service). Only
    /// the first call counts.
    pub fn set_mounts(&self, mounts: Arc<dyn MountedFilesystems>) {
        let _ = self.mounts.set(mounts);
    }

    /// What the engine has counted since it started.
    pub fn counters(&self) -> &EngineCounters {
        &self.metrics
    }

    /// Whether the daemon answers on our monitor now (false while it is being recovered).
    pub async fn daemon_answers(&self) -> bool {
        self.daemon.qmp().call(&crate::qmp::commands::QueryVersion {}).await.is_ok()
    }

    /// The daemon's QEMU version, `major.minor.micro`.
    pub fn qemu_version(&self) -> String {
        let qemu = self.daemon.version().qemu;
        format!("{}.{}.{}", qemu.major, qemu.minor, qemu.micro)
    }

    /// A pool by name (a shared pool with what other nodes wrote taken in).
    pub fn pool(&self, name: &PoolName) -> Result<Arc<Pool>> {
        let pool = self
            .pools
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound { what: "pool", id: name.to_string() })?;
        pool.refresh()?;
        Ok(pool)
    }

    /// The pool a request names as a parameter (a new volume's, a capacity query's): one this
    /// node does not have is a bad argument, where a pool inside an ID names nothing we hold
    /// ([`EngineCore::pool`]: NOT_FOUND).
    pub fn requested_pool(&self, name: &PoolName) -> Result<Arc<Pool>> {
        match self.pool(name) {
            Err(Error::NotFound { what: "pool", .. }) => {
                let known: Vec<&str> = self.pools.keys().map(PoolName::as_str).collect();
                Err(Error::invalid(
                    "pool",
                    format!(
                        "node {} has no pool {name:?} (it has {known:?})",
                        self.config.node.as_str()
                    ),
                ))
            }
            other => other,
        }
    }

    /// Every pool (shared ones refreshed).
    pub fn pools(&self) -> Result<Vec<Arc<Pool>>> {
        let pools: Vec<Arc<Pool>> = self.pools.values().cloned().collect();
        for pool in &pools {
            pool.refresh()?;
        }
        Ok(pools)
    }

    fn lock(&self, keys: Vec<String>) -> Result<Guard> {
        self.busy.take(keys).map_err(|id| Error::Busy { id })
    }

    /// The node a volume is attached on: this one if journaled here, else (shared pools) the
    /// node its owner record names.
    fn node_holding(&self, pool: &Pool, record: &VolumeRecord) -> Result<Option<NodeName>> {
        if self.journal.get(record.uid).is_some() {
            return Ok(Some(self.config.node.clone()));
        }
        pool.owner(&record.name)
    }

    /// Refuses to change a shared pool's volume that another node has attached: that node's
    /// daemon holds it open, so the work is that node's (the controller routes it there).
    fn held_here(&self, pool: &Pool, record: &VolumeRecord, id: &ObjectId) -> Result<()> {
        match self.node_holding(pool, record)? {
            Some(owner) if owner != self.config.node => Err(Error::FailedPrecondition(format!(
                "volume {id} is attached on node {owner}; that node serves it"
            ))),
            _ => Ok(()),
        }
    }

    /// A volume's pool and layer chain (head first), for inspection.
    pub fn volume_chain(&self, id: &ObjectId) -> Result<(Arc<Pool>, Vec<crate::pool::LayerId>)> {
        let (pool, _, record) = self.resolve_volume(id)?;
        let chain = pool.chain(record.head)?;
        Ok((pool, chain))
    }

    fn key(kind: IdKind, pool: &Pool, name: &ObjectName) -> String {
        let prefix = match kind {
            IdKind::Volume => "vol",
            IdKind::Snapshot => "snap",
            IdKind::Group => "group",
        };
        format!("{prefix}/{}/{name}", pool.name().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::PoolKind;

    #[test]
    fn pools_parse_as_name_equals_path_with_an_optional_shared_flag() {
        let p = PoolConfig::parse_spec("fast=/srv/fast").expect("local");
        assert_eq!((p.name.as_str(), p.kind), ("fast", PoolKind::Local));
        let p = PoolConfig::parse_spec("nfs=/mnt/nfs/qsd,shared").expect("shared");
        assert_eq!((p.path, p.kind), (std::path::PathBuf::from("/mnt/nfs/qsd"), PoolKind::Shared));
        for bad in ["no-equals", "Bad=/x", "p=", "p=,shared"] {
            assert!(PoolConfig::parse_spec(bad).is_err(), "{bad}");
        }
    }
}
