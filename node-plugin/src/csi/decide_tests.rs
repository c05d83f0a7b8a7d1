//! Tests of [`super`].

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
    assert_eq!(selinux_context(&mount_cap("xfs", &["noatime", &quoted])).as_deref(), Some(label));
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
        ("no access type", csi::VolumeCapability::default(), none, Err(ErrorKind::InvalidArgument)),
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
    assert!(e.to_string().contains("at least 300 MiB") && e.to_string().contains("64 MiB"), "{e}");
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
        ("same target, mount gone: bind again", Some(&fs), stage, t1, false, Ok(bind_fs.clone())),
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
    let seen =
        |attached, device_exists, ublk_unserved| Seen { attached, device_exists, ublk_unserved };
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
