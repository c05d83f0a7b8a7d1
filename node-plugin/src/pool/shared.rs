//! Shared pools: many nodes write one pool. Every record write bumps the pool's generation under
//! an exclusive `flock`; a refresh rescans the record directories only when another writer
//! moved the generation, and applies only what changed; owner records name the node whose
//! daemon holds a volume open.

use super::{
    store, LayerId, LayerRecord, NodeName, ObjectName, OwnerRecord, Pool, PoolKind, SnapshotRecord,
    VolumeRecord,
};
use crate::error::{Error, Result};

/// `<pool>/generation` in a shared pool: a counter every record write bumps, under an
/// exclusive `flock` on the file held until the record is written. A node whose index matched
/// the generation before its own write still matches after it, so a refresh that finds the
/// generation it knows skips the scan: a pool only this node writes is never rescanned, and a
/// scan happens once per change by another node.
pub(super) const GENERATION: &str = "generation";

#[derive(Debug, Default)]
pub(super) struct Scans {
    volumes: store::DirScan,
    snapshots: store::DirScan,
    layers: store::DirScan,
}

/// Hands a scan's changes to one kind of record to `change`, keyed as `key` reads a file stem:
/// the record read, or `None` for a file removed.
pub(super) fn apply<K, V>(
    changes: store::Changes<V>,
    key: impl Fn(&str) -> Option<K>,
    mut change: impl FnMut(K, Option<V>),
) {
    for stem in changes.removed {
        if let Some(k) = key(&stem) {
            change(k, None);
        }
    }
    for (stem, record) in changes.changed {
        if let Some(k) = key(&stem) {
            change(k, Some(record));
        }
    }
}

impl Pool {
    /// Shared pools: takes in what other nodes wrote since the last refresh. Nothing is read
    /// when the pool's generation is the one the index matches; otherwise each record
    /// directory is listed and only records whose file changed are read ([`store::DirScan`]).
    /// Volumes and snapshots are scanned before layers: writers record a layer before what
    /// refers to it, so a new volume's head is found in the same refresh. Local pools have one
    /// writer, this engine, and keep their index.
    pub fn refresh(&self) -> Result<()> {
        if self.kind == PoolKind::Local {
            return Ok(());
        }
        super::blocking(|| self.refresh_shared())
    }

    fn refresh_shared(&self) -> Result<()> {
        // Most refreshes find the generation the index already matches: that is known from
        // the counter alone, without excluding this process's writers.
        // The counter is read (its lock released) before the known value is locked: a record
        // write holds the counter's lock while it takes the known value.
        let current = self.current_generation()?;
        if *self.known_generation() == Some(current) {
            return Ok(());
        }
        self.rescan()
    }

    /// The scan itself, excluding this process's record writes (see [`Pool::refresh`]).
    fn rescan(&self) -> Result<()> {
        let _exclusive = self.writes.write().unwrap_or_else(|p| p.into_inner());
        // Read again under the lock, and before the scan: a write during the scan bumps it
        // again and the next refresh scans once more.
        let current = self.current_generation()?;
        let mut known = self.known_generation();
        if *known == Some(current) {
            return Ok(()); // a refresh that held the lock before this one took it all in
        }
        let mut scans = self.scans.lock().unwrap_or_else(|p| p.into_inner());
        let volumes = scans.volumes.scan::<VolumeRecord>(&self.root.join("volumes"))?;
        let snapshots = scans.snapshots.scan::<SnapshotRecord>(&self.root.join("snapshots"))?;
        let layers = scans.layers.scan::<LayerRecord>(&self.layers_dir())?;
        // Records are stored under their key: a volume's or snapshot's name, a layer's id.
        let mut index = self.index();
        let name = |stem: &str| ObjectName::parse(stem).ok();
        apply(volumes, name, |k, record| match record {
            Some(v) => index.put_volume(k, v),
            None => drop(index.remove_volume(&k)),
        });
        apply(snapshots, name, |k, record| match record {
            Some(s) => index.put_snapshot(k, s),
            None => drop(index.remove_snapshot(&k)),
        });
        apply(
            layers,
            |stem| LayerId::parse(stem).ok(),
            |k, record| match record {
                Some(l) => index.put_layer(k, l),
                None => drop(index.remove_layer(&k)),
            },
        );
        *known = Some(current);
        Ok(())
    }

    /// The generation the index is known to match.
    fn known_generation(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool's generation now, read under a shared `flock` (a writer rewrites it in place
    /// under an exclusive one).
    fn current_generation(&self) -> Result<u64> {
        let file = self.generation_file()?;
        file.lock_shared().map_err(|e| Error::io("lock", self.root.join(GENERATION), e))?;
        self.read_generation(&file)
    }

    /// Opened for each use: `flock` excludes open files, so threads of this process exclude
    /// each other only through files of their own.
    pub(super) fn generation_file(&self) -> Result<std::fs::File> {
        let path = self.root.join(GENERATION);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))
    }

    /// The counter in the generation file (0 while it is empty or unreadable as a number, which
    /// a writer then replaces).
    pub(super) fn read_generation(&self, file: &std::fs::File) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut bytes = [0u8; 20];
        let n = file
            .read_at(&mut bytes, 0)
            .map_err(|e| Error::io("read", self.root.join(GENERATION), e))?;
        Ok(std::str::from_utf8(&bytes[..n]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0))
    }

    /// Runs `write` (a record's file and its index entry) as one write to the pool: under this
    /// process's shared write lock and, for shared pools, with the generation bumped under an
    /// exclusive lock on its file held until `write` is done.
    pub(super) fn write_record<R>(&self, write: impl FnOnce() -> Result<R>) -> Result<R> {
        super::blocking(|| self.write_record_here(write))
    }

    fn write_record_here<R>(&self, write: impl FnOnce() -> Result<R>) -> Result<R> {
        let _local = self.writes.read().unwrap_or_else(|p| p.into_inner());
        if self.kind == PoolKind::Local {
            return write();
        }
        use std::os::unix::fs::FileExt;
        let path = self.root.join(GENERATION);
        let file = self.generation_file()?;
        file.lock().map_err(|e| Error::io("lock", &path, e))?;
        let before = self.read_generation(&file)?;
        let after = before.wrapping_add(1);
        // Fixed width, so the counter is rewritten in place without a truncation.
        file.write_all_at(format!("{after:020}").as_bytes(), 0)
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::io("write", &path, e))?;
        let result = write();
        let mut known = self.known_generation();
        if result.is_ok() && *known == Some(before) {
            *known = Some(after);
        }
        result
    }

    /// Shared pools: records that `node` holds volume `name` attached.
    pub fn set_owner(&self, name: &ObjectName, node: &NodeName) -> Result<()> {
        if self.kind == PoolKind::Local {
            return Ok(());
        }
        let record = OwnerRecord { node: node.clone() };
        let dir = self.root.join("owners");
        super::blocking(|| store::write_json(&dir, &format!("{name}.json"), &record))
    }

    /// Shared pools: removes the owner record of volume `name` if it names `node`.
    pub fn clear_owner(&self, name: &ObjectName, node: &NodeName) -> Result<()> {
        if self.owner(name)?.is_some_and(|owner| owner == *node) {
            let dir = self.root.join("owners");
            super::blocking(|| store::remove(&dir, &format!("{name}.json")))?;
        }
        Ok(())
    }

    /// Shared pools: the volumes whose owner record names `node`.
    pub fn owned_by(&self, node: &NodeName) -> Result<Vec<ObjectName>> {
        if self.kind == PoolKind::Local {
            return Ok(Vec::new());
        }
        super::blocking(|| self.owned_here(node))
    }

    fn owned_here(&self, node: &NodeName) -> Result<Vec<ObjectName>> {
        let dir = self.root.join("owners");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let stem = file.strip_suffix(".json").filter(|_| !file.starts_with('.'));
            // A file whose stem is no name is none of ours (a record is named by its volume).
            let Some(name) = stem.and_then(|s| ObjectName::parse(s).ok()) else { continue };
            if self.owner(&name)?.is_some_and(|owner| owner == *node) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Shared pools: the node volume `name` is attached on, read from disk now.
    pub fn owner(&self, name: &ObjectName) -> Result<Option<NodeName>> {
        if self.kind == PoolKind::Local {
            return Ok(None);
        }
        let path = self.root.join("owners").join(format!("{name}.json"));
        match super::blocking(|| std::fs::read(&path)) {
            Ok(bytes) => {
                let record: OwnerRecord = serde_json::from_slice(&bytes)
                    .map_err(|source| Error::Metadata { path, source })?;
                Ok(Some(record.node))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }
}
