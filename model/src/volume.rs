//! What a volume is asked to be: its allocation, its I/O limits, where its content comes from.
//!
//! These are the engine's request types and the form the pool records keep (the serde names
//! are the on-disk ones); the QMP wire types they become live in the node plugin's `graph`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How much of a new image is allocated up front.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Thin: nothing allocated up front.
    #[default]
    Off,
    /// qcow2 metadata allocated, data thin.
    Metadata,
    /// posix_fallocate the whole file.
    Falloc,
    /// Write zeroes over the whole file.
    Full,
}

impl Preallocation {
    /// Every mode, by its parameter spelling.
    pub const ALL: [(&'static str, Preallocation); 4] = [
        ("off", Preallocation::Off),
        ("metadata", Preallocation::Metadata),
        ("falloc", Preallocation::Falloc),
        ("full", Preallocation::Full),
    ];

    /// Whether the whole size is allocated when the image is made (space is taken now).
    pub fn allocates_data(self) -> bool {
        matches!(self, Preallocation::Falloc | Preallocation::Full)
    }
}

/// I/O limits of a volume; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Qos {
    /// Total I/O operations per second.
    #[serde(default)]
    pub iops_total: u64,
    /// Read operations per second.
    #[serde(default)]
    pub iops_read: u64,
    /// Write operations per second.
    #[serde(default)]
    pub iops_write: u64,
    /// Total bytes per second.
    #[serde(default)]
    pub bps_total: u64,
    /// Read bytes per second.
    #[serde(default)]
    pub bps_read: u64,
    /// Written bytes per second.
    #[serde(default)]
    pub bps_write: u64,
}

impl Qos {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        *self != Qos::default()
    }
}

/// How a volume-sourced volume gets its data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CloneMode {
    /// A full, independent copy (`blockdev-backup`).
    #[default]
    Copy,
    /// An overlay sharing the source's data as of now: O(1), like a snapshot plus a restore.
    Linked,
}

/// Where a new volume's content comes from, by the source's ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A snapshot: a linked overlay on its layer, O(1).
    Snapshot(String),
    /// Another volume: a point-in-time copy or a linked overlay ([`CloneMode`]).
    Volume(String),
}

impl VolumeSource {
    /// The source's ID.
    pub fn id(&self) -> &str {
        match self {
            VolumeSource::Snapshot(id) | VolumeSource::Volume(id) => id,
        }
    }

    /// Which kind of ID [`VolumeSource::id`] is.
    pub fn kind(&self) -> crate::id::IdKind {
        match self {
            VolumeSource::Snapshot(_) => crate::id::IdKind::Snapshot,
            VolumeSource::Volume(_) => crate::id::IdKind::Volume,
        }
    }
}

/// A request to create a volume, validated where it is used (the pool and name by the engine
/// that holds the pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    /// The pool.
    pub pool: String,
    /// The volume's name (CSI: the request name, mapped to an object name).
    pub name: String,
    /// Requested bytes; for sourced volumes `None` means the source's size.
    pub size: Option<i64>,
    /// Preallocation of the new head.
    pub preallocation: Preallocation,
    /// I/O limits.
    pub qos: Qos,
    /// Chain-depth limit; the node's default if `None`.
    pub max_chain_depth: Option<u32>,
    /// Content source.
    pub source: Option<VolumeSource>,
    /// For a volume source: copy or link.
    pub clone_mode: CloneMode,
    /// Kept with the volume and echoed in its events (the claim's namespace and name).
    pub labels: BTreeMap<String, String>,
}

impl CreateVolume {
    /// An empty thin volume with defaults.
    pub fn new(pool: &str, name: &str, size: i64) -> Self {
        CreateVolume {
            pool: pool.into(),
            name: name.into(),
            size: Some(size),
            preallocation: Preallocation::Off,
            qos: Qos::default(),
            max_chain_depth: None,
            source: None,
            clone_mode: CloneMode::Copy,
            labels: BTreeMap::new(),
        }
    }

    /// The source's ID, or "" for an empty volume.
    pub fn source_id(&self) -> &str {
        self.source.as_ref().map_or("", VolumeSource::id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_forms_are_the_ones_pools_already_hold() {
        let qos = Qos { iops_total: 1, bps_write: 2, ..Qos::default() };
        let json = serde_json::to_string(&qos).expect("json");
        assert_eq!(
            json,
            r#"{"iops-total":1,"iops-read":0,"iops-write":0,"bps-total":0,"bps-read":0,"bps-write":2}"#
        );
        let sparse: Qos = serde_json::from_str(r#"{"bps-read":7}"#).expect("sparse");
        assert_eq!(sparse, Qos { bps_read: 7, ..Qos::default() });
        for (name, mode) in Preallocation::ALL {
            assert_eq!(serde_json::to_string(&mode).expect("json"), format!("{name:?}"));
        }
    }

    #[test]
    fn a_source_names_its_kind_and_id() {
        let s = VolumeSource::Snapshot("snap:p:s".into());
        assert_eq!((s.kind(), s.id()), (crate::id::IdKind::Snapshot, "snap:p:s"));
        let mut c = CreateVolume::new("p", "v", 1);
        assert_eq!(c.source_id(), "");
        c.source = Some(VolumeSource::Volume("vol:p:a".into()));
        assert_eq!(c.source_id(), "vol:p:a");
        assert!(!c.qos.is_limited());
    }
}
