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

use super::ops::{Operation, SwitchIntent};
use super::volume::Preallocation;
use super::EngineCore;
use crate::error::{Error, Result};
use crate::graph::{self, Names, NewImage, OverlaySwitch};
use crate::pool::id::{IdKind, NodeName, ObjectId, ObjectName};
use crate::pool::{LayerId, LayerRecord, Pool, SnapshotRecord, VolumeRecord};

/// What callers see of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot's ID.
    pub id: ObjectId,
    /// The ID of the volume it was taken from.
    pub source_volume_id: ObjectId,
    /// The volume's size at the time.
    pub size: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// The group snapshot's ID, for a member of one.
    pub group_id: Option<ObjectId>,
    /// The node it can be restored on (a local pool's); `None`: any node.
    pub node: Option<NodeName>,
}

/// Snapshots to take at one instant.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotBatch<'a> {
    /// (volume ID, snapshot name) pairs.
    pub items: &'a [(ObjectId, ObjectName)],
    /// The group they form, by name (all in one pool), if any.
    pub group: Option<&'a ObjectName>,
    /// Freeze mounted filesystems around the switch.
    pub freeze: bool,
}

/// A batch item resolved: the volume's pool and ID, and the snapshot's name.
type Resolved<'a> = (Arc<Pool>, ObjectId, &'a ObjectName);
/// A member to take: its pool, ID and record, and the snapshot's name.
type Member<'a> = (Arc<Pool>, ObjectId, VolumeRecord, &'a ObjectName);

/// A snapshot of this name exists: the same request again (taken from `volume`, in `group`)
/// is answered by it; anything else is ALREADY_EXISTS, naming the difference.
fn same_snapshot(
    existing: &SnapshotRecord,
    volume: &ObjectName,
    group: Option<&ObjectName>,
) -> Result<()> {
    if existing.source_volume == *volume && existing.group.as_ref() == group {
        return Ok(());
    }
    Err(Error::AlreadyExists {
        what: "snapshot",
        name: existing.name.to_string(),
        difference: match &existing.group {
            Some(g) => format!("it is a member of group snapshot {g}"),
            None => format!("it was taken from volume {}", existing.source_volume),
        },
    })
}

/// Freezes the filesystems mounted on volumes around a snapshot. The Node service provides
/// it: it knows where each volume is mounted.
pub trait Quiesce: Send + Sync + std::fmt::Debug {
    /// Freezes whatever filesystem is mounted on `volume_ids` (volumes not mounted here are
    /// skipped), waiting a bounded time; the returned guard thaws them when dropped.
    fn freeze(&self, volume_ids: &[ObjectId]) -> Result<Box<dyn Send>>;

    /// Whether [`Quiesce::freeze`] holds the writes to `volume_id`: it is staged here with a
    /// filesystem that is mounted.
    fn holds(&self, volume_id: &ObjectId) -> Result<bool>;
}

/// A volume about to move onto a new overlay (a snapshot, or a linked clone's source).
pub(super) struct Planned {
    /// The volume's pool.
    pub pool: Arc<Pool>,
    /// The volume as it is now.
    pub record: VolumeRecord,
    /// The snapshot's name (none for a linked clone's source).
    pub snapshot_name: Option<ObjectName>,
    /// The new, empty head.
    pub overlay: LayerId,
}

impl EngineCore {
    fn snapshot_info(&self, pool: &Pool, record: &SnapshotRecord) -> Result<SnapshotInfo> {
        let group_id = match &record.group {
            Some(g) => Some(self.object_id(IdKind::Group, pool, g)?),
            None => None,
        };
        let id = self.object_id(IdKind::Snapshot, pool, &record.name)?;
        Ok(SnapshotInfo {
            source_volume_id: self.volume_id_by_name(pool, &record.source_volume)?,
            size: record.size,
            created_unix: record.created_unix,
            group_id,
            node: id.location.node.clone(),
            id,
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

    /// Takes a snapshot of a volume without freezing a filesystem on it (the caller holds its
    /// writes, or has none; [`Self::create_snapshot_group`] freezes when asked). Idempotent by
    /// name.
    pub async fn create_snapshot(
        &self,
        volume_id: &ObjectId,
        name: &ObjectName,
    ) -> Result<SnapshotInfo> {
        let items = [(volume_id.clone(), name.clone())];
        let batch = SnapshotBatch { items: &items, group: None, freeze: false };
        let mut taken = self.create_snapshot_group(batch).await?;
        taken.pop().ok_or_else(|| Error::Inconsistent("snapshot group returned nothing".into()))
    }

    /// Takes snapshots of several volumes at one instant: the attached ones switch to their new
    /// overlays in one QMP `transaction`, with their mounted filesystems frozen around it when
    /// asked. A named group is idempotent as a whole: the same name with the same volumes
    /// returns the members taken before.
    pub async fn create_snapshot_group(
        &self,
        batch: SnapshotBatch<'_>,
    ) -> Result<Vec<SnapshotInfo>> {
        let (resolved, keys) = self.resolve_batch(&batch)?;
        let _guard = self.lock(keys)?;
        if let Some(members) = self.group_taken_before(&batch, &resolved)? {
            return Ok(members);
        }
        let _graph = self.graph.change().await;
        let (mut done, to_take) = self.check_members(&batch, resolved)?;
        let planned = self.make_room(to_take).await?;
        let frozen = self.freeze(&planned, batch.freeze).await?;
        let result = self.switch_to_overlays(&planned, batch.group).await;
        drop(frozen);
        let intent = match result {
            Ok(intent) => intent,
            Err(e) => {
                for p in &planned {
                    let _ = std::fs::remove_file(p.pool.layer_path(p.overlay));
                    let _ = p.pool.release(p.overlay);
                }
                return Err(e);
            }
        };
        crate::fault_point!("snapshot:after-switch");
        let now = super::ops::now_unix();
        for p in planned {
            let Some(name) = p.snapshot_name else { continue };
            let record = SnapshotRecord {
                name,
                source_volume: p.record.name.clone(),
                layer: p.record.head,
                size: p.record.size,
                created_unix: now,
                group: batch.group.cloned(),
            };
            p.pool.put_snapshot(record.clone())?;
            done.push(self.snapshot_info(&p.pool, &record)?);
        }
        crate::fault_point!("snapshot:after-snapshot-record");
        drop(intent);
        Ok(done)
    }

    /// Validate: each item's volume and snapshot name resolved, none twice, a group's volumes
    /// in one pool; and the locks the batch takes.
    fn resolve_batch<'a>(
        &self,
        batch: &SnapshotBatch<'a>,
    ) -> Result<(Vec<Resolved<'a>>, Vec<String>)> {
        let mut keys = Vec::new();
        let mut resolved = Vec::new();
        for (volume_id, name) in batch.items {
            let (pool, parsed) = self.resolve(IdKind::Volume, volume_id)?;
            self.object_id(IdKind::Snapshot, &pool, name)?;
            keys.push(Self::key(IdKind::Volume, &pool, &parsed.name));
            keys.push(Self::key(IdKind::Snapshot, &pool, name));
            resolved.push((pool, parsed, name));
        }
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        if unique.len() != keys.len() {
            return Err(Error::invalid("snapshots", "a volume or snapshot name appears twice"));
        }
        if let Some(group) = batch.group {
            let Some((first, ..)) = resolved.first() else {
                return Err(Error::invalid("snapshots", "a group needs at least one volume"));
            };
            if let Some((other, ..)) = resolved.iter().find(|(p, ..)| p.name() != first.name()) {
                return Err(Error::FailedPrecondition(format!(
                    "a group snapshot's volumes must share one pool; these are in {} and {}",
                    first.name().as_str(),
                    other.name().as_str()
                )));
            }
            self.object_id(IdKind::Group, first, group)?;
            keys.push(Self::key(IdKind::Group, first, group));
        }
        Ok((resolved, keys))
    }

    /// A named group taken before answers the same request again (the same volumes), and
    /// refuses another.
    fn group_taken_before(
        &self,
        batch: &SnapshotBatch<'_>,
        resolved: &[Resolved<'_>],
    ) -> Result<Option<Vec<SnapshotInfo>>> {
        let (Some(group), Some((pool, ..))) = (batch.group, resolved.first()) else {
            return Ok(None);
        };
        let members = pool.group_members(group);
        if members.is_empty() {
            return Ok(None);
        }
        let mut had: Vec<&str> = members.iter().map(|m| m.source_volume.as_str()).collect();
        let mut asked: Vec<&str> = resolved.iter().map(|(_, v, _)| v.name.as_str()).collect();
        had.sort_unstable();
        asked.sort_unstable();
        if had != asked {
            return Err(Error::AlreadyExists {
                what: "group snapshot",
                name: group.to_string(),
                difference: format!("it holds snapshots of {}", had.join(", ")),
            });
        }
        members.iter().map(|m| self.snapshot_info(pool, m)).collect::<Result<_>>().map(Some)
    }

    /// Every member checked before any is changed: an item refused (its name taken, its volume
    /// held elsewhere) must not leave another's chain shortened. Returns the snapshots already
    /// taken (the same request again) and the members to take.
    fn check_members<'a>(
        &self,
        batch: &SnapshotBatch<'_>,
        resolved: Vec<Resolved<'a>>,
    ) -> Result<(Vec<SnapshotInfo>, Vec<Member<'a>>)> {
        let mut done = Vec::new();
        let mut to_take = Vec::new();
        for (pool, parsed, name) in resolved {
            let record = pool
                .volume(&parsed.name)
                .ok_or_else(|| Error::NotFound { what: "volume", id: parsed.to_string() })?;
            if let Some(existing) = pool.snapshot(name) {
                same_snapshot(&existing, &record.name, batch.group)?;
                done.push(self.snapshot_info(&pool, &existing)?);
                continue;
            }
            self.held_here(&pool, &record, &parsed)?;
            self.freezable(&record, &parsed, batch.freeze)?;
            to_take.push((pool, parsed, record, name));
        }
        Ok((done, to_take))
    }

    /// A snapshot asked to freeze a volume attached here needs something that freezes: the
    /// node service registers it. An engine without one (a tool, a test) refuses instead of
    /// taking the snapshot unfrozen behind the caller's back.
    fn freezable(&self, record: &VolumeRecord, id: &ObjectId, asked: bool) -> Result<()> {
        if !asked || self.quiesce.get().is_some() || self.journal.get(record.uid).is_none() {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "volume {id} is attached here and the snapshot was asked to freeze its filesystem, \
             but nothing on this node can freeze (no node service); take it without freezing \
             (freezeFilesystem: \"false\") or through the node plugin"
        )))
    }

    /// Makes room for one more layer in each member's chain (shortening it where it is at its
    /// limit); the plan of each switch.
    async fn make_room(&self, to_take: Vec<Member<'_>>) -> Result<Vec<Planned>> {
        let mut planned = Vec::new();
        for (pool, parsed, record, name) in to_take {
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
                snapshot_name: Some(name.clone()),
                overlay: LayerId::random(),
            });
        }
        Ok(planned)
    }

    /// Freezes the filesystems mounted on the planned volumes, when asked and a node service
    /// provides the freezing; the guard thaws them.
    async fn freeze(&self, planned: &[Planned], asked: bool) -> Result<Option<Box<dyn Send>>> {
        let (true, false, Some(quiesce)) = (asked, planned.is_empty(), self.quiesce.get()) else {
            return Ok(None);
        };
        let quiesce = quiesce.clone();
        let ids: Vec<ObjectId> =
            planned.iter().map(|p| self.volume_id(&p.pool, &p.record)).collect::<Result<_>>()?;
        let freeze = tokio::task::spawn_blocking(move || quiesce.freeze(&ids));
        Ok(Some(freeze.await.map_err(|e| Error::Inconsistent(format!("freeze task: {e}")))??))
    }

    /// Creates each overlay, records it as the new head, and switches attached volumes to it.
    /// Returns the operation's intent, which the caller keeps until its own records are written
    /// (a snapshot's); on failure the volumes are as they were.
    pub(super) async fn switch_to_overlays(
        &self,
        planned: &[Planned],
        group: Option<&ObjectName>,
    ) -> Result<super::ops::Intent> {
        let items = planned
            .iter()
            .map(|p| SwitchIntent {
                pool: p.pool.name().clone(),
                volume: p.record.name.clone(),
                uid: p.record.uid,
                head: p.record.head,
                overlay: p.overlay,
                attached: self.journal.get(p.record.uid).is_some(),
                snapshot: p.snapshot_name.clone(),
                size: p.record.size,
            })
            .collect();
        let group = group.cloned();
        let intent = self.operations.begin(Operation::Snapshot { group, items })?;
        crate::fault_point!("snapshot:after-intent");
        let qmp = self.daemon.qmp();
        for p in planned {
            let image = NewImage {
                path: &p.pool.layer_path(p.overlay),
                size: p.record.size,
                backing: Some(Pool::layer_file_name(p.record.head)),
                preallocation: Preallocation::Off,
                format: p.record.format,
            };
            graph::create_image(&qmp, image).await?;
            crate::fault_point!("snapshot:after-overlay-image");
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
                l2_cache_size: p.record.format.l2_cache_size,
            })
            .collect();
        // Record the new heads first: if we crash after the switch, the journal rebuilds the
        // graph on the overlay that is receiving writes (an empty overlay reads the same).
        let record_heads = || {
            crate::fault_point!("snapshot:after-overlay-node");
            planned.iter().try_for_each(|p| {
                p.pool.put_volume(VolumeRecord { head: p.overlay, ..p.record.clone() })
            })?;
            crate::fault_point!("snapshot:after-head-record");
            Ok(())
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
        Ok(intent)
    }

    /// A group snapshot's members.
    pub fn group_snapshots(&self, group_id: &ObjectId) -> Result<Vec<SnapshotInfo>> {
        let (pool, parsed) = self.resolve(IdKind::Group, group_id)?;
        let members: Vec<_> = pool
            .group_members(&parsed.name)
            .iter()
            .map(|s| self.snapshot_info(&pool, s))
            .collect::<Result<_>>()?;
        if members.is_empty() {
            return Err(Error::NotFound { what: "group snapshot", id: group_id.to_string() });
        }
        Ok(members)
    }

    /// Deletes a group snapshot: every member. A group that is gone is not an error.
    pub async fn delete_group(&self, group_id: &ObjectId) -> Result<()> {
        let (pool, parsed) = self.resolve(IdKind::Group, group_id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Group, &pool, &parsed.name)])?;
        for member in pool.group_members(&parsed.name) {
            let _member = self.lock(vec![Self::key(IdKind::Snapshot, &pool, &member.name)])?;
            self.remove_snapshot(&pool, &member).await?;
        }
        Ok(())
    }

    /// Deletes a snapshot. Its layer stays while a volume's chain needs it; chains past their
    /// depth limit are shortened. A group's member goes only with its group.
    pub async fn delete_snapshot(&self, id: &ObjectId) -> Result<()> {
        let (pool, parsed) = self.resolve(IdKind::Snapshot, id)?;
        let _guard = self.lock(vec![Self::key(IdKind::Snapshot, &pool, &parsed.name)])?;
        let record = pool
            .snapshot(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: id.to_string() })?;
        if let Some(group) = &record.group {
            let group_id = self.object_id(IdKind::Group, &pool, group)?;
            return Err(Error::invalid(
                "snapshot_id",
                format!("{id} is a member of group snapshot {group_id}: delete the group instead"),
            ));
        }
        self.remove_snapshot(&pool, &record).await
    }

    /// Removes a snapshot's record, then shortens the chains its layer leaves too deep.
    async fn remove_snapshot(&self, pool: &Pool, record: &SnapshotRecord) -> Result<()> {
        pool.remove_snapshot(&record.name)?;
        if pool.layer(record.layer).is_none() {
            return Ok(());
        }
        // The layer lives on inside one or more chains; shorten those that are too deep.
        for volume in pool.volumes() {
            if !pool.chain(volume.head)?.contains(&record.layer)
                || pool.owner(&volume.name)?.is_some_and(|o| o != self.config.node)
            {
                // Not affected, or attached on another node of a shared pool: that node's
                // daemon holds the chain, and its next snapshot of the volume shortens it.
                continue;
            }
            let Ok(_volume_guard) = self.lock(vec![Self::key(IdKind::Volume, pool, &volume.name)])
            else {
                continue; // busy: its own operation will shorten later
            };
            let _graph = self.graph.change().await;
            while pool.volume(&volume.name).is_some_and(|v| {
                pool.chain(v.head).map(|c| c.len() > v.max_chain_depth as usize).unwrap_or(false)
            }) {
                if !self.shorten_once(pool, &volume.name).await? {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn a_snapshot_name_taken_answers_the_same_request_and_refuses_any_other() {
        let n = |name: &str| ObjectName::parse(name).expect("name");
        let taken = |volume: &str, group: Option<&str>| SnapshotRecord {
            name: n("s"),
            source_volume: n(volume),
            layer: LayerId::random(),
            size: 1 << 30,
            created_unix: 0,
            group: group.map(n),
        };
        // (row, the existing snapshot, the request's volume and group, the answer)
        type Row<'a> = (&'a str, SnapshotRecord, &'a str, Option<&'a str>, Result<(), ErrorKind>);
        let rows: [Row; 5] = [
            ("the same snapshot again", taken("v", None), "v", None, Ok(())),
            ("the same group member again", taken("v", Some("g")), "v", Some("g"), Ok(())),
            ("of another volume", taken("w", None), "v", None, Err(ErrorKind::AlreadyExists)),
            (
                "in another group",
                taken("v", Some("h")),
                "v",
                Some("g"),
                Err(ErrorKind::AlreadyExists),
            ),
            (
                "a group member, asked alone",
                taken("v", Some("g")),
                "v",
                None,
                Err(ErrorKind::AlreadyExists),
            ),
        ];
        for (row, existing, volume, group, expected) in rows {
            let group = group.map(n);
            let got = same_snapshot(&existing, &n(volume), group.as_ref()).map_err(|e| e.kind());
            assert_eq!(got, expected, "{row}");
        }
    }
}
