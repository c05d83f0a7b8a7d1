//! What a volume is asked to be: its allocation, its I/O limits, where its content comes from.
//!
//! These are the engine's request types and the form the pool records keep (the serde names
//! are the on-disk ones); the QMP wire types they become live in the node plugin's `graph`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{IdKind, ObjectId, ObjectName, PoolName};

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

/// How a volume's qcow2 images are laid out and cached. Unset fields take QEMU's defaults:
/// 64 KiB clusters, no subclusters, and an L2 cache sized to cover the whole image up to
/// 32 MiB (so every cluster lookup of an image up to 256 GiB is a cache hit). The layout applies
/// to every layer made for the volume (its head, and the overlays snapshots put on it); the cache
/// to its head while it is attached.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Format {
    /// qcow2 cluster size in bytes: a power of two from 512 B to 2 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Extended L2 entries: 32 subclusters per cluster, so a first write into a cluster of an
    /// overlay copies only the subclusters it touches from the layer below. Needs clusters of at
    /// least 16 KiB.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended_l2: bool,
    /// The head's L2 table cache in bytes, at least two clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_cache_size: Option<u64>,
}

impl Format {
    /// QEMU's default cluster size.
    pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
    /// The largest L2 cache taken (QEMU's own default never exceeds 32 MiB).
    pub const MAX_L2_CACHE_SIZE: u64 = 1 << 30;

    /// Whether every field is QEMU's default.
    pub fn is_default(&self) -> bool {
        *self == Format::default()
    }

    /// Checks the combination, naming the parameter at fault.
    pub fn check(&self) -> crate::Result<()> {
        use crate::params::{CLUSTER_SIZE, EXTENDED_L2, L2_CACHE_SIZE};
        use crate::Error;
        let cluster = self.cluster_size.unwrap_or(Self::DEFAULT_CLUSTER_SIZE);
        if !cluster.is_power_of_two() || !(512..=2 << 20).contains(&cluster) {
            return Err(Error::invalid(
                CLUSTER_SIZE,
                format!("{cluster} is not a power of two from 512 to 2097152 bytes"),
            ));
        }
        if self.extended_l2 && cluster < 16 << 10 {
            return Err(Error::invalid(
                EXTENDED_L2,
                format!("needs clusters of at least 16 KiB (clusterSize is {cluster})"),
            ));
        }
        if let Some(cache) = self.l2_cache_size {
            if cache < 2 * cluster || cache > Self::MAX_L2_CACHE_SIZE {
                return Err(Error::invalid(
                    L2_CACHE_SIZE,
                    format!(
                        "{cache} bytes is not from two clusters ({}) to {} bytes",
                        2 * cluster,
                        Self::MAX_L2_CACHE_SIZE
                    ),
                ));
            }
        }
        Ok(())
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
    Snapshot(ObjectId),
    /// Another volume: a point-in-time copy or a linked overlay ([`CloneMode`]).
    Volume(ObjectId),
}

impl VolumeSource {
    /// A source by its ID, of the kind the ID names (a group is none).
    pub fn new(id: ObjectId) -> Option<Self> {
        match id.kind {
            IdKind::Snapshot => Some(VolumeSource::Snapshot(id)),
            IdKind::Volume => Some(VolumeSource::Volume(id)),
            IdKind::Group => None,
        }
    }

    /// The source's ID.
    pub fn id(&self) -> &ObjectId {
        match self {
            VolumeSource::Snapshot(id) | VolumeSource::Volume(id) => id,
        }
    }

    /// Which kind of ID [`VolumeSource::id`] is.
    pub fn kind(&self) -> IdKind {
        match self {
            VolumeSource::Snapshot(_) => IdKind::Snapshot,
            VolumeSource::Volume(_) => IdKind::Volume,
        }
    }
}

/// A copy's source served by another node: where its read-only NBD export listens and the TLS
/// pre-shared key made for this copy (the Debug form leaves the key out).
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteSource {
    /// The exporting node's address.
    pub host: String,
    /// Its TCP port.
    pub port: u16,
    /// The NBD export's name.
    pub export: String,
    /// The PSK identity (TLS user name).
    pub identity: String,
    /// The pre-shared key.
    pub key: Vec<u8>,
    /// The source's virtual size.
    pub size: u64,
    /// Bytes of it that hold data.
    pub allocated: u64,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("export", &self.export)
            .field("identity", &self.identity)
            .field("key", &"<withheld>")
            .field("size", &self.size)
            .finish()
    }
}

/// A request to create a volume, validated where it is used (the pool and name by the engine
/// that holds the pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    /// The pool.
    pub pool: PoolName,
    /// The volume's name (CSI: the request name, mapped to an object name).
    pub name: ObjectName,
    /// Requested bytes; for sourced volumes `None` means the source's size.
    pub size: Option<i64>,
    /// The most bytes the caller accepts: an existing volume of this name satisfies a repeated
    /// request when its size lies between `size` and this (`None`: no limit).
    pub limit: Option<i64>,
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
    /// A full clone's copy rate limit in bytes per second (`None`: unlimited).
    pub clone_bandwidth: Option<u64>,
    /// Kept with the volume and echoed in its events (the claim's namespace and name).
    pub labels: BTreeMap<String, String>,
    /// qcow2 layout and cache.
    pub format: Format,
    /// Grows itself when its write threshold is crossed (the class's `autoExpand*`).
    pub auto_expand: Option<crate::grow::AutoExpand>,
    /// The source lives on another node, which serves it here: a full copy over the network.
    pub remote: Option<RemoteSource>,
    /// A move: the volume replaces the source volume of this ID (on another node) and keeps
    /// the ID, so the orchestrator's handle of it stays valid. Needs [`CreateVolume::remote`].
    pub keep_id: Option<ObjectId>,
}

impl CreateVolume {
    /// An empty thin volume with defaults.
    pub fn new(pool: PoolName, name: ObjectName, size: i64) -> Self {
        CreateVolume {
            pool,
            name,
            size: Some(size),
            limit: None,
            preallocation: Preallocation::Off,
            qos: Qos::default(),
            max_chain_depth: None,
            source: None,
            clone_mode: CloneMode::Copy,
            clone_bandwidth: None,
            labels: BTreeMap::new(),
            format: Format::default(),
            auto_expand: None,
            remote: None,
            keep_id: None,
        }
    }

    /// [`CreateVolume::new`] from text: the pool and name parsed (a bad one is
    /// [`crate::Error::InvalidArgument`]).
    pub fn named(pool: &str, name: &str, size: i64) -> crate::Result<Self> {
        Ok(Self::new(PoolName::parse(pool)?, ObjectName::parse(name)?, size))
    }

    /// The source's ID, or `None` for an empty volume.
    pub fn source_id(&self) -> Option<&ObjectId> {
        self.source.as_ref().map(VolumeSource::id)
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
        let id = |kind, s| ObjectId::parse(kind, s).expect("id");
        let s = VolumeSource::new(id(IdKind::Snapshot, "snap:p:s")).expect("a source");
        assert_eq!((s.kind(), s.id().to_string().as_str()), (IdKind::Snapshot, "snap:p:s"));
        assert_eq!(VolumeSource::new(id(IdKind::Group, "group:p:g")), None);
        let name = |s| ObjectName::parse(s).expect("name");
        let mut c = CreateVolume::new(PoolName::parse("p").expect("pool"), name("v"), 1);
        assert_eq!(c.source_id(), None);
        c.source = Some(VolumeSource::Volume(id(IdKind::Volume, "vol:p:a")));
        assert_eq!(c.source_id().map(ToString::to_string).as_deref(), Some("vol:p:a"));
        assert!(!c.qos.is_limited());
    }
}
