//! Bad input gets a typed error and changes nothing on disk.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use qsd_node::engine::{CreateVolume, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::ErrorKind;

/// Every file under `dir` with its contents.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_returns_a_typed_error_and_changes_nothing_on_disk() {
    let env = Env::new().await;
    let core = env.core();
    let vol =
        core.create_volume(&CreateVolume::new("local", "v", 8 * MIB as i64)).await.expect("create");
    let snap = core.create_snapshot(&vol.id, "s").await.expect("snapshot");
    let attached = core
        .create_volume(&CreateVolume::new("local", "busy", 8 * MIB as i64))
        .await
        .expect("create");
    core.attach(&attached.id, ExportKind::Nbd).await.expect("attach");
    let before = tree(&env.pool_dir());

    let create = |name: &str, size: i64| CreateVolume::new("local", name, size);
    let mut in_other_pool = create("x", MIB as i64);
    in_other_pool.pool = "nope".into();
    let mut bad_pool_name = create("x", MIB as i64);
    bad_pool_name.pool = "../etc".into();
    let mut restore_smaller = create("r", MIB as i64);
    restore_smaller.source = Some(VolumeSource::Snapshot(snap.id.clone()));
    let mut restore_unknown = create("r", MIB as i64);
    restore_unknown.source = Some(VolumeSource::Snapshot("snap:local@node-1:missing".into()));
    let mut clone_malformed = create("r", MIB as i64);
    clone_malformed.source = Some(VolumeSource::Volume("vol:local@node-1:../v".into()));
    let free = qsd_node::mount::usage(&env.pool_dir()).expect("statvfs").bytes_available;
    let beyond_free = (free + (1 << 30)).min(qsd_node::pool::id::MAX_SIZE);
    let mut too_big_to_preallocate = create("p", beyond_free as i64);
    too_big_to_preallocate.preallocation = qsd_node::engine::Preallocation::Full;
    let mut zero_depth = create("d", MIB as i64);
    zero_depth.max_chain_depth = Some(0);

    let creates: Vec<(&str, CreateVolume, ErrorKind)> = vec![
        ("dot-dot name", create("..", MIB as i64), ErrorKind::InvalidArgument),
        ("slash in name", create("a/b", MIB as i64), ErrorKind::InvalidArgument),
        ("traversal name", create("../../etc/passwd", MIB as i64), ErrorKind::InvalidArgument),
        ("empty name", create("", MIB as i64), ErrorKind::InvalidArgument),
        ("zero size", create("z", 0), ErrorKind::InvalidArgument),
        ("negative size", create("n", -1), ErrorKind::InvalidArgument),
        ("absurd size", create("a", i64::MAX), ErrorKind::OutOfRange),
        ("re-create, other size", create("v", 16 * MIB as i64), ErrorKind::AlreadyExists),
        (
            "unknown pool (a bad parameter, not a missing object)",
            in_other_pool,
            ErrorKind::InvalidArgument,
        ),
        ("malformed pool", bad_pool_name, ErrorKind::InvalidArgument),
        ("restore smaller than snapshot", restore_smaller, ErrorKind::OutOfRange),
        ("restore unknown snapshot", restore_unknown, ErrorKind::NotFound),
        // An ID that cannot be ours names nothing held here: NOT_FOUND, as CSI asks of IDs.
        ("clone malformed source", clone_malformed, ErrorKind::NotFound),
        ("zero depth", zero_depth, ErrorKind::InvalidArgument),
        ("preallocated beyond free space", too_big_to_preallocate, ErrorKind::ResourceExhausted),
    ];
    for (case, request, kind) in creates {
        let err = core.create_volume(&request).await.expect_err(case);
        assert_eq!(err.kind(), kind, "{case}: {err}");
    }

    let ids: Vec<(&str, &str, ErrorKind)> = vec![
        ("unknown volume", "vol:local@node-1:missing", ErrorKind::NotFound),
        ("other node", "vol:local@node-2:v", ErrorKind::NotFound),
        ("shared form of a local pool", "vol:local:v", ErrorKind::NotFound),
        ("malformed", "garbage", ErrorKind::NotFound),
        ("traversal", "vol:local@node-1:../v", ErrorKind::NotFound),
        ("snapshot id for a volume", "snap:local@node-1:s", ErrorKind::NotFound),
    ];
    for (case, id, kind) in &ids {
        let err = core.delete_volume(id).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "delete {case}: {err}");
        let err = core.expand_volume(id, 64 * MIB as i64).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "expand {case}: {err}");
        let err = core.create_snapshot(id, "s2").await.expect_err(case);
        assert_eq!(err.kind(), *kind, "snapshot {case}: {err}");
        let err = core.attach(id, ExportKind::Fuse).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "attach {case}: {err}");
    }
    let err =
        core.delete_snapshot("snap:local@node-1:missing").await.expect_err("unknown snapshot");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = core.delete_snapshot("snap:local@node-1:a/b").await.expect_err("malformed snapshot");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = core.create_snapshot(&vol.id, "../s").await.expect_err("bad snapshot name");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = core
        .create_snapshot(&attached.id, "s")
        .await
        .expect_err("snapshot name taken by another volume");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let err = core.expand_volume(&vol.id, 4 * MIB as i64).await.expect_err("shrink");
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    let err = core.expand_volume(&vol.id, 0).await.expect_err("zero");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = core.delete_volume(&attached.id).await.expect_err("delete while attached");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let err = core
        .attach(&attached.id, ExportKind::Fuse)
        .await
        .expect_err("attached with another export");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    let err = core
        .set_write_threshold(&vol.id, MIB, MIB)
        .await
        .expect_err("threshold on a detached volume");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    assert_eq!(tree(&env.pool_dir()), before, "the pool is byte-for-byte unchanged");
}
