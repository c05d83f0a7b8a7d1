//! A storm of 24 workers, each cycling through create, stage + publish + write, snapshot,
//! restore + read back, full clone, expand, unstage and delete, retrying each call as a CO
//! does; the standalone driver SIGKILLed in the middle of it and started again on the same
//! state. Over `QSD_CSI_STORM_RUNS` runs (default 20) in a row:
//! - the driver is back (Probe ready) within 10 s of each kill;
//! - every answer is OK, ABORTED, NOT_FOUND or UNAVAILABLE, and every call eventually succeeds;
//! - every restore reads back what its volume held when the snapshot was taken;
//! - afterwards every image passes `qemu-img check`, nothing is orphaned, and deleting
//!   everything listed leaves no volume, layer, mount or loop device.
//!
//! The kill lands after a number of completed calls that differs from run to run, so the runs
//! interrupt different mixes of operations.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{mount_cap, tidy, Driver, MIB};
use qsd_csi_proto::csi;
use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::node_client::NodeClient;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Code;

const WORKERS: usize = 24;
/// The calls of one worker's cycle.
const CALLS_PER_CYCLE: usize = 17;
const BACK_WITHIN: Duration = Duration::from_secs(10);
/// How long one call may keep failing (the driver down, the volume busy) before the run fails.
const CALL_DEADLINE: Duration = Duration::from_secs(120);
/// Between retries of a call that failed as a CO would retry it.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// How long one run may take, kill and restart included (about 10 s here): past it, the run
/// fails naming the calls still waiting, with the end of the driver's log.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// What the storm saw: answers by code, and answers it should never see.
#[derive(Debug, Default)]
struct Tally {
    by_code: Mutex<BTreeMap<String, usize>>,
    unexpected: Mutex<Vec<String>>,
    completed: AtomicUsize,
}

/// What every worker shares.
struct Storm {
    tally: Tally,
    done: watch::Sender<usize>,
    stop: AtomicBool,
    dir: PathBuf,
    /// The calls waiting for an answer now, by what they are: a stalled run names them.
    in_flight: Mutex<BTreeSet<String>>,
}

/// A status the driver may answer mid-storm: a call that met the kill (UNAVAILABLE, or the
/// connection cut under it), a volume busy with another call (ABORTED), or an object already
/// gone (NOT_FOUND).
fn expected(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Ok | Code::Aborted | Code::NotFound | Code::Unavailable)
        || cut_by_the_kill(status)
}

/// The connection closed under a call in flight: no status ever came from the driver, and
/// the client's own transport reports the cut (tonic says UNKNOWN or CANCELLED, with the
/// transport's error as the source: tonic's, hyper's, h2's, the socket's). A status the driver
/// sent carries no source. A CO's gRPC client sees such a cut as UNAVAILABLE.
fn cut_by_the_kill(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status.source().is_some()
}

impl Storm {
    /// Sends `call` until it succeeds, as a CO retries, tallying every answer.
    async fn until_ok<T, F, Fut>(&self, what: &str, mut call: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        loop {
            self.in_flight.lock().expect("in flight").insert(what.to_owned());
            let left = CALL_DEADLINE.saturating_sub(started.elapsed());
            let outcome = tokio::time::timeout(left, call()).await;
            self.in_flight.lock().expect("in flight").remove(what);
            let Ok(outcome) = outcome else {
                panic!("{what}: no answer within {CALL_DEADLINE:?} of its first try");
            };
            let key = match &outcome {
                Ok(_) => "OK".to_owned(),
                Err(s) if cut_by_the_kill(s) => "UNAVAILABLE (connection cut)".to_owned(),
                Err(s) => format!("{:?}", s.code()),
            };
            *self.tally.by_code.lock().expect("tally").entry(key).or_default() += 1;
            match outcome {
                Ok(value) => {
                    let n = self.tally.completed.fetch_add(1, Ordering::SeqCst) + 1;
                    self.done.send_replace(n);
                    return value;
                }
                Err(status) => {
                    if !expected(&status) {
                        self.tally
                            .unexpected
                            .lock()
                            .expect("tally")
                            .push(format!("{what}: {status:?}"));
                    }
                    assert!(
                        started.elapsed() < CALL_DEADLINE,
                        "{what} never succeeded: {status:?}"
                    );
                    tokio::time::sleep(RETRY_BACKOFF).await; // retry backoff, as a CO's
                }
            }
        }
    }
}

/// One worker's clients (channels reconnect by themselves after the restart).
#[derive(Clone)]
struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

fn staging(dir: &Path, name: &str) -> String {
    dir.join(format!("staging-{name}")).display().to_string()
}

fn target(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("target-{name}"))
}

async fn create(
    s: &Storm,
    c: &Clients,
    name: &str,
    size: i64,
    source: Option<csi::volume_content_source::Type>,
) -> csi::Volume {
    let req = csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap("ext4")],
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    };
    s.until_ok(&format!("CreateVolume {name}"), || {
        let (mut controller, req) = (c.controller.clone(), req.clone());
        async move { controller.create_volume(req).await }
    })
    .await
    .into_inner()
    .volume
    .expect("volume")
}

async fn stage_and_publish(s: &Storm, c: &Clients, volume: &csi::Volume, name: &str) -> PathBuf {
    let stage = csi::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging(&s.dir, name),
        volume_capability: Some(mount_cap("ext4")),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    s.until_ok(&format!("NodeStageVolume {name}"), || {
        let (mut node, req) = (c.node.clone(), stage.clone());
        async move { node.node_stage_volume(req).await }
    })
    .await;
    let target = target(&s.dir, name);
    let publish = csi::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging(&s.dir, name),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    s.until_ok(&format!("NodePublishVolume {name}"), || {
        let (mut node, req) = (c.node.clone(), publish.clone());
        async move { node.node_publish_volume(req).await }
    })
    .await;
    target
}

async fn unpublish_and_unstage(s: &Storm, c: &Clients, volume: &csi::Volume, name: &str) {
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target(&s.dir, name).display().to_string(),
    };
    s.until_ok(&format!("NodeUnpublishVolume {name}"), || {
        let (mut node, req) = (c.node.clone(), unpublish.clone());
        async move { node.node_unpublish_volume(req).await }
    })
    .await;
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging(&s.dir, name),
    };
    s.until_ok(&format!("NodeUnstageVolume {name}"), || {
        let (mut node, req) = (c.node.clone(), unstage.clone());
        async move { node.node_unstage_volume(req).await }
    })
    .await;
}

async fn delete_volume(s: &Storm, c: &Clients, volume: &csi::Volume) {
    let req =
        csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() };
    s.until_ok(&format!("DeleteVolume {}", volume.volume_id), || {
        let (mut controller, req) = (c.controller.clone(), req.clone());
        async move { controller.delete_volume(req).await }
    })
    .await;
}

/// Writes `bytes` to `path` and makes them durable, off the async workers.
async fn write_synced(path: PathBuf, bytes: Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&bytes).expect("write");
        f.sync_all().expect("fsync");
    })
    .await
    .expect("writer");
}

/// One worker's cycle, `n`-th of worker `w`.
async fn cycle(s: &Storm, c: &Clients, w: usize, n: usize) {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let name = format!("w{w}-{n}");
    let volume = create(s, c, &name, 64 * MIB, None).await;
    let mounted = stage_and_publish(s, c, &volume, &name).await;
    let content: Vec<u8> = format!("worker {w} cycle {n}\n").repeat(4096).into_bytes();
    write_synced(mounted.join("data"), content.clone()).await;
    let snap_req = csi::CreateSnapshotRequest {
        source_volume_id: volume.volume_id.clone(),
        name: format!("{name}-snap"),
        ..Default::default()
    };
    let snapshot = s
        .until_ok(&format!("CreateSnapshot {name}"), || {
            let (mut controller, req) = (c.controller.clone(), snap_req.clone());
            async move { controller.create_snapshot(req).await }
        })
        .await
        .into_inner()
        .snapshot
        .expect("snapshot");
    // Written after the snapshot: the restore must not see it.
    write_synced(mounted.join("data"), b"after the snapshot".to_vec()).await;
    let from_snapshot =
        Type::Snapshot(SnapshotSource { snapshot_id: snapshot.snapshot_id.clone() });
    let restored = create(s, c, &format!("{name}-r"), 64 * MIB, Some(from_snapshot)).await;
    let restored_at = stage_and_publish(s, c, &restored, &format!("{name}-r")).await;
    let read = tokio::fs::read(restored_at.join("data")).await.expect("read the restore");
    assert!(
        read == content,
        "{name}: the restore does not hold what the volume held at its snapshot"
    );
    let from_volume = Type::Volume(VolumeSource { volume_id: volume.volume_id.clone() });
    let copy = create(s, c, &format!("{name}-c"), 64 * MIB, Some(from_volume)).await;
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: volume.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    s.until_ok(&format!("ControllerExpandVolume {name}"), || {
        let (mut controller, req) = (c.controller.clone(), expand.clone());
        async move { controller.controller_expand_volume(req).await }
    })
    .await;
    unpublish_and_unstage(s, c, &restored, &format!("{name}-r")).await;
    unpublish_and_unstage(s, c, &volume, &name).await;
    for v in [&restored, &copy, &volume] {
        delete_volume(s, c, v).await;
    }
    let req =
        csi::DeleteSnapshotRequest { snapshot_id: snapshot.snapshot_id, ..Default::default() };
    s.until_ok(&format!("DeleteSnapshot {name}"), || {
        let (mut controller, req) = (c.controller.clone(), req.clone());
        async move { controller.delete_snapshot(req).await }
    })
    .await;
}

async fn worker(s: Arc<Storm>, c: Clients, w: usize) {
    let mut n = 0;
    while !s.stop.load(Ordering::SeqCst) {
        cycle(&s, &c, w, n).await;
        n += 1;
    }
}

/// SIGKILLs the driver and starts it again; how long until it answered Probe ready.
async fn kill_and_time_the_restart(d: &mut Driver) -> Duration {
    let started = Instant::now();
    d.kill_and_restart().await;
    d.ready_since(started).await
}

/// Waits until the storm has completed `n` calls. A worker that ends first (it panicked: an
/// answer a CO should never get, a restore that reads back other bytes, a call never answered)
/// fails the run with its own panic, rather than leaving the count to wait for ever.
async fn completed(rx: &mut watch::Receiver<usize>, workers: &mut JoinSet<()>, n: usize) {
    tokio::select! {
        reached = rx.wait_for(|done| *done >= n) => {
            reached.expect("the storm runs");
        }
        ended = workers.join_next() => match ended {
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            other => panic!("a worker ended before the storm was stopped: {other:?}"),
        },
    }
}

/// The last lines the driver logged, for a failure's message.
fn driver_log_tail(d: &Driver, lines: usize) -> String {
    let log = std::fs::read_to_string(d.path("driver.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn one_run(run: usize) -> (Duration, BTreeMap<String, usize>) {
    let mut d = Driver::start().await;
    let (done, _) = watch::channel(0);
    let storm = Arc::new(Storm {
        tally: Tally::default(),
        done,
        stop: AtomicBool::new(false),
        dir: d.dir.path().to_owned(),
        in_flight: Mutex::default(),
    });
    let Ok(back) = tokio::time::timeout(RUN_DEADLINE, storm_and_kill(&storm, &mut d, run)).await
    else {
        let in_flight = storm.in_flight.lock().expect("in flight").clone();
        panic!(
            "run {run} stalled for {RUN_DEADLINE:?}; calls still waiting: {in_flight:#?}\n\
             the driver's log ends:\n{}",
            driver_log_tail(&d, 60)
        );
    };
    let unexpected = storm.tally.unexpected.lock().expect("tally").clone();
    assert!(unexpected.is_empty(), "run {run}: answers a CO should never get: {unexpected:#?}");
    assert!(back < BACK_WITHIN, "run {run}: back after {back:?}");
    tidy::assert_pool_consistent(&d);
    tidy::assert_daemon_tidy(&d).await;
    tidy::delete_everything(&mut d).await;
    let codes = storm.tally.by_code.lock().expect("tally").clone();
    (back, codes)
}

/// The storm's workers, the driver killed and started again partway through; how long it
/// took to be back.
async fn storm_and_kill(storm: &Arc<Storm>, d: &mut Driver, run: usize) -> Duration {
    let mut progress = storm.done.subscribe();
    let clients = Clients { controller: d.controller.clone(), node: d.node.clone() };
    let mut workers = JoinSet::new();
    for w in 0..WORKERS {
        workers.spawn(worker(storm.clone(), clients.clone(), w));
    }
    // Kill after a count of completed calls that moves through the whole cycle (17 calls a
    // worker: creates, stages, snapshot, restore, clone, expand, unstages, deletes) from run
    // to run.
    let kill_after = WORKERS + (run * 53) % (WORKERS * CALLS_PER_CYCLE);
    completed(&mut progress, &mut workers, kill_after).await;
    let back = kill_and_time_the_restart(d).await;
    // Let the storm carry on past the restart, then let each worker finish its cycle.
    completed(&mut progress, &mut workers, kill_after + WORKERS * 3).await;
    storm.stop.store(true, Ordering::SeqCst);
    while let Some(ended) = workers.join_next().await {
        if let Err(e) = ended {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_driver_killed_in_a_storm_of_mixed_operations_always_comes_back_and_loses_nothing() {
    let runs: usize =
        std::env::var("QSD_CSI_STORM_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let mut slowest = Duration::ZERO;
    for run in 0..runs {
        let started = Instant::now();
        let (back, codes) = one_run(run).await;
        slowest = slowest.max(back);
        eprintln!(
            "storm: run {run}: back in {back:?}; answers {codes:?}; {:?} in all",
            started.elapsed()
        );
    }
    eprintln!("storm: {runs} runs in a row passed; slowest restart {slowest:?}");
}
