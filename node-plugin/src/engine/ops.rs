//! The operation journal: what a multi-command operation in flight set out to do, so that one
//! killed half-way is completed or undone at the next start.
//!
//! ```text
//!   begin: intent written (fsync) ─► daemon commands, image files, records ─► intent removed
//!                   │ killed anywhere in between
//!                   ▼
//!   next start (reconcile): block jobs cancelled ─► each intent: past its point of no return?
//!                                                    yes: complete it   no: undo it
//! ```
//! Each operation has one point of no return, where its effect became visible to a reader:
//!
//! | operation | point of no return | how recovery tells |
//! |---|---|---|
//! | snapshot (one or a group) | the attached volumes switched onto their overlays (one QMP `transaction`); offline, every head record written | the overlay node's `backing` edge in the daemon's graph; the records |
//! | new volume (empty, restore, clone) | its volume record written | the record |
//! | expansion | the image header grown | the header |
//! | chain shortening | the child's header rewritten onto the new base | the header |
//! | a copy between nodes (either side) | none: always undone | — |
//!
//! Intents live in `<state>/operations/`, one JSON file each, written atomically. An operation
//! that fails in-process undoes its own work and drops its intent; only a killed one leaves it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::EngineCore;
use crate::error::{Error, Result};
use crate::graph::{self, Names};
use crate::pool::{
    header, store, LayerId, ObjectName, Pool, PoolName, SnapshotRecord, VolumeRecord,
};
use crate::qmp::block_graph::BlockGraph;
use crate::qsd::Origin;

/// One volume moving onto a new overlay, as a snapshot intent records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchIntent {
    /// The volume's pool.
    pub pool: PoolName,
    /// The volume's name.
    pub volume: ObjectName,
    /// The volume's uid (names its attached nodes).
    pub uid: LayerId,
    /// Its head before: the snapshot's layer.
    pub head: LayerId,
    /// The new, empty head.
    pub overlay: LayerId,
    /// It was attached here: the switch happens in the daemon.
    pub attached: bool,
    /// The snapshot's name; `None` for a linked clone's source.
    pub snapshot: Option<ObjectName>,
    /// The volume's size (the snapshot's).
    pub size: u64,
}

/// What an operation set out to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Operation {
    /// Snapshots taken at one instant (a group, a single snapshot, a linked clone's source).
    Snapshot {
        /// The group's name, for a group snapshot.
        group: Option<ObjectName>,
        /// The volumes.
        items: Vec<SwitchIntent>,
    },
    /// A new volume whose head image is being made (empty, restored, linked or copied).
    NewVolume {
        /// The pool.
        pool: PoolName,
        /// The volume's name.
        name: ObjectName,
        /// Its head layer.
        head: LayerId,
    },
    /// A volume growing to `size`.
    Expand {
        /// The pool.
        pool: PoolName,
        /// The volume's name.
        name: ObjectName,
        /// The new size.
        size: u64,
        /// Its head layer.
        head: LayerId,
    },
    /// `layer` leaving a chain: `child` (the layer above it) is rebased onto `base`.
    Shorten {
        /// The pool.
        pool: PoolName,
        /// The layer above the one that goes.
        child: LayerId,
        /// The layer that goes.
        layer: LayerId,
        /// What `child` is backed by afterwards.
        base: Option<LayerId>,
    },
    /// One side of a copy between nodes: what it made outside the pool's records.
    Copy(super::copy::CopyLeftovers),
}

/// The journal's directory.
#[derive(Debug)]
pub(super) struct Operations {
    dir: PathBuf,
}

/// An operation's intent on disk; removed when dropped (the operation finished, or undid its
/// own work). A killed process drops nothing, so the intent stays for recovery.
#[derive(Debug)]
pub(super) struct Intent {
    dir: PathBuf,
    file: String,
}

impl Drop for Intent {
    fn drop(&mut self) {
        if let Err(e) = store::remove(&self.dir, &self.file) {
            tracing::warn!(error = %e.with_causes(), "removing an operation's intent");
        }
    }
}

impl Operations {
    /// The journal in `dir`, created if missing.
    pub(super) fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io("create operation journal", &dir, e))?;
        Ok(Operations { dir })
    }

    /// Records that `op` begins.
    pub(super) fn begin(&self, op: Operation) -> Result<Intent> {
        let file = format!("{}.json", LayerId::random());
        store::write_json(&self.dir, &file, &op)?;
        Ok(Intent { dir: self.dir.clone(), file })
    }

    /// Every intent left, with its file name.
    fn all(&self) -> Result<Vec<(String, Operation)>> {
        let mut all = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io("list", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let bytes =
                std::fs::read(entry.path()).map_err(|e| Error::io("read", entry.path(), e))?;
            match serde_json::from_slice(&bytes) {
                Ok(op) => all.push((name, op)),
                Err(source) => {
                    return Err(Error::Metadata { path: entry.path(), source });
                }
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

impl EngineCore {
    /// Completes or undoes every operation a killed process left. Jobs must be settled first
    /// (a cancelled job changed nothing). Returns what could not be recovered: those intents
    /// stay for the next reconcile.
    pub(super) async fn recover_operations(
        &self,
        graph: &BlockGraph,
        origin: Origin,
    ) -> Vec<(String, Error)> {
        let intents = match self.operations.all() {
            Ok(all) => all,
            Err(e) => return vec![("operation journal".into(), e)],
        };
        let mut failed = Vec::new();
        for (file, op) in intents {
            tracing::warn!(?op, "recovering an operation interrupted by a restart");
            match self.recover(graph, origin, &op).await {
                Ok(()) => {
                    if let Err(e) = store::remove(&self.operations.dir, &file) {
                        failed.push((file, e));
                    }
                }
                Err(e) => {
                    tracing::error!(?op, error = %e.with_causes(), "recovering an operation failed; will retry");
                    failed.push((file, e));
                }
            }
        }
        failed
    }

    async fn recover(&self, graph: &BlockGraph, origin: Origin, op: &Operation) -> Result<()> {
        match op {
            Operation::Snapshot { group, items } => {
                self.recover_snapshot(graph, origin, group, items).await
            }
            Operation::Copy(leftovers) => self.recover_copy(leftovers).await,
            Operation::NewVolume { pool, name, head } => {
                let pool = self.pool(pool)?;
                if pool.volume(name).is_some_and(|v| v.head == *head) {
                    return Ok(()); // recorded: complete
                }
                discard_layer(&pool, *head)
            }
            Operation::Expand { pool, name, size, head } => {
                let pool = self.pool(pool)?;
                let Some(record) = pool.volume(name).filter(|v| v.head == *head) else {
                    return Ok(());
                };
                let grown = header::read(&pool.layer_path(*head))?.size;
                if grown >= *size && record.size < grown {
                    pool.put_volume(VolumeRecord { size: grown, ..record })?;
                }
                Ok(())
            }
            Operation::Shorten { pool, child, layer, base } => {
                let pool = self.pool(pool)?;
                let rebased = header::read(&pool.layer_path(*child))?.backing
                    == base.map(Pool::layer_file_name);
                let recorded = pool.layer(*child).is_some_and(|l| l.backing == *base);
                if rebased && !recorded {
                    pool.set_backing(*child, *base)?;
                    pool.release(*layer)?;
                }
                Ok(())
            }
        }
    }

    /// A snapshot is complete once its attached volumes switched (the transaction is atomic:
    /// all or none did) or, with none attached, once every head record names the overlay.
    async fn recover_snapshot(
        &self,
        graph: &BlockGraph,
        origin: Origin,
        group: &Option<ObjectName>,
        items: &[SwitchIntent],
    ) -> Result<()> {
        let mut current = Vec::new();
        for item in items {
            let pool = self.pool(&item.pool)?;
            let record = pool.volume(&item.volume);
            current.push((pool, record));
        }
        let seen: Vec<SwitchSeen> = items
            .iter()
            .zip(&current)
            .map(|(item, (_, record))| {
                let names = Names::new(item.uid.to_string());
                SwitchSeen {
                    in_daemon: item.attached && origin == Origin::Adopted,
                    switched: graph.child(&names.format(item.overlay), "backing")
                        == Some(names.format(item.head)),
                    head_recorded: record.as_ref().is_some_and(|r| r.head == item.overlay),
                }
            })
            .collect();
        let complete = snapshot_passed_its_point(&seen);
        let qmp = self.daemon.qmp();
        for (item, (pool, record)) in items.iter().zip(current) {
            let Some(record) = record else {
                discard_layer(&pool, item.overlay)?;
                continue;
            };
            if complete {
                if record.head == item.head {
                    pool.put_volume(VolumeRecord { head: item.overlay, ..record.clone() })?;
                }
                if let Some(name) = item.snapshot.as_ref().filter(|n| pool.snapshot(n).is_none()) {
                    pool.put_snapshot(SnapshotRecord {
                        name: name.clone(),
                        source_volume: item.volume.clone(),
                        layer: item.head,
                        size: item.size,
                        created_unix: now_unix(),
                        group: group.clone(),
                    })?;
                }
                if let Some(threshold) = self.journal.get(item.uid).and_then(|a| a.threshold) {
                    let names = Names::new(item.uid.to_string());
                    graph::arm_write_threshold(&qmp, &names, item.overlay, threshold.armed_at)
                        .await?;
                }
            } else {
                if item.attached {
                    let names = Names::new(item.uid.to_string());
                    graph::delete_node_if_owned(&qmp, &names.format(item.overlay)).await?;
                }
                if record.head == item.overlay {
                    pool.put_volume(VolumeRecord { head: item.head, ..record })?;
                }
                discard_layer(&pool, item.overlay)?;
            }
        }
        Ok(())
    }
}

/// What recovery sees of one volume of an interrupted snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SwitchSeen {
    /// It was attached and the daemon that ran the operation still runs: whether it switched
    /// is in that daemon's graph. (A daemon started afresh knows nothing of it.)
    in_daemon: bool,
    /// The daemon's graph has its overlay over its old head.
    switched: bool,
    /// Its record names the overlay as its head.
    head_recorded: bool,
}

/// Whether an interrupted snapshot passed its point of no return. Where the daemon that ran it
/// still runs, its graph decides for the attached volumes: their one `transaction` switched all
/// or none (the head records are written just before it, so a recorded head alone proves
/// nothing, and completing an unswitched volume would leave it writing to its snapshot). Else
/// the head records decide, and only all of them complete it: written before the transaction,
/// they name overlays that either received every write since the switch or, never switched
/// to, are empty and read the same as the old heads — completing is safe either way, and
/// undoing could drop writes a dead daemon took after the switch.
fn snapshot_passed_its_point(seen: &[SwitchSeen]) -> bool {
    if seen.iter().any(|s| s.in_daemon) {
        seen.iter().any(|s| s.in_daemon && s.switched)
    } else {
        seen.iter().all(|s| s.head_recorded)
    }
}

/// Removes a layer an undone operation made: its record if nothing refers to it, and its image.
fn discard_layer(pool: &Pool, layer: LayerId) -> Result<()> {
    if pool.layer(layer).is_some() {
        let refs = pool.referrers(layer);
        if refs.volumes + refs.snapshots + refs.children.len() > 0 {
            return Ok(()); // something came to need it: keep it
        }
        pool.release(layer)?;
    }
    store::remove(&pool.root().join("layers"), &Pool::layer_file_name(layer))
}

/// Seconds since the epoch.
pub(super) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> ObjectName {
        ObjectName::parse(name).expect("name")
    }

    fn pool(name: &str) -> PoolName {
        PoolName::parse(name).expect("pool")
    }

    #[test]
    fn an_intent_is_on_disk_while_it_lives_and_gone_once_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ops = Operations::open(dir.path().join("operations")).expect("open");
        let op = Operation::NewVolume { pool: pool("p"), name: n("v"), head: LayerId::random() };
        let intent = ops.begin(op.clone()).expect("begin");
        let left = ops.all().expect("list");
        assert_eq!(left.iter().map(|(_, o)| o.clone()).collect::<Vec<_>>(), vec![op]);
        drop(intent);
        assert!(ops.all().expect("list").is_empty());
    }

    #[test]
    fn a_snapshot_is_completed_only_past_its_point_of_no_return() {
        let seen =
            |in_daemon, switched, head_recorded| SwitchSeen { in_daemon, switched, head_recorded };
        let table: [(&str, Vec<SwitchSeen>, bool); 9] = [
            ("attached, the daemon died too, heads recorded", vec![seen(false, false, true)], true),
            (
                "attached, the daemon died too, before the records",
                vec![seen(false, false, false)],
                false,
            ),
            ("attached, switched", vec![seen(true, true, true)], true),
            (
                "attached, heads recorded but killed before the transaction",
                vec![seen(true, false, true)],
                false,
            ),
            ("attached, killed before its head record", vec![seen(true, false, false)], false),
            ("detached, head recorded", vec![seen(false, false, true)], true),
            ("detached, killed before its head record", vec![seen(false, false, false)], false),
            (
                "a detached group, one head of two recorded",
                vec![seen(false, false, true), seen(false, false, false)],
                false,
            ),
            (
                "a mixed group: the transaction decides",
                vec![seen(true, true, true), seen(false, false, true)],
                true,
            ),
        ];
        for (what, seen, complete) in table {
            assert_eq!(snapshot_passed_its_point(&seen), complete, "{what}");
        }
    }

    #[test]
    fn an_intent_reads_back_as_written() {
        let item = SwitchIntent {
            pool: pool("p"),
            volume: n("v"),
            uid: LayerId::random(),
            head: LayerId::random(),
            overlay: LayerId::random(),
            attached: true,
            snapshot: Some(n("s")),
            size: 1 << 30,
        };
        let op = Operation::Snapshot { group: Some(n("g")), items: vec![item] };
        let json = serde_json::to_string(&op).expect("json");
        assert!(json.contains("\"op\":\"snapshot\""), "{json}");
        assert_eq!(serde_json::from_str::<Operation>(&json).expect("parse"), op);
    }
}
