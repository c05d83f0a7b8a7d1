//! StorageClass parameters and volume-context keys, and their parsers.
//!
//! The controller checks a class's parameters with these at CreateVolume; the node reads the
//! ones passed on in the volume context with the same functions at NodeStage, so a value is
//! never accepted on one side and refused on the other.

use crate::volume::{CloneMode, Format, Preallocation, Qos};
use crate::{Error, Result};

/// The topology key of local pools: a volume lives on one node.
pub const TOPOLOGY_KEY: &str = "topology.qsd.csi.dev/node";

/// Parameter: the pool a volume is created in.
pub const POOL: &str = "pool";
/// Parameter and volume context: the filesystem of mount volumes.
pub const FS_TYPE: &str = "fsType";
/// Parameter: qcow2 preallocation (`off`, `metadata`, `falloc`, `full`).
pub const PREALLOCATION: &str = "preallocation";
/// Parameter: the chain-depth limit of the volume.
pub const MAX_CHAIN_DEPTH: &str = "maxChainDepth";
/// Parameter: how clones of volumes are made (`copy`, `linked`).
pub const CLONE_MODE: &str = "cloneMode";
/// Parameter: the most bytes per second a full clone copies (`64Mi`; unset: as fast as the
/// disk allows), so a clone of a large volume does not starve the node's other volumes.
pub const CLONE_BANDWIDTH: &str = "cloneBandwidth";
/// Parameter: `"true"` lets a volume follow its pod: when its node is cordoned or drained and
/// the pod cannot be scheduled, the controller moves the volume to a node the pod can go to.
pub const FOLLOW_POD: &str = "followPod";
/// VolumeSnapshotClass / VolumeGroupSnapshotClass parameter: `"false"` snapshots a mounted
/// filesystem without freezing it (crash-consistent only). Default `"true"`.
pub const FREEZE: &str = "freezeFilesystem";
/// Parameter and volume context: arm a write threshold at this percentage of the volume's
/// size when it is staged.
pub const WRITE_THRESHOLD_PERCENT: &str = "writeThresholdPercent";

/// Parameter: the qcow2 cluster size (bytes, or with a binary suffix: `128Ki`, `2Mi`).
pub const CLUSTER_SIZE: &str = "clusterSize";
/// Parameter: qcow2 extended L2 entries (subclusters), `"true"` or `"false"`.
pub const EXTENDED_L2: &str = "extendedL2";
/// Parameter: the L2 table cache of an attached volume's head (bytes, or `4Mi`...).
pub const L2_CACHE_SIZE: &str = "l2CacheSize";

/// The QoS parameters (also the only mutable parameters), and the field each sets.
pub const QOS_KEYS: [&str; 6] =
    ["iopsTotal", "iopsRead", "iopsWrite", "bpsTotal", "bpsRead", "bpsWrite"];

/// Prefix of the parameters external-provisioner adds (PVC name, namespace, ...).
pub const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// The provisioner's parameters (with `--extra-create-metadata`) kept as the volume's labels,
/// so events about the volume can name its claim.
pub const CLAIM_LABELS: [&str; 3] = [
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
];

/// Class parameters the node needs at stage time, passed on in the volume context.
pub const CONTEXT_KEYS: [&str; 2] = [FS_TYPE, WRITE_THRESHOLD_PERCENT];

/// Filesystems the node formats and mounts.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// The smallest volume mkfs.xfs formats.
pub const XFS_MIN_SIZE: i64 = 300 << 20;

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: i64 = 1 << 30;

/// A filesystem type the node can make; `field` names where it came from.
pub fn fs_type(field: &'static str, value: &str) -> Result<()> {
    if SUPPORTED_FS.contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{value:?} is not ext4 or xfs")))
    }
}

/// `writeThresholdPercent`: a whole percentage of the volume's size, 1 to 99.
pub fn threshold_percent(value: &str) -> Result<u64> {
    value.parse().ok().filter(|p| (1..=99).contains(p)).ok_or_else(|| {
        Error::invalid(
            WRITE_THRESHOLD_PERCENT,
            format!("{value:?} is not a whole percentage from 1 to 99"),
        )
    })
}

/// `preallocation`.
pub fn preallocation(value: &str) -> Result<Preallocation> {
    Preallocation::ALL.iter().find(|(name, _)| *name == value).map(|(_, p)| *p).ok_or_else(|| {
        Error::invalid(PREALLOCATION, format!("{value:?} is not off, metadata, falloc or full"))
    })
}

/// A `"true"` / `"false"` parameter.
pub fn boolean(field: &'static str, value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::invalid(field, format!("{other:?} is neither \"true\" nor \"false\""))),
    }
}

/// `cloneMode`.
pub fn clone_mode(value: &str) -> Result<CloneMode> {
    match value {
        "copy" => Ok(CloneMode::Copy),
        "linked" => Ok(CloneMode::Linked),
        other => Err(Error::invalid(CLONE_MODE, format!("{other:?} is not copy or linked"))),
    }
}

/// Parses the [`FREEZE`] parameter.
pub fn freeze(value: &str) -> Result<bool> {
    boolean(FREEZE, value)
}

/// `maxChainDepth`: a whole number of layers.
pub fn max_chain_depth(value: &str) -> Result<u32> {
    value.parse().map_err(|_| Error::invalid(MAX_CHAIN_DEPTH, format!("{value:?} is not a number")))
}

/// A size in bytes: a whole number, optionally with a binary suffix (`Ki`, `Mi`, `Gi`; `K`, `M`
/// and `G` are read the same way, as qemu-img does).
pub fn bytes(key: &'static str, value: &str) -> Result<u64> {
    let (digits, shift) = match value.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (value, 0),
        Some((at, _)) => match &value[at..] {
            "K" | "Ki" => (&value[..at], 10),
            "M" | "Mi" => (&value[..at], 20),
            "G" | "Gi" => (&value[..at], 30),
            _ => ("", 0),
        },
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| Error::invalid(key, format!("{value:?} is not a size (65536, 64Ki, 2Mi)")))
}

/// Applies one qcow2 format parameter to `format`; `Ok(false)` when `key` is not one.
/// [`Format::check`] judges the combination once all are in.
pub fn format_key(format: &mut Format, key: &str, value: &str) -> Result<bool> {
    match key {
        CLUSTER_SIZE => format.cluster_size = Some(bytes(CLUSTER_SIZE, value)?),
        L2_CACHE_SIZE => format.l2_cache_size = Some(bytes(L2_CACHE_SIZE, value)?),
        EXTENDED_L2 => {
            format.extended_l2 = match value {
                "true" => true,
                "false" => false,
                other => {
                    return Err(Error::invalid(
                        EXTENDED_L2,
                        format!("{other:?} is neither \"true\" nor \"false\""),
                    ))
                }
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Applies one QoS parameter to `limits`; `Ok(false)` when `key` is not a QoS key.
pub fn qos_key(limits: &mut Qos, key: &str, value: &str) -> Result<bool> {
    let field = match key {
        "iopsTotal" => &mut limits.iops_total,
        "iopsRead" => &mut limits.iops_read,
        "iopsWrite" => &mut limits.iops_write,
        "bpsTotal" => &mut limits.bps_total,
        "bpsRead" => &mut limits.bps_read,
        "bpsWrite" => &mut limits.bps_write,
        _ => return Ok(false),
    };
    *field = value.parse().map_err(|_| {
        Error::invalid("QoS limit", format!("{key}={value:?} is not a whole number"))
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_parse_or_say_what_is_wrong() {
        assert_eq!(threshold_percent("80"), Ok(80));
        for bad in ["0", "100", "-1", "x", "50.5", ""] {
            assert!(threshold_percent(bad).is_err(), "{bad:?}");
        }
        assert_eq!(preallocation("falloc"), Ok(Preallocation::Falloc));
        assert!(preallocation("sparse").is_err());
        assert_eq!(clone_mode("linked"), Ok(CloneMode::Linked));
        assert_eq!(bytes(CLONE_BANDWIDTH, "64Mi"), Ok(64 << 20));
        assert!(clone_mode("deep").is_err());
        assert_eq!(boolean(FOLLOW_POD, "true"), Ok(true));
        assert!(boolean(FOLLOW_POD, "yes").is_err());
        assert_eq!(max_chain_depth("7"), Ok(7));
        assert!(max_chain_depth("-7").is_err());
        for (good, n) in [("65536", 65536), ("128Ki", 128 << 10), ("2M", 2 << 20), ("1Gi", 1 << 30)]
        {
            assert_eq!(bytes(CLUSTER_SIZE, good), Ok(n), "{good}");
        }
        for bad in ["", "64KiB", "-1", "1.5Mi", "Ki", "99999999999999999999", "20000000000Gi"] {
            assert!(bytes(CLUSTER_SIZE, bad).is_err(), "{bad:?}");
        }
        let mut f = Format::default();
        assert_eq!(format_key(&mut f, "fsType", "ext4"), Ok(false));
        assert_eq!(format_key(&mut f, EXTENDED_L2, "true"), Ok(true));
        assert!(format_key(&mut f, EXTENDED_L2, "yes").is_err());
        assert_eq!(format_key(&mut f, CLUSTER_SIZE, "128Ki"), Ok(true));
        assert_eq!(format_key(&mut f, L2_CACHE_SIZE, "4Mi"), Ok(true));
        assert_eq!(f.check(), Ok(()));
        for bad in [
            Format { cluster_size: Some(96 << 10), ..Format::default() },
            Format { cluster_size: Some(256), ..Format::default() },
            Format { cluster_size: Some(4 << 20), ..Format::default() },
            Format { cluster_size: Some(8 << 10), extended_l2: true, ..Format::default() },
            Format { l2_cache_size: Some(64 << 10), ..Format::default() },
            Format { l2_cache_size: Some(2 << 30), ..Format::default() },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(fs_type("fsType", "xfs").is_ok());
        let e = fs_type("fsType", "btrfs").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("invalid fsType: \"btrfs\" is not ext4 or xfs"));
    }

    #[test]
    fn every_qos_key_sets_its_own_limit() {
        let mut limits = Qos::default();
        for (i, key) in QOS_KEYS.iter().enumerate() {
            assert_eq!(qos_key(&mut limits, key, &(i + 1).to_string()), Ok(true), "{key}");
        }
        let expected = Qos {
            iops_total: 1,
            iops_read: 2,
            iops_write: 3,
            bps_total: 4,
            bps_read: 5,
            bps_write: 6,
        };
        assert_eq!(limits, expected);
        assert_eq!(qos_key(&mut limits, "pool", "x"), Ok(false));
        assert!(qos_key(&mut limits, "iopsRead", "many").is_err());
    }
}
