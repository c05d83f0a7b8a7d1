//! Control-path latency in a pool that holds many objects, against the same pool empty.
//!
//! Runs the standalone driver with a local and a shared pool. For each pool: the p50 of
//! CreateVolume, CreateSnapshot and DeleteVolume over the CSI socket while the pool is empty;
//! then the pool is filled through the same API to `QSD_CSI_SCALE_OBJECTS` objects (default
//! 10,000: half volumes, half snapshots of them); then the same p50s again, and a ListVolumes
//! walk through every page. Prints one machine-readable line per figure,
//! `scale POOL OP objects=N empty_ms=A full_ms=B ratio=R` (the goal: ratio ≤ 2), and
//! `scale POOL list-volumes objects=N pages=P ms=T`. Run with
//! `cargo bench -p qsd-csi --bench scale` as root (a real qemu-storage-daemon).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use qsd_csi_proto::csi;
use qsd_csi_proto::csi::controller_client::ControllerClient;
use tonic::transport::Channel;

const SAMPLES: usize = 40;
const FILL_CONCURRENCY: usize = 4;
const PAGE: i32 = 500;

type Controller = ControllerClient<Channel>;

fn p50(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn create_request(pool: &str, name: String) -> csi::CreateVolumeRequest {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    csi::CreateVolumeRequest {
        name,
        capacity_range: Some(csi::CapacityRange { required_bytes: 64 << 20, limit_bytes: 0 }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }],
        parameters: HashMap::from([("pool".to_owned(), pool.to_owned())]),
        ..Default::default()
    }
}

async fn create_volume(c: &mut Controller, pool: &str, name: String) -> String {
    let response = c.create_volume(create_request(pool, name)).await.expect("CreateVolume");
    response.into_inner().volume.expect("volume").volume_id
}

async fn create_snapshot(c: &mut Controller, volume: &str, name: String) -> String {
    let request = csi::CreateSnapshotRequest {
        source_volume_id: volume.to_owned(),
        name,
        ..Default::default()
    };
    let response = c.create_snapshot(request).await.expect("CreateSnapshot");
    response.into_inner().snapshot.expect("snapshot").snapshot_id
}

/// CreateVolume, CreateSnapshot of it, DeleteVolume, `SAMPLES` times; the snapshots are
/// deleted afterwards so the pool's population is what it was. What earlier phases wrote is
/// flushed first: the calls measured would otherwise pay for the fill's writeback (every call
/// fsyncs), which showed as a full pool up to 5x slower than an empty one in one run and
/// 3x faster in the next.
async fn measure(c: &mut Controller, pool: &str, label: &str) -> [Vec<Duration>; 3] {
    let synced = std::process::Command::new("sync").status().expect("sync");
    assert!(synced.success(), "sync: {synced}");
    let mut times: [Vec<Duration>; 3] = Default::default();
    let mut snapshots = Vec::new();
    for i in 0..SAMPLES {
        let start = Instant::now();
        let volume = create_volume(c, pool, format!("lat-{label}-{i}")).await;
        times[0].push(start.elapsed());
        let start = Instant::now();
        snapshots.push(create_snapshot(c, &volume, format!("lat-{label}-snap-{i}")).await);
        times[1].push(start.elapsed());
        let start = Instant::now();
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: volume, ..Default::default() })
            .await
            .expect("DeleteVolume");
        times[2].push(start.elapsed());
    }
    for snapshot_id in snapshots {
        c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id, ..Default::default() })
            .await
            .expect("DeleteSnapshot");
    }
    times
}

/// Fills `pool` with `objects` objects: volumes, each with one snapshot.
async fn fill(c: &Controller, pool: &str, objects: usize) -> BTreeSet<String> {
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = (objects / 2).div_ceil(FILL_CONCURRENCY);
    for t in 0..FILL_CONCURRENCY {
        let mut c = c.clone();
        let pool = pool.to_owned();
        let range = (t * per_task)..((t + 1) * per_task).min(objects / 2);
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in range {
                let volume = create_volume(&mut c, &pool, format!("fill-{i}")).await;
                create_snapshot(&mut c, &volume, format!("fill-snap-{i}")).await;
                ids.push(volume);
            }
            ids
        });
    }
    let mut all = BTreeSet::new();
    while let Some(ids) = tasks.join_next().await {
        all.extend(ids.expect("fill task"));
    }
    all
}

/// Walks ListVolumes page by page; returns this pool's volume IDs seen and the page count.
async fn list_all(c: &mut Controller, pool: &str) -> (Vec<String>, usize) {
    let mut token = String::new();
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let request = csi::ListVolumesRequest { max_entries: PAGE, starting_token: token };
        let page = c.list_volumes(request).await.expect("ListVolumes").into_inner();
        pages += 1;
        assert!(page.entries.len() <= PAGE as usize, "a page larger than max_entries");
        for entry in page.entries {
            let volume = entry.volume.expect("volume");
            if volume.volume_context.get("pool").is_some_and(|p| p == pool) {
                ids.push(volume.volume_id);
            }
        }
        if page.next_token.is_empty() {
            return (ids, pages);
        }
        token = page.next_token;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let objects: usize = std::env::var("QSD_CSI_SCALE_OBJECTS")
        .ok()
        .map(|v| v.parse().expect("QSD_CSI_SCALE_OBJECTS: a number"))
        .unwrap_or(10_000);
    let dir = tempfile::Builder::new()
        .prefix("qsd-bench-scale-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let pools = [
        format!("--pool=local={}", dir.path().join("local").display()),
        format!("--pool=shared={},shared", dir.path().join("shared").display()),
    ];
    let (driver, channel) = common::start_standalone(dir.path(), &pools).await;
    let mut controller = ControllerClient::new(channel);

    println!("{objects} objects per pool ({} volumes, each with a snapshot); p50 of {SAMPLES} calls over the CSI socket\n", objects / 2);
    let mut table = Vec::new();
    let mut lines = Vec::new();
    for pool in ["local", "shared"] {
        let empty = measure(&mut controller, pool, "empty").await;
        let start = Instant::now();
        let filled = fill(&controller, pool, objects).await;
        let fill_time = start.elapsed();
        let full = measure(&mut controller, pool, "full").await;
        let start = Instant::now();
        let (listed, pages) = list_all(&mut controller, pool).await;
        let list_time = start.elapsed();
        let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
        assert_eq!(listed.len(), listed_set.len(), "ListVolumes returned a volume twice");
        assert_eq!(listed_set, filled, "ListVolumes did not page through every volume once");
        for (op, (mut a, mut b)) in ["create-volume", "create-snapshot", "delete-volume"]
            .into_iter()
            .zip(empty.into_iter().zip(full))
        {
            let (a, b) = (p50(&mut a), p50(&mut b));
            lines.push(format!(
                "scale {pool} {op} objects={objects} empty_ms={a:.1} full_ms={b:.1} ratio={:.2}",
                b / a
            ));
            table.push(format!("| {pool} | {op} | {a:.1} ms | {b:.1} ms | {:.2} |", b / a));
        }
        lines.push(format!(
            "scale {pool} list-volumes objects={objects} pages={pages} ms={:.0}",
            list_time.as_secs_f64() * 1000.0
        ));
        lines.push(format!(
            "scale {pool} fill objects={objects} seconds={:.1}",
            fill_time.as_secs_f64()
        ));
    }
    println!("| pool | call | empty pool p50 | full pool p50 | ratio |");
    println!("|---|---|---|---|---|");
    for row in &table {
        println!("{row}");
    }
    println!();
    for line in &lines {
        println!("{line}");
    }
    common::stop_standalone(driver, dir.path());
}
