//! Bad input gets a typed error and changes nothing on disk.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use qsd_node::engine::{CreateVolume, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::pool::id::{IdKind, ObjectId};
use qsd_node::pool::{ObjectName, PoolName};
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
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let snap = core.create_snapshot(&vol.id, &name("s")).await.expect("snapshot");
    let attached = core
        .create_volume(&CreateVolume::named("local", "busy", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    core.attach(&attached.id, ExportKind::Nbd).await.expect("attach");
    let before = tree(&env.pool_dir());

    // Requests as the wire decoders make them: a name or ID that does not parse is refused
    // there (and never reaches the engine); the rest by the engine. Either way, a typed error.
    let create = |name: &str, size: i64| CreateVolume::named("local", name, size);
    let valid = |name: &str, size: i64| create(name, size).expect("request");
    let mut in_other_pool = valid("x", MIB as i64);
    in_other_pool.pool = PoolName::parse("nope").expect("pool");
    let bad_pool_name = CreateVolume::named("../etc", "x", MIB as i64);
    let mut restore_smaller = valid("r", MIB as i64);
    restore_smaller.source = Some(VolumeSource::Snapshot(snap.id.clone()));
    let mut restore_unknown = valid("r", MIB as i64);
    restore_unknown.source = Some(VolumeSource::Snapshot(id("snap:local@node-1:missing")));
    let clone_malformed = ObjectId::parse(IdKind::Volume, "vol:local@node-1:../v");
    let free = qsd_node::mount::usage(&env.pool_dir()).expect("statvfs").bytes_available;
    let beyond_free = (free + (1 << 30)).min(qsd_node::pool::id::MAX_SIZE);
    let mut too_big_to_preallocate = valid("p", beyond_free as i64);
    too_big_to_preallocate.preallocation = qsd_node::engine::Preallocation::Full;
    let mut zero_depth = valid("d", MIB as i64);
    zero_depth.max_chain_depth = Some(0);

    type Decoded = Result<CreateVolume, qsd_csi_model::Error>;
    let creates: Vec<(&str, Decoded, ErrorKind)> = vec![
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
            Ok(in_other_pool),
            ErrorKind::InvalidArgument,
        ),
        ("malformed pool", bad_pool_name, ErrorKind::InvalidArgument),
        ("restore smaller than snapshot", Ok(restore_smaller), ErrorKind::OutOfRange),
        ("restore unknown snapshot", Ok(restore_unknown), ErrorKind::NotFound),
        // An ID that cannot be ours names nothing held here: NOT_FOUND, as CSI asks of IDs.
        ("clone malformed source", clone_malformed.map(|_| valid("r", 1)), ErrorKind::NotFound),
        ("zero depth", Ok(zero_depth), ErrorKind::InvalidArgument),
        (
            "preallocated beyond free space",
            Ok(too_big_to_preallocate),
            ErrorKind::ResourceExhausted,
        ),
    ];
    for (case, request, kind) in creates {
        let err = match request {
            Err(refused) => qsd_node::Error::from(refused),
            Ok(request) => core.create_volume(&request).await.expect_err(case),
        };
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
    for (case, text, kind) in &ids {
        let id = match ObjectId::parse(IdKind::Volume, text) {
            Err(refused) => {
                assert_eq!(qsd_node::Error::from(refused).kind(), *kind, "{case}");
                continue;
            }
            Ok(id) => id,
        };
        let err = core.delete_volume(&id).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "delete {case}: {err}");
        let err = core.expand_volume(&id, 64 * MIB as i64).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "expand {case}: {err}");
        let err = core.create_snapshot(&id, &name("s2")).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "snapshot {case}: {err}");
        let err = core.attach(&id, ExportKind::Fuse).await.expect_err(case);
        assert_eq!(err.kind(), *kind, "attach {case}: {err}");
    }
    // An ID of the wrong kind never resolves, whatever it names.
    let as_snapshot = core.delete_snapshot(&vol.id).await.expect_err("a volume's ID");
    assert_eq!(as_snapshot.kind(), ErrorKind::NotFound);
    let err =
        core.delete_snapshot(&id("snap:local@node-1:missing")).await.expect_err("unknown snapshot");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let malformed = ObjectId::parse(IdKind::Snapshot, "snap:local@node-1:a/b");
    assert_eq!(
        qsd_node::Error::from(malformed.expect_err("malformed")).kind(),
        ErrorKind::NotFound
    );
    let bad_name = ObjectName::parse("../s").expect_err("bad snapshot name");
    assert_eq!(qsd_node::Error::from(bad_name).kind(), ErrorKind::InvalidArgument);
    let err = core
        .create_snapshot(&attached.id, &name("s"))
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
