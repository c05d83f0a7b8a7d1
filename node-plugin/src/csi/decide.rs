//! What NodeStage, NodePublish, NodeUnstage and NodeGetVolumeHealth decide before (or instead
//! of) touching the host: pure functions of the request, the staging record and what the
//! mounter reports, so every branch is tested without root, a daemon or a kernel device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::csi;
use super::staging::Staged;
use crate::error::{Error, Result};
use qsd_csi_model::health::{Finding, Severity};
use qsd_csi_model::params::{self, FS_TYPE};

/// The filesystem a capability asks for: the capability's, else the volume context's (the
/// class's `fsType`), else ext4; `None` for a block volume.
pub fn fs_type(
    capability: &csi::VolumeCapability,
    context: &HashMap<String, String>,
) -> Result<Option<String>> {
    use csi::volume_capability::AccessType;
    match &capability.access_type {
        Some(AccessType::Mount(m)) => {
            let from_context = context.get(FS_TYPE).map(String::as_str).unwrap_or("");
            let fs = [m.fs_type.as_str(), from_context].into_iter().find(|f| !f.is_empty());
            let fs = fs.unwrap_or("ext4");
            params::fs_type("fs_type", fs)?;
            Ok(Some(fs.to_owned()))
        }
        Some(AccessType::Block(_)) => Ok(None),
        None => Err(Error::invalid("volume_capability", "access type is required")),
    }
}

/// What staging has left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStep {
    /// Already staged there: nothing.
    Done,
    /// Attach, format if empty, mount.
    Stage,
    /// Undo what is left of an earlier stage (killed half-way, or its mount gone), then stage.
    Redo,
}

/// Whether staging formats the device: only when it holds nothing. A device that holds another
/// filesystem is never reformatted. (A stage killed during mkfs is undone by wiping the device,
/// so its retry finds nothing and formats.)
pub fn format_step(device: &Path, found: Option<&str>, wanted: &str) -> Result<bool> {
    match found {
        None => Ok(true),
        Some(fs) if fs == wanted => Ok(false),
        Some(fs) => Err(Error::FailedPrecondition(format!(
            "{} already holds {fs}, not {wanted}; refusing to reformat",
            device.display()
        ))),
    }
}

/// Refuses a filesystem its volume is too small for, naming the minimum (mkfs.xfs would fail
/// with its usage text).
pub fn fs_fits(fs: &str, size: u64) -> Result<()> {
    let minimum = params::XFS_MIN_SIZE as u64;
    if fs == "xfs" && size < minimum {
        return Err(Error::OutOfRange {
            requested: size as i64,
            reason: format!(
                "an xfs filesystem needs a volume of at least {} MiB; this one has {} MiB",
                minimum >> 20,
                size >> 20
            ),
        });
    }
    Ok(())
}

/// Whether a volume already `staged` (per its record) at `staging` needs staging; staging it
/// at another path is ALREADY_EXISTS. A mount volume whose staging mount is gone (a reboot)
/// is staged again.
pub fn stage_step(
    id: &str,
    staged: Option<&Staged>,
    staging: &Path,
    staging_mounted: bool,
) -> Result<StageStep> {
    let Some(existing) = staged else { return Ok(StageStep::Stage) };
    if existing.staging_path != staging {
        return Err(Error::AlreadyExists {
            what: "staged volume",
            name: id.to_owned(),
            difference: format!("staged at {}", existing.staging_path.display()),
        });
    }
    if !existing.complete {
        return Ok(StageStep::Redo);
    }
    if existing.fs_type.is_none() || staging_mounted {
        return Ok(StageStep::Done);
    }
    // Its mount gone (a reboot, or unmounted behind the plugin's back): take apart whatever of
    // it is left before staging again, not leave its device attached beside a new one.
    Ok(StageStep::Redo)
}

/// The options a staging mount gets: the capability's, plus `nouuid` for xfs (a restored
/// snapshot or a clone carries its source's XFS UUID and could not be mounted beside it).
pub fn mount_flags(capability: &csi::VolumeCapability, fs: &str) -> Vec<String> {
    use csi::volume_capability::AccessType;
    let mut flags = match &capability.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    };
    if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
        flags.push("nouuid".into());
    }
    flags
}

/// The SELinux label a mount capability asks for (`context="…"` among its mount flags: what
/// the kubelet passes with SELinuxMount), without its quotes.
pub fn selinux_context(capability: &csi::VolumeCapability) -> Option<String> {
    use csi::volume_capability::AccessType;
    let Some(AccessType::Mount(m)) = &capability.access_type else { return None };
    m.mount_flags
        .iter()
        .find_map(|f| f.strip_prefix("context="))
        .map(|c| c.trim_matches(|q| q == '"' || q == '\'').to_owned())
}

/// A publish's label against its staging mount's: a bind carries the label the filesystem was
/// mounted with, so a publish asking for another one (or for one when the stage set none) is
/// refused rather than handed a differently labelled mount.
pub fn context_conflict(id: &str, staged: Option<&str>, wanted: Option<&str>) -> Result<()> {
    match (staged, wanted) {
        (_, None) => Ok(()),
        (Some(s), Some(w)) if s == w => Ok(()),
        (staged, Some(wanted)) => Err(Error::FailedPrecondition(format!(
            "volume {id} is mounted with SELinux context {}; a publish asks for {wanted:?} (a volume's pods on one node share its label)",
            staged.map_or("none".to_owned(), |s| format!("{s:?}"))
        ))),
    }
}

/// What publishing has left to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishStep {
    /// Already published at the target: nothing.
    Done,
    /// Bind `source` (the staging mount, or a block volume's device node) onto the target,
    /// which is a directory for a filesystem and a file for a device.
    Bind {
        /// What to bind.
        source: PathBuf,
        /// A block volume: the target is a file.
        block: bool,
    },
}

/// Whether and how `target` gets the volume: it must be staged, at the staging path the
/// request names; a single-writer volume is published at one target only.
pub fn publish_step(
    id: &str,
    staged: Option<&Staged>,
    staging: &Path,
    target: &Path,
    target_mounted: bool,
) -> Result<PublishStep> {
    use csi::volume_capability::access_mode::Mode;
    let record = staged.filter(|r| r.complete).ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
    })?;
    if record.staging_path != staging {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is staged at {}, not {}",
            record.staging_path.display(),
            staging.display()
        )));
    }
    if target_mounted && record.targets.contains(target) {
        return Ok(PublishStep::Done);
    }
    let single_writer = record.access_mode == Mode::SingleNodeSingleWriter as i32;
    if let Some(other) = record.targets.iter().find(|t| *t != target).filter(|_| single_writer) {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is single-writer and already published at {}",
            other.display()
        )));
    }
    Ok(match record.fs_type {
        Some(_) => PublishStep::Bind { source: record.staging_path.clone(), block: false },
        None => PublishStep::Bind { source: record.device.clone(), block: true },
    })
}

/// After `target` is unmounted: the staging record without it, to write back, if it listed it
/// (an unpublish of a target never published, or repeated, changes no record).
pub fn unpublished(staged: Option<Staged>, target: &Path) -> Option<Staged> {
    let mut record = staged?;
    record.targets.remove(target).then_some(record)
}

/// Refuses to unstage while the volume is used anywhere but its staging path: `users` are the
/// mounts of its device, and the published targets still mounted (a block volume's bind-mounted
/// device node shows up as devtmpfs, so the record names those).
pub fn unstage_blocker(id: &str, record: &Staged, users: &[PathBuf]) -> Result<()> {
    match users.iter().find(|m| **m != record.staging_path) {
        Some(user) => Err(Error::FailedPrecondition(format!(
            "volume {id} is still mounted at {}; unpublish it first",
            user.display()
        ))),
        None => Ok(()),
    }
}

/// What the node can see of a volume's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The daemon exports it.
    pub attached: bool,
    /// Its kernel device exists.
    pub device_exists: bool,
    /// It is a ublk device with no server in this plugin.
    pub ublk_unserved: bool,
}

/// What the node sees wrong with a volume (NodeGetVolumeHealth adds the engine's findings):
/// a staged volume needs its export, its kernel device and, for ublk, a server in this plugin.
/// A volume not staged here is not in use here: nothing to report from this node.
pub fn node_findings(staged: bool, seen: Seen) -> Vec<Finding> {
    let finding =
        |reason: &str, message: &str| vec![Finding::new(Severity::Inaccessible, reason, message)];
    match (staged, seen.attached) {
        (false, _) => Vec::new(),
        (true, false) => {
            finding("ExportGone", "the volume is staged but the daemon does not export it")
        }
        (true, true) if seen.ublk_unserved => {
            finding("UblkUnserved", "the ublk device has no server in this plugin")
        }
        (true, true) if !seen.device_exists => finding("DeviceGone", "the kernel device is gone"),
        (true, true) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Backend;
    use crate::error::ErrorKind;
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};

    fn mount_cap(fs: &str, flags: &[&str]) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }
    }

    fn block_cap() -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }
    }

    fn staged(fs: Option<&str>, mode: Mode, targets: &[&str]) -> Staged {
        Staged {
            volume_id: "vol:p@n:v".into(),
            staging_path: "/stage/v".into(),
            backend: Backend::Nbd,
            device: "/dev/nbd3".into(),
            fs_type: fs.map(str::to_owned),
            access_mode: mode as i32,
            targets: targets.iter().map(PathBuf::from).collect(),
            complete: true,
            formatting: false,
            selinux_context: None,
        }
    }

    #[test]
    fn the_selinux_label_is_read_from_the_mount_flags_and_a_publish_must_match_the_stage() {
        let label = "system_u:object_r:container_file_t:s0:c1,c2";
        let quoted = format!("context=\"{label}\"");
        assert_eq!(
            selinux_context(&mount_cap("xfs", &["noatime", &quoted])).as_deref(),
            Some(label)
        );
        assert_eq!(selinux_context(&mount_cap("xfs", &["noatime"])), None);
        assert_eq!(selinux_context(&block_cap()), None);
        let table = [
            ("no label asked", Some(label), None, Ok(())),
            ("the same label", Some(label), Some(label), Ok(())),
            (
                "another label",
                Some(label),
                Some("system_u:object_r:container_file_t:s0:c3,c4"),
                Err(ErrorKind::FailedPrecondition),
            ),
            ("a label, none at stage", None, Some(label), Err(ErrorKind::FailedPrecondition)),
        ];
        for (what, staged, wanted, expected) in table {
            assert_eq!(kind(context_conflict("v", staged, wanted)), expected, "{what}");
        }
    }

    fn kind<T: std::fmt::Debug>(r: Result<T>) -> std::result::Result<T, ErrorKind> {
        r.map_err(|e| e.kind())
    }

    #[test]
    fn the_filesystem_comes_from_the_capability_then_the_class_then_ext4() {
        let ctx = |fs: &str| HashMap::from([(FS_TYPE.to_owned(), fs.to_owned())]);
        let none = HashMap::new();
        type Case<'a> = (
            &'a str,
            csi::VolumeCapability,
            HashMap<String, String>,
            Result<Option<&'a str>, ErrorKind>,
        );
        let cases: [Case; 6] = [
            ("capability wins", mount_cap("xfs", &[]), ctx("ext4"), Ok(Some("xfs"))),
            ("the class's fsType", mount_cap("", &[]), ctx("xfs"), Ok(Some("xfs"))),
            ("ext4 by default", mount_cap("", &[]), none.clone(), Ok(Some("ext4"))),
            ("block has none", block_cap(), ctx("xfs"), Ok(None)),
            ("unknown fs", mount_cap("btrfs", &[]), none.clone(), Err(ErrorKind::InvalidArgument)),
            (
                "no access type",
                csi::VolumeCapability::default(),
                none,
                Err(ErrorKind::InvalidArgument),
            ),
        ];
        for (what, cap, context, expected) in cases {
            let got = kind(fs_type(&cap, &context));
            assert_eq!(got.as_ref().map(|f| f.as_deref()), expected.as_ref().map(|f| *f), "{what}");
        }
    }

    #[test]
    fn stage_decisions() {
        let at = Path::new("/stage/v");
        let mounted = staged(Some("ext4"), Mode::SingleNodeWriter, &[]);
        let block = staged(None, Mode::SingleNodeWriter, &[]);
        let half = Staged { complete: false, ..mounted.clone() };
        let half_block = Staged { complete: false, ..block.clone() };
        type Case<'a> = (&'a str, Option<&'a Staged>, &'a Path, bool, Result<StageStep, ErrorKind>);
        let cases: [Case; 8] = [
            (
                "a stage killed before its mount: undo, then stage",
                Some(&half),
                at,
                false,
                Ok(StageStep::Redo),
            ),
            (
                "a stage killed after its mount: undo, then stage",
                Some(&half),
                at,
                true,
                Ok(StageStep::Redo),
            ),
            (
                "a block stage killed half-way: undo, then stage",
                Some(&half_block),
                at,
                false,
                Ok(StageStep::Redo),
            ),
            ("not staged yet", None, at, false, Ok(StageStep::Stage)),
            ("staged and mounted: idempotent", Some(&mounted), at, true, Ok(StageStep::Done)),
            (
                "record but mount gone (reboot): undo what is left, then stage",
                Some(&mounted),
                at,
                false,
                Ok(StageStep::Redo),
            ),
            ("a block volume has no staging mount", Some(&block), at, false, Ok(StageStep::Done)),
            (
                "staged elsewhere",
                Some(&mounted),
                Path::new("/other"),
                true,
                Err(ErrorKind::AlreadyExists),
            ),
        ];
        for (what, record, path, is_mounted, expected) in cases {
            assert_eq!(kind(stage_step("vol:p@n:v", record, path, is_mounted)), expected, "{what}");
        }
    }

    #[test]
    fn a_device_is_formatted_only_when_it_holds_nothing() {
        let dev = Path::new("/dev/loop3");
        type Case<'a> = (&'a str, Option<&'a str>, Result<bool, ErrorKind>);
        let cases: [Case; 3] = [
            ("empty", None, Ok(true)),
            ("already the wanted filesystem", Some("ext4"), Ok(false)),
            ("another filesystem", Some("xfs"), Err(ErrorKind::FailedPrecondition)),
        ];
        for (what, found, expected) in cases {
            assert_eq!(kind(format_step(dev, found, "ext4")), expected, "{what}");
        }
    }

    #[test]
    fn a_filesystem_too_large_for_its_volume_is_out_of_range_and_names_the_minimum() {
        let e = fs_fits("xfs", 64 << 20).expect_err("64 MiB is too small for xfs");
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert!(
            e.to_string().contains("at least 300 MiB") && e.to_string().contains("64 MiB"),
            "{e}"
        );
        assert!(fs_fits("xfs", 300 << 20).is_ok());
        assert!(fs_fits("ext4", 16 << 20).is_ok(), "ext4 has no such minimum");
    }

    #[test]
    fn xfs_mounts_get_nouuid_once_and_flags_are_kept() {
        assert_eq!(mount_flags(&mount_cap("xfs", &["noatime"]), "xfs"), ["noatime", "nouuid"]);
        assert_eq!(mount_flags(&mount_cap("xfs", &["nouuid"]), "xfs"), ["nouuid"]);
        assert_eq!(mount_flags(&mount_cap("ext4", &["ro"]), "ext4"), ["ro"]);
        assert!(mount_flags(&block_cap(), "ext4").is_empty());
    }

    #[test]
    fn publish_decisions() {
        let (stage, t1, t2) = (Path::new("/stage/v"), Path::new("/t/1"), Path::new("/t/2"));
        let fs = staged(Some("ext4"), Mode::SingleNodeWriter, &["/t/1"]);
        let fresh = staged(Some("ext4"), Mode::SingleNodeWriter, &[]);
        let block = staged(None, Mode::SingleNodeMultiWriter, &["/t/1"]);
        let single = staged(Some("xfs"), Mode::SingleNodeSingleWriter, &["/t/1"]);
        let bind_fs = PublishStep::Bind { source: "/stage/v".into(), block: false };
        let bind_dev = PublishStep::Bind { source: "/dev/nbd3".into(), block: true };
        type Case<'a> =
            (&'a str, Option<&'a Staged>, &'a Path, &'a Path, bool, Result<PublishStep, ErrorKind>);
        let half = Staged { complete: false, ..fresh.clone() };
        let cases: Vec<Case> = vec![
            ("not staged", None, stage, t1, false, Err(ErrorKind::FailedPrecondition)),
            (
                "staged half-way, or being unstaged",
                Some(&half),
                stage,
                t1,
                false,
                Err(ErrorKind::FailedPrecondition),
            ),
            (
                "staged at another path",
                Some(&fs),
                Path::new("/x"),
                t1,
                false,
                Err(ErrorKind::FailedPrecondition),
            ),
            (
                "first target: bind the staging mount",
                Some(&fresh),
                stage,
                t1,
                false,
                Ok(bind_fs.clone()),
            ),
            ("same target, mounted: idempotent", Some(&fs), stage, t1, true, Ok(PublishStep::Done)),
            (
                "same target, mount gone: bind again",
                Some(&fs),
                stage,
                t1,
                false,
                Ok(bind_fs.clone()),
            ),
            ("a second target of a multi-reader volume", Some(&fs), stage, t2, false, Ok(bind_fs)),
            ("block: bind the device node", Some(&block), stage, t2, false, Ok(bind_dev)),
            (
                "single-writer at a second target",
                Some(&single),
                stage,
                t2,
                false,
                Err(ErrorKind::FailedPrecondition),
            ),
        ];
        for (what, record, staging, target, mounted, expected) in cases {
            assert_eq!(
                kind(publish_step("vol:p@n:v", record, staging, target, mounted)),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn unpublish_decisions() {
        let two = staged(Some("ext4"), Mode::SingleNodeMultiWriter, &["/t/1", "/t/2"]);
        let after = unpublished(Some(two.clone()), Path::new("/t/1")).expect("listed");
        assert_eq!(after.targets.iter().collect::<Vec<_>>(), [Path::new("/t/2")]);
        assert_eq!(unpublished(Some(after.clone()), Path::new("/t/1")), None, "repeated: no write");
        assert_eq!(unpublished(Some(two), Path::new("/t/9")), None, "never published there");
        assert_eq!(unpublished(None, Path::new("/t/1")), None, "not staged (unstaged already)");
    }

    #[test]
    fn unstage_waits_for_every_publish_to_go() {
        let record = staged(Some("ext4"), Mode::SingleNodeWriter, &[]);
        let only_staging = [PathBuf::from("/stage/v")];
        assert!(unstage_blocker("v", &record, &only_staging).is_ok());
        assert!(unstage_blocker("v", &record, &[]).is_ok());
        let still = [PathBuf::from("/stage/v"), PathBuf::from("/t/1")];
        let e = unstage_blocker("v", &record, &still).expect_err("published");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("/t/1"), "{e}");
    }

    #[test]
    fn node_findings_by_what_the_node_sees() {
        let seen = |attached, device_exists, ublk_unserved| Seen {
            attached,
            device_exists,
            ublk_unserved,
        };
        let cases = [
            (true, seen(true, true, false), None),
            (true, seen(true, true, true), Some("UblkUnserved")),
            (true, seen(true, false, false), Some("DeviceGone")),
            (true, seen(false, true, false), Some("ExportGone")),
            (false, seen(false, false, false), None),
            (false, seen(true, false, false), None),
        ];
        for (is_staged, s, reason) in cases {
            let found = node_findings(is_staged, s);
            assert_eq!(found.first().map(|f| f.reason.as_str()), reason, "{s:?}");
            assert!(found.len() <= 1 && found.iter().all(|f| f.severity == Severity::Inaccessible));
        }
    }
}
