//! CSI requests turned into validated, typed requests before any side effect. What each
//! parameter means is the shared model's ([`qsd_csi_model::params`]); this module reads the
//! CSI messages around them.

use std::collections::HashMap;

use qsd_csi_model::grow::{AutoExpand, AUTO_EXPAND, AUTO_EXPAND_LIMIT, AUTO_EXPAND_STEP};
use qsd_csi_model::id::{IdKind, ObjectId, ObjectName, PoolName, SIZE_ALIGN};
use qsd_csi_model::params::{
    self as keys, qos_key, CLAIM_LABELS, DEFAULT_SIZE, PROVISIONER_PREFIX, XFS_MIN_SIZE,
};
use qsd_csi_model::volume::{CloneMode, CreateVolume, Qos, VolumeSource};
use qsd_csi_proto::csi;
use sha2::Digest;

use crate::error::ControllerError;

pub use qsd_csi_model::params::CONTEXT_KEYS;

/// Maps any CSI name to a pool object name: kept if it already is one, otherwise a stable
/// digest, so every name the spec allows works and the same name always maps the same way.
pub fn object_name(csi_name: &str) -> String {
    if ObjectName::parse(csi_name).is_ok() {
        return csi_name.to_owned();
    }
    let digest = sha2::Sha256::digest(csi_name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("h-{hex}")
}

/// What a VolumeSnapshotClass or VolumeGroupSnapshotClass may set: whether to freeze mounted
/// filesystems (the default) — plus the sidecars' own `csi.storage.k8s.io/` keys, and
/// `deletionPolicy`, the class's own field, which Kubernetes' storage test framework also
/// copies into a group snapshot class's parameters (checked, then ignored here).
pub fn snapshot_freeze(parameters: &HashMap<String, String>) -> Result<bool, ControllerError> {
    let mut freeze = true;
    for (key, value) in parameters {
        if key == qsd_csi_model::params::FREEZE {
            freeze = qsd_csi_model::params::freeze(value)?;
        } else if key == "deletionPolicy" {
            if !matches!(value.as_str(), "Delete" | "Retain") {
                return Err(ControllerError::Unsupported(format!(
                    "deletionPolicy {value:?} is neither Delete nor Retain"
                )));
            }
        } else if !key.starts_with(qsd_csi_model::params::PROVISIONER_PREFIX) {
            return Err(ControllerError::Unsupported(format!(
                "unknown snapshot parameter {key:?} (known: {})",
                qsd_csi_model::params::FREEZE
            )));
        }
    }
    Ok(freeze)
}

/// The byte size a capacity range asks for (`None`: the source's size, for sourced volumes).
pub fn size(
    range: Option<&csi::CapacityRange>,
    sourced: bool,
) -> Result<Option<i64>, ControllerError> {
    let Some(range) = range else {
        return Ok((!sourced).then_some(DEFAULT_SIZE));
    };
    let (required, limit) = (range.required_bytes, range.limit_bytes);
    if required < 0 || limit < 0 {
        let refused = "capacity_range bytes must not be negative";
        return Err(ControllerError::Unsupported(refused.into()));
    }
    let align = SIZE_ALIGN as i64;
    let size = match (required, limit) {
        (0, 0) if sourced => return Ok(None),
        (0, 0) => DEFAULT_SIZE,
        (0, limit) => DEFAULT_SIZE.min(limit / align * align),
        (required, _) => {
            required.checked_add(align - 1).map(|r| r / align * align).unwrap_or(i64::MAX)
        }
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(ControllerError::OutOfRange(format!(
            "cannot fit a volume in {required}..{limit} bytes (sizes are whole MiB)"
        )));
    }
    Ok(Some(size))
}

/// QoS limits from `mutable_parameters` (ControllerModifyVolume). Unknown keys are refused.
pub fn qos(params: &HashMap<String, String>) -> Result<Qos, ControllerError> {
    let mut limits = Qos::default();
    for (key, value) in params {
        if !qos_key(&mut limits, key, value)? {
            return Err(ControllerError::Unsupported(format!(
                "{key} cannot be modified (only QoS limits can)"
            )));
        }
    }
    Ok(limits)
}

/// `CreateVolume` → the request a node agent runs.
pub fn create_volume(
    req: &csi::CreateVolumeRequest,
    default_pool: &str,
) -> Result<CreateVolume, ControllerError> {
    if req.name.is_empty() {
        return Err(ControllerError::Required("name"));
    }
    if req.volume_capabilities.is_empty() {
        return Err(ControllerError::Required("volume_capabilities"));
    }
    for cap in &req.volume_capabilities {
        if let Some(reason) = unsupported(cap) {
            return Err(ControllerError::Unsupported(reason));
        }
    }
    let name = ObjectName::parse(&object_name(&req.name))?;
    let mut out = CreateVolume::new(PoolName::parse(default_pool)?, name, 0);
    let mut clone_mode = CloneMode::Copy;
    for (key, value) in &req.parameters {
        if CLAIM_LABELS.contains(&key.as_str()) {
            out.labels.insert(key.clone(), value.clone());
            continue;
        }
        if key.starts_with(PROVISIONER_PREFIX)
            || qos_key(&mut out.qos, key, value)?
            || keys::format_key(&mut out.format, key, value)?
        {
            continue;
        }
        match key.as_str() {
            keys::POOL => out.pool = PoolName::parse(value)?,
            keys::FS_TYPE => keys::fs_type(keys::FS_TYPE, value)?,
            keys::PREALLOCATION => out.preallocation = keys::preallocation(value)?,
            keys::MAX_CHAIN_DEPTH => out.max_chain_depth = Some(keys::max_chain_depth(value)?),
            keys::CLONE_MODE => clone_mode = keys::clone_mode(value)?,
            keys::FOLLOW_POD => {
                keys::boolean(keys::FOLLOW_POD, value)?;
            }
            keys::CLONE_BANDWIDTH => {
                out.clone_bandwidth = Some(keys::bytes(keys::CLONE_BANDWIDTH, value)?)
            }
            keys::WRITE_THRESHOLD_PERCENT => {
                keys::threshold_percent(value)?;
            }
            AUTO_EXPAND | AUTO_EXPAND_STEP | AUTO_EXPAND_LIMIT => {}
            _ => return Err(ControllerError::Unsupported(format!("unknown parameter {key:?}"))),
        }
    }
    out.format.check()?;
    out.auto_expand =
        AutoExpand::from_parameters(|key| req.parameters.get(key).map(String::as_str))?;
    // A VolumeAttributesClass arrives as mutable parameters: QoS limits that win over parameters.
    for (key, value) in &req.mutable_parameters {
        if !qos_key(&mut out.qos, key, value)? {
            return Err(ControllerError::Unsupported(format!(
                "{key} is not a mutable parameter (only QoS limits are)"
            )));
        }
    }
    // cloneMode is a class-wide choice for clones of volumes; a restore from a snapshot is
    // always a linked overlay (O(1)), whatever the class says.
    use csi::volume_content_source::Type;
    out.source = match req.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
        None => None,
        Some(Type::Snapshot(s)) => {
            Some(VolumeSource::Snapshot(ObjectId::parse(IdKind::Snapshot, &s.snapshot_id)?))
        }
        Some(Type::Volume(v)) => {
            out.clone_mode = clone_mode;
            Some(VolumeSource::Volume(ObjectId::parse(IdKind::Volume, &v.volume_id)?))
        }
    };
    out.size = size(req.capacity_range.as_ref(), out.source.is_some())?;
    out.limit = req.capacity_range.as_ref().map(|r| r.limit_bytes).filter(|l| *l > 0);
    fit_sizes(req, &mut out)?;
    Ok(out)
}

/// Sizes a request may not ask for, said now rather than as a failed NodeStage or a growth
/// that can never happen; an xfs volume smaller than mkfs.xfs makes is made at its minimum.
fn fit_sizes(
    req: &csi::CreateVolumeRequest,
    volume: &mut CreateVolume,
) -> Result<(), ControllerError> {
    // mkfs.xfs refuses filesystems under 300 MiB: a smaller request gets 300 MiB (CSI lets a
    // volume be larger than required, up to limit_bytes), or, when its limit is lower, the
    // refusal now rather than a failed NodeStage.
    let xfs = req.parameters.get(keys::FS_TYPE).is_some_and(|f| f == "xfs")
        || req.volume_capabilities.iter().any(|c| {
            matches!(&c.access_type, Some(csi::volume_capability::AccessType::Mount(m)) if m.fs_type == "xfs")
        });
    if let Some(size) = volume.size.filter(|s| xfs && volume.source.is_none() && *s < XFS_MIN_SIZE)
    {
        if volume.limit.is_some_and(|limit| limit < XFS_MIN_SIZE) {
            return Err(ControllerError::OutOfRange(format!(
                "an xfs volume needs at least {} MiB (mkfs.xfs refuses smaller filesystems); {} MiB was asked for, at most {} MiB",
                XFS_MIN_SIZE >> 20,
                size >> 20,
                volume.limit.unwrap_or_default() >> 20
            )));
        }
        volume.size = Some(XFS_MIN_SIZE);
    }
    if let (Some(limit), Some(size)) = (volume.auto_expand.and_then(|a| a.limit), volume.size) {
        if limit < size.max(0) as u64 {
            return Err(ControllerError::Unsupported(format!(
                "autoExpandLimit {limit} is below the requested size {size}: the volume could never grow"
            )));
        }
    }
    Ok(())
}

/// Why a capability is not supported, if it is not.
pub fn unsupported(cap: &csi::VolumeCapability) -> Option<String> {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::AccessType;
    let Some(access) = &cap.access_type else {
        return Some("a volume capability needs an access type (block or mount)".into());
    };
    let Some(mode) = &cap.access_mode else {
        return Some("a volume capability needs an access mode".into());
    };
    match Mode::try_from(mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(other) => {
            return Some(format!(
                "access mode {other:?} is not supported: a qcow2 volume has one writer node"
            ))
        }
        Err(_) => return Some(format!("unknown access mode {}", mode.mode)),
    }
    if let AccessType::Mount(m) = access {
        if !m.fs_type.is_empty() {
            if let Err(e) = keys::fs_type("fs_type", &m.fs_type) {
                return Some(e.to_string());
            }
        }
    }
    None
}

/// Paging: a token is the index of the next entry.
pub fn page<T>(
    items: Vec<T>,
    max_entries: i32,
    token: &str,
) -> Result<(Vec<T>, String), ControllerError> {
    if max_entries < 0 {
        return Err(ControllerError::Unsupported("max_entries must not be negative".into()));
    }
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .ok()
            .filter(|i| *i <= items.len())
            .ok_or_else(|| ControllerError::BadToken(token.to_owned()))?
    };
    let take = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    let end = start.saturating_add(take).min(items.len());
    let next = if end < items.len() { end.to_string() } else { String::new() };
    Ok((items.into_iter().skip(start).take(end - start).collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};

    fn cap(mode: Mode, fs: &str) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn request(params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: "pvc-1".into(),
            volume_capabilities: vec![cap(Mode::SingleNodeWriter, "ext4")],
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn capacity_ranges_round_up_to_whole_mebibytes_within_the_limit() {
        let range = |required, limit| {
            Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit })
        };
        assert_eq!(size(None, false).ok(), Some(Some(DEFAULT_SIZE)));
        assert_eq!(size(None, true).ok(), Some(None));
        assert_eq!(size(range(1, 0).as_ref(), false).ok(), Some(Some(1 << 20)));
        assert_eq!(size(range(0, 10 << 20).as_ref(), false).ok(), Some(Some(10 << 20)));
        assert_eq!(size(range(5 << 20, 5 << 20).as_ref(), false).ok(), Some(Some(5 << 20)));
        assert_eq!(
            size(range(1, 1000).as_ref(), false).err().map(|s| s.code()),
            Some(tonic::Code::OutOfRange)
        );
        assert_eq!(
            size(range(-1, 0).as_ref(), false).err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn snapshot_classes_set_freezing_and_may_carry_their_deletion_policy() {
        let params = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(snapshot_freeze(&params(&[])).ok(), Some(true));
        assert_eq!(snapshot_freeze(&params(&[("freezeFilesystem", "false")])).ok(), Some(false));
        let policy = params(&[("deletionPolicy", "Retain"), ("csi.storage.k8s.io/x", "y")]);
        assert_eq!(snapshot_freeze(&policy).ok(), Some(true), "ignored");
        for bad in [&[("deletionPolicy", "Keep")][..], &[("colour", "blue")]] {
            let code = snapshot_freeze(&params(bad)).err().map(|e| tonic::Status::from(e).code());
            assert_eq!(code, Some(tonic::Code::InvalidArgument), "{bad:?}");
        }
    }

    #[test]
    fn an_xfs_volume_under_300_mib_is_made_at_300_mib_unless_its_limit_is_lower() {
        let sized = |fs_param: Option<&str>, fs_cap: &str, mib: i64, limit_mib: i64| {
            let mut r = request(&fs_param.map(|f| vec![("fsType", f)]).unwrap_or_default());
            r.volume_capabilities = vec![cap(Mode::SingleNodeWriter, fs_cap)];
            r.capacity_range = Some(csi::CapacityRange {
                required_bytes: mib << 20,
                limit_bytes: limit_mib << 20,
            });
            create_volume(&r, "default").map(|c| c.size).map_err(|s| (s.code(), s.to_string()))
        };
        assert_eq!(sized(None, "xfs", 1, 0), Ok(Some(300 << 20)), "1 MiB of xfs: 300 MiB");
        assert_eq!(sized(Some("xfs"), "", 299, 1024), Ok(Some(300 << 20)));
        let (code, message) = sized(None, "xfs", 256, 256).expect_err("256 MiB at most");
        assert_eq!(code, tonic::Code::OutOfRange);
        assert!(message.contains("at least 300 MiB") && message.contains("256 MiB"), "{message}");
        assert_eq!(sized(None, "xfs", 300, 0), Ok(Some(300 << 20)));
        assert_eq!(sized(None, "ext4", 16, 0), Ok(Some(16 << 20)), "ext4 has no such minimum");
    }

    #[test]
    fn parameters_become_a_typed_request_and_unknown_ones_are_refused() {
        let r = create_volume(
            &request(&[
                ("pool", "fast"),
                ("preallocation", "full"),
                ("iopsTotal", "500"),
                ("maxChainDepth", "4"),
                ("writeThresholdPercent", "80"),
                ("csi.storage.k8s.io/pvc/name", "x"),
                ("csi.storage.k8s.io/pvc/namespace", "ns"),
                ("csi.storage.k8s.io/pvcannotation/a", "ignored"),
                ("clusterSize", "128Ki"),
                ("extendedL2", "true"),
                ("l2CacheSize", "4Mi"),
            ]),
            "default",
        )
        .expect("valid");
        let f = qsd_csi_model::volume::Format {
            cluster_size: Some(128 << 10),
            extended_l2: true,
            l2_cache_size: Some(4 << 20),
        };
        assert_eq!(r.format, f);
        assert_eq!(
            (r.pool.as_str(), r.preallocation, r.qos.iops_total, r.max_chain_depth),
            ("fast", qsd_csi_model::volume::Preallocation::Full, 500, Some(4))
        );
        let claim: Vec<(&str, &str)> =
            r.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            claim,
            [("csi.storage.k8s.io/pvc/name", "x"), ("csi.storage.k8s.io/pvc/namespace", "ns")],
            "the claim is kept as labels; other provisioner keys are not"
        );
        let mut with_vac = request(&[("iopsTotal", "500")]);
        with_vac.mutable_parameters = [("iopsTotal".to_owned(), "900".to_owned())].into();
        assert_eq!(create_volume(&with_vac, "default").map(|r| r.qos.iops_total).ok(), Some(900));
        with_vac.mutable_parameters = [("colour".to_owned(), "red".to_owned())].into();
        assert!(create_volume(&with_vac, "default").is_err());
        for bad in [
            &[("colour", "red")][..],
            &[("preallocation", "lots")],
            &[("iopsTotal", "-3")],
            &[("fsType", "btrfs")],
            &[("maxChainDepth", "x")],
            &[("writeThresholdPercent", "0")],
            &[("writeThresholdPercent", "100")],
            &[("writeThresholdPercent", "half")],
            &[("clusterSize", "96Ki")],
            &[("clusterSize", "lots")],
            &[("extendedL2", "true"), ("clusterSize", "4Ki")],
            &[("extendedL2", "on")],
            &[("l2CacheSize", "64Ki")],
            &[("autoExpand", "maybe")],
            &[("autoExpandStep", "25%")],
            &[("autoExpand", "true"), ("autoExpandStep", "a lot")],
            &[("autoExpand", "true"), ("autoExpandLimit", "1Mi")],
        ] {
            let err = create_volume(&request(bad), "default").err().map(|s| s.code());
            assert_eq!(err, Some(tonic::Code::InvalidArgument), "{bad:?}");
        }
    }

    #[test]
    fn an_auto_expanding_class_gives_its_volumes_a_policy() {
        use qsd_csi_model::grow::{AutoExpand, Step};
        let r = create_volume(
            &request(&[("autoExpand", "true"), ("autoExpandLimit", "3Gi")]),
            "default",
        )
        .expect("valid");
        let policy =
            AutoExpand { step: Step::Percent(25), limit: Some(3 << 30), threshold_percent: 80 };
        assert_eq!(r.auto_expand, Some(policy));
        let plain = create_volume(&request(&[]), "default").expect("valid");
        assert_eq!(plain.auto_expand, None);
    }

    #[test]
    fn a_volume_source_is_copied_unless_cloning_is_linked() {
        let mut req = request(&[]);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource { volume_id: "vol:p:a".into() },
            )),
        });
        assert_eq!(create_volume(&req, "p").map(|r| r.clone_mode).ok(), Some(CloneMode::Copy));
        req.parameters.insert("cloneMode".into(), "linked".into());
        assert_eq!(create_volume(&req, "p").map(|r| r.clone_mode).ok(), Some(CloneMode::Linked));
        req.parameters.insert("cloneMode".into(), "deep".into());
        assert!(create_volume(&req, "p").is_err());
    }

    #[test]
    fn a_restore_is_a_linked_overlay_whatever_the_class_clone_mode() {
        let mut req = request(&[("cloneMode", "copy")]);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: "snap:p:s".into() },
            )),
        });
        let restore = create_volume(&req, "p").expect("a copy class restores too");
        assert!(matches!(restore.source, Some(VolumeSource::Snapshot(_))));
    }

    #[test]
    fn only_single_node_access_modes_and_known_filesystems_are_supported() {
        assert!(unsupported(&cap(Mode::SingleNodeWriter, "")).is_none());
        assert!(unsupported(&cap(Mode::SingleNodeMultiWriter, "xfs")).is_none());
        assert!(unsupported(&cap(Mode::MultiNodeMultiWriter, "ext4")).is_some());
        assert!(unsupported(&cap(Mode::SingleNodeWriter, "ntfs")).is_some());
        assert!(unsupported(&csi::VolumeCapability::default()).is_some());
    }

    #[test]
    fn any_csi_name_maps_to_a_stable_pool_name() {
        assert_eq!(object_name("pvc-123"), "pvc-123");
        let odd = object_name("weird name/with ../slashes");
        assert!(ObjectName::parse(&odd).is_ok());
        assert_eq!(odd, object_name("weird name/with ../slashes"));
        assert_ne!(odd, object_name("weird name/with ../slashes!"));
        assert!(ObjectName::parse(&object_name(&"x".repeat(500))).is_ok());
    }

    #[test]
    fn pages_follow_tokens_and_a_bad_token_is_aborted() {
        let (first, next) = page((0..5).collect(), 2, "").expect("page");
        assert_eq!((first, next.as_str()), (vec![0, 1], "2"));
        let (rest, next) = page((0..5).collect(), 0, "2").expect("page");
        assert_eq!((rest, next.as_str()), (vec![2, 3, 4], ""));
        assert_eq!(
            page((0..5).collect::<Vec<_>>(), 1, "zz").err().map(|s| s.code()),
            Some(tonic::Code::Aborted)
        );
        assert_eq!(
            page((0..5).collect::<Vec<_>>(), -1, "").err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
}
