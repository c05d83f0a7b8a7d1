//! `pool check`: each kind of damage planted in a real pool (made by the engine with a real
//! daemon, then left alone) is found; `--repair` removes only what loses nothing, leaves every
//! volume's and snapshot's data as it was, and a second check passes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use qsd_node::engine::CreateVolume;
use qsd_node::graph::ExportKind;
use qsd_node::pool::check::{self, Depth, Finding};
use qsd_node::pool::{LayerId, PoolKind};

/// Makes `path` look untouched for two hours: older than any grace period of a check.
fn age(path: &Path) {
    let file = std::fs::File::options().write(true).open(path).expect("open to age");
    let then = SystemTime::now() - Duration::from_secs(7200);
    file.set_times(std::fs::FileTimes::new().set_modified(then).set_accessed(then)).expect("age");
}

fn qcow2(path: &Path, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-u", "-F", "qcow2", "-b", b]);
    }
    let path = path.to_str().expect("utf-8");
    args.extend([path, "16M"]);
    assert!(qemu_img(&args).status.success(), "qemu-img create {path}");
}

/// Every file of the pool's volumes' and snapshots' layers with its bytes.
fn data_files(pool: &Path, layers: &[LayerId]) -> Vec<(PathBuf, Vec<u8>)> {
    layers
        .iter()
        .map(|l| pool.join("layers").join(format!("{l}.qcow2")))
        .map(|p| (p.clone(), std::fs::read(&p).expect("read layer")))
        .collect()
}

/// A pool with two volumes (one written), a snapshot and a two-layer chain; the engine gone
/// and its daemon stopped. Returns every layer something uses.
async fn made_pool(env: &mut Env) -> Vec<LayerId> {
    let core = env.core();
    let a = core
        .create_volume(&CreateVolume::named("local", "a", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    core.create_volume(&CreateVolume::named("local", "b", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let path = core.attach(&a.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&path, 0, &pattern(3, MIB as usize));
    core.create_snapshot(&a.id, &name("s")).await.expect("snapshot");
    write_at(&path, MIB, &pattern(4, MIB as usize));
    core.detach(&a.id).await.expect("detach");
    let (_, chain) = core.volume_chain(&a.id).expect("chain");
    let (_, other) = core.volume_chain(&id(&format!("{}", a.id).replace(":a", ":b"))).expect("b");
    drop(core);
    env.kill_daemon();
    drop(env.engine.take());
    chain.into_iter().chain(other).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_removes_only_what_nothing_uses_and_a_second_check_passes() {
    let mut env = Env::new().await;
    let used = made_pool(&mut env).await;
    let pool = env.pool_dir();
    let layers = pool.join("layers");
    let before = data_files(&pool, &used);
    let clean = check::check(&pool, PoolKind::Local, Depth::Images).await.expect("check");
    assert_eq!(clean.findings, vec![], "the engine's pool is clean");
    assert_eq!((clean.volumes, clean.snapshots, clean.layers), (2, 1, 3));

    // An image no record names; a layer (record and image) nothing uses, on top of a used
    // one; an interrupted record write.
    let orphan = LayerId::random();
    qcow2(&layers.join(format!("{orphan}.qcow2")), None);
    age(&layers.join(format!("{orphan}.qcow2")));
    let unused = LayerId::random();
    let backing = format!("{}.qcow2", used[0]);
    qcow2(&layers.join(format!("{unused}.qcow2")), Some(&backing));
    let record = format!("{{\"id\":\"{unused}\",\"backing\":\"{}\"}}", used[0]);
    std::fs::write(layers.join(format!("{unused}.json")), record).expect("record");
    age(&layers.join(format!("{unused}.json")));
    let temp = pool.join("volumes/.a.json.0123.tmp");
    std::fs::write(&temp, b"{\"half\":").expect("temp");
    age(&temp);
    // And a fresh image with no record: maybe a create in progress, so not a finding yet.
    let young = LayerId::random();
    qcow2(&layers.join(format!("{young}.qcow2")), None);

    let found = check::check(&pool, PoolKind::Local, Depth::Images).await.expect("check");
    let expected = vec![
        Finding::Unreferenced { layer: unused },
        Finding::OrphanImage { file: format!("{orphan}.qcow2") },
        Finding::LeftoverTemp { path: temp.clone() },
    ];
    for f in &expected {
        assert!(found.findings.contains(f), "{f} not found in {:?}", found.findings);
    }
    assert_eq!(found.findings.len(), expected.len(), "{:?}", found.findings);

    let (repaired, after) =
        check::repair(&pool, PoolKind::Local, Depth::Images).await.expect("repair");
    assert_eq!(repaired.removed.len(), 3, "{:?}", repaired.removed);
    assert_eq!(after.findings, vec![], "the second check passes");
    assert!(!temp.exists() && !layers.join(format!("{unused}.qcow2")).exists());
    assert!(layers.join(format!("{young}.qcow2")).exists(), "a young image is left alone");
    assert_eq!(data_files(&pool, &used), before, "no volume or snapshot data touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_that_loses_data_is_found_and_never_touched_by_a_repair() {
    let mut env = Env::new().await;
    let used = made_pool(&mut env).await;
    let pool = env.pool_dir();
    let layers = pool.join("layers");
    let volume_b = std::fs::read_to_string(pool.join("volumes/b.json")).expect("b");

    // b's only layer is gone.
    let lost = *used.last().expect("b's layer");
    std::fs::remove_file(layers.join(format!("{lost}.qcow2"))).expect("remove");
    // A snapshot naming a layer with no record.
    let nowhere = LayerId::random();
    let snapshot = std::fs::read_to_string(pool.join("snapshots/s.json")).expect("s");
    let dangling = snapshot.replace(&used[1].to_string(), &nowhere.to_string());
    std::fs::write(pool.join("snapshots/t.json"), dangling.replace("\"s\"", "\"t\"")).expect("t");
    // Records that cannot be read, or describe another object.
    std::fs::write(pool.join("snapshots/garbage.json"), b"\x00\xff not json").expect("garbage");
    std::fs::write(pool.join("volumes/c.json"), &volume_b).expect("c says it is b");
    // Two layers backing each other.
    let (x, y) = (LayerId::random(), LayerId::random());
    for (me, other) in [(x, y), (y, x)] {
        qcow2(&layers.join(format!("{me}.qcow2")), Some(&format!("{other}.qcow2")));
        let record = format!("{{\"id\":\"{me}\",\"backing\":\"{other}\"}}");
        std::fs::write(layers.join(format!("{me}.json")), record).expect("record");
    }
    // The snapshot's layer with another backing than its record says; the head not qcow2.
    let head = used[0];
    let snap_layer = used[1];
    let (head_path, snap_path) =
        (layers.join(format!("{head}.qcow2")), layers.join(format!("{snap_layer}.qcow2")));
    let rebased = ["rebase", "-u", "-F", "qcow2", "-b", "elsewhere.qcow2", "-f", "qcow2"];
    let mut args = rebased.to_vec();
    args.push(snap_path.to_str().expect("utf-8"));
    let snapshot_before = std::fs::read(&snap_path).expect("read");
    assert!(qemu_img(&args).status.success(), "rebase");
    let mut head_bytes = std::fs::read(&head_path).expect("read");
    head_bytes[..4].copy_from_slice(b"XXXX");
    std::fs::write(&head_path, &head_bytes).expect("unmake the header");
    assert_ne!(std::fs::read(&snap_path).expect("read"), snapshot_before);

    let found = check::check(&pool, PoolKind::Local, Depth::Images).await.expect("check");
    let kinds: Vec<&str> = found
        .findings
        .iter()
        .map(|f| match f {
            Finding::BadRecord { .. } => "bad-record",
            Finding::MissingImage { .. } => "missing-image",
            Finding::Dangling { .. } => "dangling",
            Finding::Loop { .. } => "loop",
            Finding::Damaged { .. } => "damaged",
            Finding::OrphanImage { .. } | Finding::Unreferenced { .. } => "unused",
            Finding::LeftoverTemp { .. } => "temp",
        })
        .collect();
    for kind in ["bad-record", "missing-image", "dangling", "loop", "damaged"] {
        assert!(kinds.contains(&kind), "no {kind} in {:?}", found.findings);
    }
    assert_eq!(kinds.iter().filter(|k| **k == "bad-record").count(), 2, "{:?}", found.findings);
    assert_eq!(kinds.iter().filter(|k| **k == "damaged").count(), 2, "{:?}", found.findings);
    assert!(found.findings.contains(&Finding::MissingImage { layer: lost }));
    let damaged_detail = found.findings.iter().find_map(|f| match f {
        Finding::Damaged { layer, detail } if *layer == snap_layer => Some(detail.clone()),
        _ => None,
    });
    assert!(damaged_detail.is_some_and(|d| d.contains("elsewhere.qcow2")), "{:?}", found.findings);

    // The records-only depth (what a start-up runs) finds all but what needs the images.
    let quick = check::check(&pool, PoolKind::Local, Depth::Records).await.expect("check");
    assert!(quick.findings.iter().all(|f| !matches!(f, Finding::Damaged { .. })));
    assert_eq!(quick.findings.len(), found.findings.len() - 2);

    let files_before: Vec<_> = walk(&pool);
    let (repaired, after) =
        check::repair(&pool, PoolKind::Local, Depth::Images).await.expect("repair");
    assert!(repaired.removed.iter().all(Finding::repairable), "{:?}", repaired.removed);
    assert!(after.findings.iter().all(|f| !f.repairable()));
    let untouched: Vec<_> = walk(&pool)
        .into_iter()
        .filter(|(p, _)| !repaired.removed.iter().any(|f| names(f, p)))
        .collect();
    let before: Vec<_> =
        files_before.into_iter().filter(|(p, _)| untouched.iter().any(|(q, _)| q == p)).collect();
    assert_eq!(untouched, before, "every file the damage concerns is as it was");
    assert!(pool.join("snapshots/garbage.json").exists() && pool.join("volumes/c.json").exists());
}

/// Whether a repaired finding is about file `path`.
fn names(finding: &Finding, path: &Path) -> bool {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match finding {
        Finding::OrphanImage { file: f } => f == file,
        Finding::Unreferenced { layer } => file.starts_with(&layer.to_string()),
        Finding::LeftoverTemp { path: p } => p == path,
        _ => false,
    }
}

/// Every file under `dir` with its bytes, in path order.
fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("list").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push((path.clone(), std::fs::read(&path).expect("read")));
        }
    }
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_is_refused_while_a_process_holds_the_pools_images_open() {
    let env = Env::new().await;
    let core = env.core();
    let v = core
        .create_volume(&CreateVolume::named("local", "held", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    core.attach(&v.id, ExportKind::Fuse).await.expect("attach");
    let refused = check::repair(&env.pool_dir(), PoolKind::Local, Depth::Records).await;
    let e = refused.expect_err("the daemon holds the volume's image open");
    assert_eq!(e.kind(), qsd_node::ErrorKind::FailedPrecondition, "{e}");
    assert!(e.to_string().contains("stop the driver"), "{e}");
}
