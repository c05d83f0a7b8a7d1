//! Tests of [`super`].

use super::*;
use qsd_csi_model::volume::{Format, Preallocation, Qos};
use std::collections::BTreeMap;

#[test]
fn a_volume_record_written_before_the_model_types_loads_and_writes_back_the_same() {
    // Written by `serde_json::to_string_pretty` at a5d9acb, when records held QMP's types.
    let old = include_str!("../../tests/fixtures/volume-record-a5d9acb.json");
    let record: VolumeRecord = serde_json::from_str(old).expect("an old record loads");
    assert_eq!(record.preallocation, Preallocation::Falloc);
    assert_eq!(record.qos, Qos { iops_total: 500, bps_read: 10 << 20, ..Qos::default() });
    assert_eq!(record.labels.get("csi.storage.k8s.io/pvc/name").map(String::as_str), Some("data"));
    let again = serde_json::to_string_pretty(&record).expect("json");
    assert_eq!(again, old, "today's code writes the record byte for byte as before");
}

fn n(name: &str) -> ObjectName {
    ObjectName::parse(name).expect("name")
}

fn node(name: &str) -> NodeName {
    NodeName::parse(name).expect("node")
}

fn pool(dir: &Path) -> Pool {
    Pool::open(dir, PoolName::parse("p").expect("name"), PoolKind::Local).expect("open")
}

fn layer(pool: &Pool, backing: Option<LayerId>) -> LayerId {
    let id = LayerId::random();
    std::fs::write(pool.layer_path(id), b"image").expect("image");
    pool.put_layer(LayerRecord { id, backing }).expect("record");
    id
}

fn volume(name: &str, head: LayerId) -> VolumeRecord {
    VolumeRecord {
        name: n(name),
        uid: LayerId::random(),
        size: 1 << 20,
        head,
        preallocation: Preallocation::Off,
        qos: Qos::default(),
        max_chain_depth: 8,
        source: None,
        labels: BTreeMap::new(),
        format: Format::default(),
        auto_expand: None,
        home: None,
    }
}

#[test]
fn a_layer_is_deleted_only_when_no_volume_snapshot_or_child_refers_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pool(dir.path());
    let base = layer(&p, None);
    let head = layer(&p, Some(base));
    p.put_volume(volume("v", head)).expect("volume");
    p.put_snapshot(SnapshotRecord {
        name: n("s"),
        source_volume: n("v"),
        layer: base,
        size: 1 << 20,
        created_unix: 0,
        group: None,
    })
    .expect("snapshot");
    assert_eq!(p.remove_snapshot(&n("s")).expect("remove"), vec![], "base still backs the head");
    assert!(p.layer_path(base).exists());
    assert_eq!(p.remove_volume(&n("v")).expect("remove"), vec![head, base]);
    assert!(!p.layer_path(base).exists() && !p.layer_path(head).exists());
    assert!(p.layer_ids().is_empty());
}

#[test]
fn reopening_collects_unrecorded_images_and_unreferenced_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pool(dir.path());
    let kept = layer(&p, None);
    p.put_volume(volume("v", kept)).expect("volume");
    let unreferenced = layer(&p, None);
    let stray = dir.path().join("layers").join("0123456789ab.qcow2");
    std::fs::write(&stray, b"half-created").expect("stray");
    drop(p);
    let p = pool(dir.path());
    assert_eq!(p.layer_ids(), vec![kept]);
    assert!(!stray.exists() && !p.layer_path(unreferenced).exists());
    assert_eq!(p.volume(&n("v")).map(|v| v.head), Some(kept));
}

#[test]
fn a_shared_pool_keeps_a_fresh_image_another_node_may_still_be_creating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = PoolName::parse("s").expect("name");
    let p = Pool::open(dir.path(), name.clone(), PoolKind::Shared).expect("open");
    let in_progress = p.layer_path(LayerId::random());
    std::fs::write(&in_progress, b"being created elsewhere").expect("image");
    drop(p);
    Pool::open(dir.path(), name, PoolKind::Shared).expect("reopen");
    assert!(in_progress.exists());
}

/// One shared pool as two nodes open it.
fn two_nodes(dir: &Path) -> (Pool, Pool) {
    let name = PoolName::parse("s").expect("name");
    let here = Pool::open(dir, name.clone(), PoolKind::Shared).expect("open here");
    let there = Pool::open(dir, name, PoolKind::Shared).expect("open there");
    (here, there)
}

#[test]
fn a_shared_pool_takes_in_what_another_node_wrote_and_leaves_its_writes_in_progress_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (here, there) = two_nodes(dir.path());
    let head = layer(&there, None);
    there.put_volume(volume("v", head)).expect("volume written there");
    let in_progress = dir.path().join("volumes/.w.json.tmp");
    std::fs::write(&in_progress, b"{").expect("another node's write in progress");
    assert!(here.volume(&n("v")).is_none(), "not seen before a refresh");
    here.refresh().expect("refresh");
    assert_eq!(here.volume(&n("v")).map(|v| v.head), Some(head));
    assert!(in_progress.exists(), "another node's temp file is not swept");

    // The owner record: set by the attaching node, cleared only by the node it names.
    assert_eq!(here.owner(&n("v")).expect("owner"), None);
    there.set_owner(&n("v"), &node("node-2")).expect("set");
    assert_eq!(here.owner(&n("v")).expect("owner"), Some(node("node-2")));
    here.clear_owner(&n("v"), &node("node-1")).expect("not ours to clear");
    assert_eq!(here.owner(&n("v")).expect("owner"), Some(node("node-2")));
    there.clear_owner(&n("v"), &node("node-2")).expect("clear");
    assert_eq!(here.owner(&n("v")).expect("owner"), None);
}

#[test]
fn a_refresh_racing_this_process_s_writes_never_drops_one() {
    // Refreshing once replaced the index with a listing that could predate a write made
    // meanwhile: a new volume's head layer went missing ("layer … has no record").
    let dir = tempfile::tempdir().expect("tempdir");
    let name = PoolName::parse("s").expect("name");
    let p = std::sync::Arc::new(Pool::open(dir.path(), name, PoolKind::Shared).expect("open"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refresher = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.refresh().expect("refresh");
                std::thread::yield_now(); // let the writer in between refreshes
            }
        })
    };
    for i in 0..100 {
        let head = layer(&p, None);
        p.put_volume(volume(&format!("v{i}"), head)).expect("volume");
        assert_eq!(p.chain(head).expect("the head's record is there"), vec![head]);
        assert!(p.volume(&n(&format!("v{i}"))).is_some());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    refresher.join().expect("refresher");
    p.refresh().expect("refresh");
    assert_eq!(p.volumes().len(), 100);
}

#[test]
fn a_shared_pool_is_rescanned_only_after_another_writer_bumps_its_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (here, there) = two_nodes(dir.path());
    let head = layer(&here, None);
    here.put_volume(volume("mine", head)).expect("volume");

    // A record changed behind the pool's back (no generation bump) is not read: the
    // refresh trusts the generation. The garbage would fail to parse if it were read.
    let planted = dir.path().join("volumes/planted.json");
    std::fs::write(&planted, b"not json").expect("plant");
    here.refresh().expect("this node's own writes leave nothing to scan");
    assert!(here.volume(&n("planted")).is_none());

    // Another writer's change bumps the generation: the next refresh scans, and reads
    // what changed (here: the garbage too, refused as bad metadata).
    let theirs = layer(&there, None);
    there.put_volume(volume("theirs", theirs)).expect("volume written there");
    assert!(matches!(here.refresh(), Err(Error::Metadata { .. })));
    std::fs::remove_file(&planted).expect("unplant");
    here.refresh().expect("refresh");
    assert_eq!(here.volume(&n("theirs")).map(|v| v.head), Some(theirs));
    assert_eq!(here.volume(&n("mine")).map(|v| v.head), Some(head));
}

#[test]
fn a_refresh_that_finds_the_generation_it_knows_waits_for_no_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (here, _there) = two_nodes(dir.path());
    here.refresh().expect("the first refresh learns the generation");
    // A record write of this process in progress (it holds the write lock shared until its
    // record is written): a refresh used to take that lock exclusively, and wait.
    let writing = here.writes.read().expect("write lock");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| tx.send(here.refresh().is_ok()).expect("send"));
        let answered = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(writing);
        assert_eq!(answered, Ok(true), "the refresh answered while the write went on");
    });
}

#[test]
fn a_local_pool_has_no_owner_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pool(dir.path());
    p.set_owner(&n("v"), &node("node-1")).expect("set is a no-op");
    assert_eq!(p.owner(&n("v")).expect("owner"), None);
    assert!(!dir.path().join("owners").exists());
}

#[test]
fn a_pool_directory_cannot_be_opened_as_another_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(pool(dir.path()));
    let other = Pool::open(dir.path(), PoolName::parse("q").expect("name"), PoolKind::Local);
    assert!(other.is_err());
}

/// A record write waiting on another node (its `flock` on the generation file held
/// elsewhere) does not hold an async worker: on a runtime with a single worker, another task
/// still runs meanwhile. Run on that worker, the write would stall every task until it ended.
#[test]
fn a_record_write_waiting_on_the_disk_holds_no_async_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (here, _there) = two_nodes(dir.path());
    let here = std::sync::Arc::new(here);
    // Another node's write in progress: the generation file locked through a file of its own.
    let elsewhere = std::fs::File::options()
        .read(true)
        .write(true)
        .open(dir.path().join(GENERATION))
        .expect("generation file");
    elsewhere.lock().expect("lock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (started, writing) = tokio::sync::oneshot::channel();
    let write = runtime.spawn({
        let here = here.clone();
        async move {
            let _ = started.send(());
            here.put_volume(volume("v", LayerId::random()))
        }
    });
    // The write has started and waits on the lock; a task spawned now must still run. (Waited
    // for off the runtime: a worker stuck in the write would also stall the runtime's timers.)
    runtime.block_on(writing).expect("the write started");
    let (ran, other) = std::sync::mpsc::channel();
    runtime.spawn(async move { ran.send("ran") });
    let other = other.recv_timeout(std::time::Duration::from_secs(10));
    elsewhere.unlock().expect("unlock");
    assert_eq!(other, Ok("ran"), "another task ran during the write");
    runtime.block_on(write).expect("joined").expect("the write completes once the lock is free");
    assert!(here.volume(&n("v")).is_some());
}
