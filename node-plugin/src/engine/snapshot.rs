//! Snapshots, single and grouped; restore and clone are in `clone`, chain shortening in
//! `shorten`.
//!
//! ```text
//!   before          after snapshot S          after restore R from S
//!   [H] ← volume    [H] ← S (immutable)       [H] ← S
//!                    ▲                         ▲  ▲
//!                   [N] ← volume (new head)   [N] [R'] ← volume R
//! ```
//! A snapshot is O(1): a new empty overlay becomes the volume's head (`blockdev-snapshot` when
//! attached) and the old head becomes the snapshot's immutable layer.

use std::sync::Arc;

use super::volume::Preallocation;
use super::EngineCore;
use crate::error::{Error, Result};
use crate::graph::{self, Names, NewImage, OverlaySwitch};
use crate::pool::id::IdKind;
use crate::pool::{LayerId, LayerRecord, Pool, SnapshotRecord, VolumeRecord};

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

/// A volume about to move onto a new overlay (a snapshot, or a linked clone's source).
pub(super) struct Planned {
    /// The volume's pool.
    pub pool: Arc<Pool>,
    /// The volume as it is now.
    pub record: VolumeRecord,
    /// The snapshot's name (empty for a linked clone's source).
    pub snapshot_name: String,
    /// The new, empty head.
    pub overlay: LayerId,
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
        let _graph = self.graph.change().await;
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
    pub(super) async fn switch_to_overlays(&self, planned: &[Planned]) -> Result<()> {
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
        let switches: Vec<OverlaySwitch<'_>> = planned
            .iter()
            .filter(|p| self.journal.get(p.record.uid).is_some())
            .map(|p| OverlaySwitch {
                pool: &p.pool,
                names: Names::new(p.record.uid.to_string()),
                head: p.record.head,
                overlay: p.overlay,
            })
            .collect();
        // Record the new heads first: if we crash after the switch, the journal rebuilds the
        // graph on the overlay that is receiving writes (an empty overlay reads the same).
        let record_heads = || {
            planned.iter().try_for_each(|p| {
                p.pool.put_volume(VolumeRecord { head: p.overlay, ..p.record.clone() })
            })
        };
        if let Err(e) = graph::switch_to_overlays(&qmp, &switches, record_heads).await {
            for p in planned {
                p.pool.put_volume(p.record.clone())?;
            }
            return Err(e);
        }
        // Thresholds watch the head's file: move them to the new heads.
        for p in planned {
            if let Some(threshold) = self.journal.get(p.record.uid).and_then(|a| a.threshold) {
                let names = Names::new(p.record.uid.to_string());
                graph::arm_write_threshold(&qmp, &names, p.overlay, threshold.armed_at).await?;
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
            let _graph = self.graph.change().await;
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
}
