//! Pools, layers and their metadata.
//!
//! ```text
//!   <pool>/pool.json                 name and kind
//!   <pool>/layers/<layer>.qcow2      one qcow2 image per layer; backing names are relative
//!   <pool>/layers/<layer>.json       the layer record: its backing layer and size
//!   <pool>/volumes/<name>.json       a volume: its active (head) layer, size, QoS, limits
//!   <pool>/snapshots/<name>.json     a snapshot: the immutable layer it pins
//!   <pool>/owners/<name>.json        shared pools: the node a volume is attached on
//! ```
//!
//! A shared pool is written by every node that mounts it, so its index takes in the records that
//! changed on disk whenever the engine resolves an object in it ([`Pool::refresh`]: a listing and
//! a `stat` per record, a read only of what changed), and an owner record
//! names the node whose daemon holds an attached volume open: the controller routes that
//! volume's requests there, and other nodes refuse to delete it.
//!
//! The records on disk are the source of truth; the in-memory index is rebuilt from them when the
//! pool opens. A layer's reference count is *derived*: volumes whose head it is, snapshots that
//! pin it, and layers backed by it. A layer file is deleted only when that count reaches zero,
//! then its backing layer is considered in turn. Records are written after the file they describe
//! exists and removed before it, so a crash leaves at worst an unreferenced layer, which
//! [`Pool::open`] collects.
//!
//! Synchronisation, always taken in this order (a path may skip any, and never takes one while
//! it holds a later one):
//! `writes` (shared by a record write, exclusive for a rescan of a shared pool) → the
//! generation file's `flock` (exclusive while a write bumps the counter and writes its
//! record, shared for a moment to read it) → `generation` → `scans` → `index`, each of those
//! three a short critical section. A refresh reads the counter under no lock of this process
//! and compares it with `generation` before it takes anything exclusive: on a pool no other
//! node changed, requests never queue behind one another or behind a record write of this
//! process. The pool's file I/O is blocking (fsync, `flock`, directory scans, unlinks, possibly
//! over NFS) and runs through [`blocking`], off the async workers: in place, the worker handing
//! its other tasks to another thread first. A worker that blocked in place may later exit, so
//! children tied to the plugin's life (`PR_SET_PDEATHSIG` follows the thread that started them)
//! are started from one thread that never exits (`command::spawn_tied`).
//!
//! By job: `records.rs` is the schema on disk, `index.rs` the in-memory index and the one
//! derivation of reference counts, `shared.rs` the coordination of nodes writing one pool
//! (generation, refresh, owner records), and this file the pool's operations over them.

pub mod check;
pub mod header;
pub mod id;
mod index;
mod records;
mod shared;
pub mod source;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use crate::error::{Error, Result};
pub use id::{LayerId, NodeName, ObjectName, PoolName};
use index::Index;
pub use index::Referrers;
pub use records::{LayerRecord, OwnerRecord, PoolInfo, PoolKind, SnapshotRecord, VolumeRecord};
use shared::{Scans, GENERATION};
pub use source::RecordedSource;

/// How long an image or record of a shared pool must have sat unchanged before it counts as
/// left over: another node may be between writing an image and the record that names it.
pub(crate) const SHARED_LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// An open pool.
#[derive(Debug)]
pub struct Pool {
    name: PoolName,
    kind: PoolKind,
    root: PathBuf,
    index: Mutex<Index>,
    /// Shared pools: what the last scan of each record directory saw.
    scans: Mutex<Scans>,
    /// Shared pools: the pool's generation the index is known to match (`None`: not yet).
    generation: Mutex<Option<u64>>,
    /// Held shared by every record write (file and index together) and exclusively by a
    /// refresh, so a refresh never applies a listing taken before one of this process's writes
    /// over that write.
    writes: RwLock<()>,
}

impl Pool {
    /// Opens (creating if needed) the pool at `root`, loads its records and collects garbage
    /// left by an interrupted operation.
    pub fn open(root: &Path, name: PoolName, kind: PoolKind) -> Result<Pool> {
        for dir in ["layers", "volumes", "snapshots"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|e| Error::io("create pool directory", &path, e))?;
        }
        let info_path = root.join("pool.json");
        if info_path.exists() {
            let bytes = std::fs::read(&info_path).map_err(|e| Error::io("read", &info_path, e))?;
            let info: PoolInfo = serde_json::from_slice(&bytes)
                .map_err(|source| Error::Metadata { path: info_path.clone(), source })?;
            if info.name != name || info.kind != kind {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds pool {:?} ({:?}), not {:?} ({kind:?})",
                    root.display(),
                    info.name,
                    info.kind,
                    name.as_str()
                )));
            }
        } else {
            store::write_json(root, "pool.json", &PoolInfo { name: name.clone(), kind })?;
        }
        if kind == PoolKind::Shared {
            let generation = root.join(GENERATION);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&generation)
                .map_err(|e| Error::io("create", &generation, e))?;
            let owners = root.join("owners");
            std::fs::create_dir_all(&owners)
                .map_err(|e| Error::io("create pool directory", &owners, e))?;
        }
        let index = match kind {
            PoolKind::Local => Self::load(root)?,
            PoolKind::Shared => Index::default(),
        };
        let pool = Pool {
            name,
            kind,
            root: root.to_owned(),
            index: Mutex::new(index),
            scans: Mutex::default(),
            generation: Mutex::default(),
            writes: RwLock::default(),
        };
        pool.refresh()?;
        pool.collect_garbage_at_open()?;
        Ok(pool)
    }

    /// A local pool's records, read once when it opens (this engine is their one writer, so
    /// temp files are interrupted writes and are swept).
    fn load(root: &Path) -> Result<Index> {
        let mut index = Index::default();
        for layer in store::read_all::<LayerRecord>(&root.join("layers"), true)? {
            index.put_layer(layer.id, layer);
        }
        for volume in store::read_all::<VolumeRecord>(&root.join("volumes"), true)? {
            index.put_volume(volume.name.clone(), volume);
        }
        for snapshot in store::read_all::<SnapshotRecord>(&root.join("snapshots"), true)? {
            index.put_snapshot(snapshot.name.clone(), snapshot);
        }
        Ok(index)
    }

    /// The pool's name.
    pub fn name(&self) -> &PoolName {
        &self.name
    }

    /// Local or shared.
    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// The pool's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// The file name of a layer, as written into its children's backing reference.
    pub fn layer_file_name(layer: LayerId) -> String {
        format!("{layer}.qcow2")
    }

    /// The path of a layer's image.
    pub fn layer_path(&self, layer: LayerId) -> PathBuf {
        self.layers_dir().join(Self::layer_file_name(layer))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A volume's record.
    pub fn volume(&self, name: &ObjectName) -> Option<VolumeRecord> {
        self.index().volumes().get(name).cloned()
    }

    /// A snapshot's record.
    pub fn snapshot(&self, name: &ObjectName) -> Option<SnapshotRecord> {
        self.index().snapshots().get(name).cloned()
    }

    /// The snapshots of group `group`.
    pub fn group_members(&self, group: &ObjectName) -> Vec<SnapshotRecord> {
        let mut members = self.snapshots();
        members.retain(|s| s.group.as_ref() == Some(group));
        members
    }

    /// A layer's record.
    pub fn layer(&self, id: LayerId) -> Option<LayerRecord> {
        self.index().layers().get(&id).cloned()
    }

    /// All volumes, by name.
    pub fn volumes(&self) -> Vec<VolumeRecord> {
        self.index().volumes().values().cloned().collect()
    }

    /// All snapshots, by name.
    pub fn snapshots(&self) -> Vec<SnapshotRecord> {
        self.index().snapshots().values().cloned().collect()
    }

    /// Every layer id with a record.
    pub fn layer_ids(&self) -> Vec<LayerId> {
        self.index().layers().keys().copied().collect()
    }

    /// The chain below and including `head`, top first.
    pub fn chain(&self, head: LayerId) -> Result<Vec<LayerId>> {
        let index = self.index();
        let mut chain = Vec::new();
        let mut next = Some(head);
        while let Some(id) = next {
            if chain.contains(&id) {
                return Err(Error::Inconsistent(format!(
                    "layer {id} appears twice in its own chain"
                )));
            }
            let record = index
                .layers()
                .get(&id)
                .ok_or_else(|| Error::Inconsistent(format!("layer {id} has no record")))?;
            chain.push(id);
            next = record.backing;
        }
        Ok(chain)
    }

    /// Who refers to `layer`.
    pub fn referrers(&self, layer: LayerId) -> Referrers {
        self.index().referrers(layer)
    }

    /// Removes a layer's record, then its image. Callers check the refcount first.
    fn delete_layer(&self, id: LayerId) -> Result<()> {
        let dir = self.layers_dir();
        self.write_record(|| {
            store::remove(&dir, &format!("{id}.json"))?;
            self.index().remove_layer(&id);
            Ok(())
        })?;
        blocking(|| store::remove(&dir, &Self::layer_file_name(id)))
    }

    /// Records a layer whose image now exists.
    pub fn put_layer(&self, record: LayerRecord) -> Result<()> {
        self.write_record(|| {
            store::write_json(&self.layers_dir(), &format!("{}.json", record.id), &record)?;
            self.index().put_layer(record.id, record);
            Ok(())
        })
    }

    /// Records (or replaces) a volume.
    pub fn put_volume(&self, record: VolumeRecord) -> Result<()> {
        self.write_record(|| {
            let name = format!("{}.json", record.name);
            store::write_json(&self.root.join("volumes"), &name, &record)?;
            self.index().put_volume(record.name.clone(), record);
            Ok(())
        })
    }

    /// Records (or replaces) a snapshot.
    pub fn put_snapshot(&self, record: SnapshotRecord) -> Result<()> {
        self.write_record(|| {
            let name = format!("{}.json", record.name);
            store::write_json(&self.root.join("snapshots"), &name, &record)?;
            self.index().put_snapshot(record.name.clone(), record);
            Ok(())
        })
    }

    /// Removes a volume's record, then every layer nobody refers to any more.
    pub fn remove_volume(&self, name: &ObjectName) -> Result<Vec<LayerId>> {
        let head = self.write_record(|| {
            store::remove(&self.root.join("volumes"), &format!("{name}.json"))?;
            Ok(self.index().remove_volume(name).map(|v| v.head))
        })?;
        head.map_or(Ok(Vec::new()), |h| self.release(h))
    }

    /// Removes a snapshot's record, then every layer nobody refers to any more.
    pub fn remove_snapshot(&self, name: &ObjectName) -> Result<Vec<LayerId>> {
        let layer = self.write_record(|| {
            store::remove(&self.root.join("snapshots"), &format!("{name}.json"))?;
            Ok(self.index().remove_snapshot(name).map(|s| s.layer))
        })?;
        layer.map_or(Ok(Vec::new()), |l| self.release(l))
    }

    /// Deletes `layer` and then its backing layers for as long as nothing refers to them.
    /// Returns the layers deleted.
    pub fn release(&self, layer: LayerId) -> Result<Vec<LayerId>> {
        let mut deleted = Vec::new();
        let mut next = Some(layer);
        while let Some(id) = next {
            let backing = {
                let index = self.index();
                if index.refcount(id) > 0 {
                    break;
                }
                match index.layers().get(&id) {
                    Some(record) => record.backing,
                    None => break,
                }
            };
            self.delete_layer(id)?;
            deleted.push(id);
            next = backing;
        }
        Ok(deleted)
    }

    /// Replaces a layer's backing pointer (after a stream or commit rewrote its header).
    pub fn set_backing(&self, id: LayerId, backing: Option<LayerId>) -> Result<()> {
        self.put_layer(LayerRecord { id, backing })
    }

    /// Deletes image files without records and records nobody refers to.
    fn collect_garbage_at_open(&self) -> Result<()> {
        let dir = self.layers_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".qcow2") else {
                continue;
            };
            let known =
                LayerId::parse(stem).is_ok_and(|id| self.index().layers().contains_key(&id));
            // In a shared pool another node may be creating this image right now; only images
            // that have sat without a record for an hour are leftovers.
            let settled = self.kind == PoolKind::Local
                || entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > SHARED_LEFTOVER_AGE));
            if !known && settled {
                tracing::warn!(pool = self.name.as_str(), file = %name, "removing an image with no record");
                store::remove(&dir, &name)?;
            }
        }
        if self.kind == PoolKind::Shared {
            // Another node may be between writing a layer record and the record that refers to
            // it; unreferenced records in shared pools wait for an owner-coordinated sweep.
            return Ok(());
        }
        loop {
            let orphans: Vec<LayerId> = {
                let index = self.index();
                index.layers().keys().copied().filter(|id| index.refcount(*id) == 0).collect()
            };
            if orphans.is_empty() {
                return Ok(());
            }
            for id in orphans {
                tracing::warn!(pool = self.name.as_str(), layer = %id, "removing an unreferenced layer");
                self.delete_layer(id)?;
            }
        }
    }
}

/// Runs the pool's blocking file work off the async workers: in place on a multi-threaded
/// runtime (the worker hands the tasks queued on it to another thread first), as a plain call
/// anywhere else (a current-thread runtime, a blocking thread, no runtime).
pub(crate) fn blocking<R>(work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests;
