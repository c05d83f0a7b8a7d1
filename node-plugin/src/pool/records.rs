//! The records a pool keeps on disk, one JSON file each: the pool's identity, layers, volumes,
//! snapshots and (shared pools) owners. Their serde form is the on-disk format: fields only
//! ever added, with defaults, so records written by earlier versions still load.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{LayerId, NodeName, ObjectName, PoolName, RecordedSource};
use qsd_csi_model::grow::AutoExpand;
use qsd_csi_model::volume::{Format, Preallocation, Qos};

/// Whether a pool lives on one node or on storage every node mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// On this node's disk; volumes are pinned to the node.
    Local,
    /// On a filesystem every node mounts; one writer at a time via QEMU's image locks.
    Shared,
}

/// `pool.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolInfo {
    /// The pool's name.
    pub name: PoolName,
    /// Local or shared.
    pub kind: PoolKind,
}

/// One layer: a qcow2 file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's id (and file stem).
    pub id: LayerId,
    /// The layer below it, if any.
    pub backing: Option<LayerId>,
}

/// A volume: a writable head layer over a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume's name.
    pub name: ObjectName,
    /// Short random id used to name the volume's QEMU nodes, export and throttle group.
    pub uid: LayerId,
    /// Virtual size in bytes.
    pub size: u64,
    /// The active layer.
    pub head: LayerId,
    /// How the head was allocated.
    #[serde(default)]
    pub preallocation: Preallocation,
    /// I/O limits.
    #[serde(default)]
    pub qos: Qos,
    /// Longest chain allowed; longer chains are shortened by stream / commit.
    pub max_chain_depth: u32,
    /// Where the content came from (recorded as "snapshot:<name>" or "volume:<name>").
    #[serde(default)]
    pub source: Option<RecordedSource>,
    /// The orchestrator's labels, kept for it and echoed in events (in a cluster: the claim's
    /// namespace and name, so events about the volume reach the PVC).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The qcow2 layout its new layers get and its head's cache (absent: QEMU's defaults).
    #[serde(default, skip_serializing_if = "Format::is_default")]
    pub format: Format,
    /// How it grows itself when its write threshold is crossed (absent: it does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_expand: Option<AutoExpand>,
    /// A volume moved here from another node keeps its ID, which names that node: the node.
    /// Absent for a volume made here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<NodeName>,
}

/// A snapshot: an immutable layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot's name.
    pub name: ObjectName,
    /// The volume it was taken from.
    pub source_volume: ObjectName,
    /// The layer it pins.
    pub layer: LayerId,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// The group snapshot it belongs to (taken at one instant with the group's other members;
    /// deleted with them only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<ObjectName>,
}

/// `owners/<volume>.json` in a shared pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The node whose daemon has the volume attached.
    pub node: NodeName,
}
