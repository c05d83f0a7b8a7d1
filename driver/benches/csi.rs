//! Data-path and control-path numbers for the standalone driver, printed as ratios against a
//! baseline measured in the same run.
//!
//! Data path: fio through a staged raw-block volume (loop device over the daemon's FUSE export)
//! versus O_DIRECT on a raw file in the same filesystem: 1 MiB sequential write, then 4 KiB random
//! read and random write at queue depth 32. Control path: CreateVolume, CreateSnapshot and
//! NodeStage latency over gRPC. Run with `cargo bench -p qsd-csi-controller --bench csi` as root.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qsd_csi_proto::csi;
use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::node_client::NodeClient;

const SAMPLES: usize = 30;

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

/// One fio job; returns (IOPS, MiB/s).
fn fio(target: &Path, rw: &str, bs: &str, depth: u32, seconds: u32) -> (f64, f64) {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=libaio",
            "--direct=1",
            "--size=1G",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", target.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--group_reporting"])
        .output()
        .expect("fio");
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let job = &json["jobs"][0];
    let side = if rw.contains("read") { &job["read"] } else { &job["write"] };
    (side["iops"].as_f64().unwrap_or(0.0), side["bw"].as_f64().unwrap_or(0.0) / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::Builder::new().prefix("qsd-bench-csi-").tempdir_in("/var/tmp").expect("tempdir");
    let (driver, channel) = common::start_standalone(dir.path(), &[]).await;
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    use csi::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
    };
    let block = csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    };
    let mount = csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    };
    let create = |name: String, size: i64, cap: &csi::VolumeCapability| csi::CreateVolumeRequest {
        name,
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        ..Default::default()
    };

    // Control path.
    let (mut t_create, mut t_snapshot, mut t_stage) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let start = Instant::now();
        let v = controller
            .create_volume(create(format!("lat-{i}"), 1 << 30, &mount))
            .await
            .expect("create")
            .into_inner()
            .volume
            .expect("volume");
        t_create.push(start.elapsed());
        let start = Instant::now();
        controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: v.volume_id.clone(),
                name: format!("lat-snap-{i}"),
                ..Default::default()
            })
            .await
            .expect("snapshot");
        t_snapshot.push(start.elapsed());
        let staging = dir.path().join(format!("staging-{i}"));
        let start = Instant::now();
        node.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount.clone()),
            ..Default::default()
        })
        .await
        .expect("stage");
        t_stage.push(start.elapsed());
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    }

    // Data path: a raw block volume staged and published, against a raw file beside the pool.
    let v = controller
        .create_volume(create("data".into(), 2 << 30, &block))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let staging = dir.path().join("staging-data");
    let target = dir.path().join("device");
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(block.clone()),
        ..Default::default()
    })
    .await
    .expect("stage");
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(block.clone()),
        ..Default::default()
    })
    .await
    .expect("publish");
    let raw = dir.path().join("state/pools/default/baseline.raw");
    let jobs = [
        ("write", "1M", 4, "1 MiB sequential write, QD4"),
        ("randread", "4k", 32, "4 KiB random read, QD32"),
        ("randwrite", "4k", 32, "4 KiB random write, QD32"),
    ];
    println!(
        "fio, 10 s per job, libaio, O_DIRECT; baseline: a raw file in the pool's filesystem\n"
    );
    println!("| job | baseline | qsd-csi (fuse + loop) | ratio |");
    println!("|---|---|---|---|");
    for (rw, bs, depth, label) in jobs {
        let (bi, bb) = fio(&raw, rw, bs, depth, 10);
        let (qi, qb) = fio(&target, rw, bs, depth, 10);
        let (b, q, unit) = if bs == "1M" { (bb, qb, "MiB/s") } else { (bi, qi, "IOPS") };
        println!("| {label} | {b:.0} {unit} | {q:.0} {unit} | {:.2} |", q / b);
    }
    println!("\ngRPC latency over the unix socket, {SAMPLES} samples each (1 GiB volumes, ext4 for NodeStage):\n");
    println!("| call | p50 | p99 |");
    println!("|---|---|---|");
    for (name, samples) in [
        ("CreateVolume", &mut t_create),
        ("CreateSnapshot", &mut t_snapshot),
        ("NodeStageVolume (attach, loop, mkfs, mount)", &mut t_stage),
    ] {
        println!(
            "| {name} | {:.1} ms | {:.1} ms |",
            percentile(samples, 0.5),
            percentile(samples, 0.99)
        );
    }
    let _ = Command::new("umount").arg(&target).status();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("unstage");
    common::stop_standalone(driver, dir.path());
}
