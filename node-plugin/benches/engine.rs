//! Latency and footprint of the block-graph engine on a real qemu-storage-daemon.
//!
//! Prints, for a 1 GiB and a 1 TiB volume each holding 1 GiB of data, the p50 / p99 latency of
//! snapshot, restore and expand (online through an NBD export, and offline), with the ratio of
//! the 1 TiB case to the 1 GiB case (the goal is O(1): ratio ≈ 1, p50 < 50 ms). Then attaches
//! [`ATTACHED`] volumes with NBD exports to one daemon and prints the daemon's RSS per attached
//! volume and the attach latency (goals: ≤ 1 MiB each, p99 ≤ 50 ms), and the time of a metrics
//! scrape at 64 and at 1,024 attached volumes (goal: O(volumes), the per-volume ratio about 1). Run with `cargo bench -p qsd-csi-node --bench engine` (root, QEMU ≥ 7.2).

use std::time::{Duration, Instant};

use qsd_node::engine::{CreateVolume, Engine, EngineConfig, PoolConfig, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::DaemonConfig;

const GIB: u64 = 1 << 30;

/// A snapshot's name.
fn name(text: &str) -> qsd_node::pool::ObjectName {
    qsd_node::pool::ObjectName::parse(text).expect("a name")
}
const ITERATIONS: usize = 20;
/// Volumes attached at once to one daemon in the footprint part.
const ATTACHED: usize = 1024;
/// The metrics scrape is measured at this many attached volumes too: its baseline.
const SCRAPE_BASELINE: usize = 64;

/// The median time of a scrape of `registry` (the catalog rebuilt first, as its refresh task
/// would), over [`ITERATIONS`].
fn scrape_p50(
    metrics: &qsd_node::metrics::NodeMetrics,
    registry: &prometheus::Registry,
) -> Duration {
    metrics.refresh();
    let mut samples: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let start = Instant::now();
            let body = qsd_csi_proto::metrics::encode(registry);
            assert!(!body.is_empty());
            start.elapsed()
        })
        .collect();
    percentile(&mut samples, 0.5)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

struct Row {
    op: &'static str,
    p50: [Duration; 2],
    p99: [Duration; 2],
}

async fn measure_size(
    engine: &Engine,
    label: &str,
    size: u64,
) -> Vec<(&'static str, Vec<Duration>)> {
    let core = engine.core_arc();
    let mut request =
        CreateVolume::named("bench", &format!("v-{label}"), size as i64).expect("request");
    request.max_chain_depth = Some(64);
    let vol = core.create_volume(&request).await.expect("create");
    // 1 GiB of data, written offline straight into the head image.
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    let head = pool.layer_path(chain[0]);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 1G"])
        .arg(&head)
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut results = Vec::new();
    let timed = |samples: &mut Vec<Duration>, start: Instant| samples.push(start.elapsed());

    let mut offline_snapshot = Vec::new();
    for i in 0..ITERATIONS {
        let start = Instant::now();
        core.create_snapshot(&vol.id, &name(&format!("off-{label}-{i}"))).await.expect("snapshot");
        timed(&mut offline_snapshot, start);
    }
    let mut offline_expand = Vec::new();
    for i in 0..ITERATIONS {
        let start = Instant::now();
        core.expand_volume(&vol.id, (size + (i as u64 + 1) * GIB) as i64).await.expect("expand");
        timed(&mut offline_expand, start);
    }
    core.attach(&vol.id, ExportKind::Nbd).await.expect("attach");
    let mut online_snapshot = Vec::new();
    for i in 0..ITERATIONS {
        let start = Instant::now();
        core.create_snapshot(&vol.id, &name(&format!("on-{label}-{i}"))).await.expect("snapshot");
        timed(&mut online_snapshot, start);
    }
    let mut online_expand = Vec::new();
    let base = core.get_volume(&vol.id).expect("volume").size;
    for i in 0..ITERATIONS {
        let start = Instant::now();
        core.expand_volume(&vol.id, (base + (i as u64 + 1) * GIB) as i64).await.expect("expand");
        timed(&mut online_expand, start);
    }
    let snapshot_id = core
        .list_snapshots()
        .expect("list")
        .into_iter()
        .find(|s| s.id.name.as_str() == format!("off-{label}-0"))
        .expect("snap")
        .id;
    let mut restore = Vec::new();
    for i in 0..ITERATIONS {
        let mut r = CreateVolume::named("bench", &format!("r-{label}-{i}"), 0).expect("request");
        r.size = None;
        r.source = Some(VolumeSource::Snapshot(snapshot_id.clone()));
        let start = Instant::now();
        core.create_volume(&r).await.expect("restore");
        timed(&mut restore, start);
    }
    results.push(("snapshot, attached (NBD)", online_snapshot));
    results.push(("snapshot, detached", offline_snapshot));
    results.push(("restore (linked overlay)", restore));
    results.push(("expand, attached (NBD)", online_expand));
    results.push(("expand, detached", offline_expand));
    results
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::Builder::new().prefix("qsd-bench-").tempdir_in("/var/tmp").expect("tempdir");
    let config = EngineConfig {
        node: NodeName::parse("bench").expect("node"),
        state_dir: dir.path().join("state"),
        daemon: DaemonConfig::managed(dir.path().join("run")),
        pools: vec![PoolConfig {
            name: PoolName::parse("bench").expect("pool"),
            path: dir.path().join("pool"),
            kind: PoolKind::Local,
        }],
        default_max_chain_depth: 64,
        copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let engine = Engine::open(config).await.expect("engine");
    let pid = engine.daemon().pid().expect("daemon pid");
    let v = engine.daemon().version().qemu;
    println!(
        "qemu-storage-daemon {}.{}.{}, {} iterations per operation, 1 GiB written in each volume\n",
        v.major, v.minor, v.micro, ITERATIONS
    );

    let small = measure_size(&engine, "1g", GIB).await;
    let large = measure_size(&engine, "1t", 1024 * GIB).await;
    let mut rows = Vec::new();
    for ((op, mut a), (_, mut b)) in small.into_iter().zip(large) {
        rows.push(Row {
            op,
            p50: [percentile(&mut a, 0.5), percentile(&mut b, 0.5)],
            p99: [percentile(&mut a, 0.99), percentile(&mut b, 0.99)],
        });
    }
    println!("| operation | 1 GiB p50 | 1 GiB p99 | 1 TiB p50 | 1 TiB p99 | 1 TiB / 1 GiB (p50) |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |",
            r.op,
            ms(r.p50[0]),
            ms(r.p99[0]),
            ms(r.p50[1]),
            ms(r.p99[1]),
            r.p50[1].as_secs_f64() / r.p50[0].as_secs_f64()
        );
    }

    // Many attached volumes in one daemon.
    let core = engine.core_arc();
    let before = rss_kib(pid);
    let mut attach = Vec::new();
    let metrics = qsd_node::metrics::NodeMetrics::new(core.clone()).expect("metrics");
    let registry = qsd_csi_proto::metrics::registry();
    registry.register(metrics.collector()).expect("register");
    let mut scrapes = Vec::new();
    for i in 0..ATTACHED {
        if i == SCRAPE_BASELINE {
            scrapes.push((i, scrape_p50(&metrics, &registry)));
        }
        let vol = core
            .create_volume(
                &CreateVolume::named("bench", &format!("many-{i}"), (64 << 20) as i64)
                    .expect("request"),
            )
            .await
            .expect("create");
        let start = Instant::now();
        core.attach(&vol.id, ExportKind::Nbd).await.expect("attach");
        attach.push(start.elapsed());
    }
    let after = rss_kib(pid);
    scrapes.push((ATTACHED, scrape_p50(&metrics, &registry)));
    let per_volume = (after.saturating_sub(before)) as f64 / ATTACHED as f64 / 1024.0;
    println!("\n{ATTACHED} volumes attached with NBD exports in one daemon:");
    println!("| daemon RSS before | after | per attached volume | attach p50 | attach p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.1} MiB | {:.1} MiB | {:.2} MiB | {:.1} ms | {:.1} ms |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per_volume,
        ms(percentile(&mut attach.clone(), 0.5)),
        ms(percentile(&mut attach, 0.99))
    );
    let [(few, base), (many, big)] = [scrapes[0], scrapes[1]];
    println!("\nA metrics scrape (every family, text format; a stat of each head image, no QMP):");
    println!("| attached volumes | scrape p50 | per volume |");
    println!("|---|---|---|");
    for (n, d) in [(few, base), (many, big)] {
        println!("| {n} | {:.2} ms | {:.1} µs |", ms(d), d.as_secs_f64() * 1e6 / n as f64);
    }
    println!(
        "metrics scrape {many} attached: {:.2} ms; ratio per volume against {few} attached = {:.2} (O(volumes): about 1)",
        ms(big),
        (big.as_secs_f64() / many as f64) / (base.as_secs_f64() / few as f64)
    );
    drop(engine);
    let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}
