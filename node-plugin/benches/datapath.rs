//! The data path on this host, every figure a ratio against a baseline measured in the same run.
//!
//! For each daemon — the host's `qemu-storage-daemon`, then the newest QEMU when
//! `QSD_CSI_QEMU_NEWEST` names a directory holding one (what `scripts/qemu-newest` prints):
//! - `fuse`: the daemon's FUSE export under a loop device — a buffered loop before QEMU 10.1, a
//!   direct-I/O loop from 10.1 (where it is safe), and there the buffered loop again on `#`
//!   lines: the node stages with the faster (buffered, so far);
//! - `nbd-user`: the daemon's NBD export driven by fio's `nbd` engine (libnbd) — the cost of
//!   the daemon and qcow2 with no kernel device in the way;
//!   both against fio (libaio, O_DIRECT) on a raw file in the pool's filesystem;
//! - `clone`: a full clone (`blockdev-backup`) of a volume holding 1 GiB of data, against
//!   `cp --sparse=always` of the same image followed by `sync`, alternated, median of three.
//!
//! Where the time goes: beside each volume figure a `#` line gives the daemon's CPU time per
//! I/O (all its threads, from `/proc`) and how busy its busiest thread was — a thread at 100 %
//! of a core is the bottleneck, whatever the queue depth.
//!
//! Prints one line per figure, `datapath BACKEND QEMU KERNEL JOB ratio=R` (KERNEL is `host`;
//! the guest's figures come from `e2e/vm`), then a table for docs/benchmarks.md. Run as root:
//! `QSD_CSI_QEMU_NEWEST=$(scripts/qemu-newest) cargo bench -p qsd-csi-node --bench datapath`.
//! `QSD_CSI_BENCH_SECONDS` sets each fio job's length (default 10).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qsd_node::device::{self, Backend};
use qsd_node::engine::{CloneMode, CreateVolume, Engine, EngineConfig, PoolConfig, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::DaemonConfig;

/// The jobs: name, fio `rw`, block size, queue depth.
const JOBS: [(&str, &str, &str, u32); 5] = [
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("seqwrite-1m", "write", "1M", 4),
];

/// Where fio sends its I/O.
enum Target<'a> {
    /// A file or block device, through libaio with O_DIRECT.
    Path(&'a Path),
    /// An NBD export on a unix socket, through libnbd.
    Nbd { socket: &'a Path, name: &'a str },
}

/// One fio job over the first GiB; returns IOPS for 4 KiB jobs and MiB/s for 1 MiB ones, and
/// the number of I/Os done.
fn fio(target: &Target, rw: &str, bs: &str, depth: u32, seconds: u64) -> (f64, u64) {
    let mut fio = Command::new("fio");
    fio.args(["--name=bench", "--size=1G", "--output-format=json", "--time_based"]);
    match target {
        Target::Path(path) => fio
            .args(["--ioengine=libaio", "--direct=1"])
            .arg(format!("--filename={}", path.display())),
        Target::Nbd { socket, name } => fio
            .arg("--ioengine=nbd")
            .arg(format!("--uri=nbd+unix:///{name}?socket={}", socket.display())),
    };
    fio.arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"));
    let out = fio.output().expect("fio runs");
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
    // fio may print a notice before its JSON.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = &stdout[stdout.find('{').unwrap_or(0)..];
    let json: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let side = &json["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    let ios = side["total_ios"].as_u64().unwrap_or(0);
    if bs == "4k" {
        (side["iops"].as_f64().unwrap_or(0.0), ios)
    } else {
        (side["bw"].as_f64().unwrap_or(0.0) / 1024.0, ios)
    }
}

/// CPU time (clock ticks) of each thread of `pid`, by thread id.
fn thread_ticks(pid: u32) -> std::collections::BTreeMap<u32, u64> {
    let mut ticks = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return ticks;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // Fields after the parenthesised name: state is the 3rd field; utime, stime the 14th, 15th.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let used = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        if let Ok(tid) = task.file_name().to_string_lossy().parse() {
            ticks.insert(tid, used);
        }
    }
    ticks
}

/// Runs one fio job on a volume of the daemon `pid`; returns its figure and prints where the
/// daemon's time went.
fn fio_on_volume(
    pid: u32,
    label: &str,
    target: &Target,
    (job, rw, bs, depth): (&str, &str, &str, u32),
    seconds: u64,
) -> f64 {
    let before = thread_ticks(pid);
    let start = Instant::now();
    let (value, ios) = fio(target, rw, bs, depth, seconds);
    let wall = start.elapsed().as_secs_f64();
    let after = thread_ticks(pid);
    // USER_HZ: /proc counts CPU time in hundredths of a second on every Linux architecture.
    let tick = 0.01;
    let deltas: Vec<f64> = after
        .iter()
        .map(|(tid, t)| (t - before.get(tid).copied().unwrap_or(0)) as f64 * tick)
        .collect();
    let total: f64 = deltas.iter().sum();
    let busiest = deltas.iter().copied().fold(0.0, f64::max);
    println!(
        "# where {label} {job}: daemon {:.1} µs CPU per I/O, all threads {:.0} % of a core, busiest thread {:.0} %",
        total * 1e6 / ios.max(1) as f64,
        total * 100.0 / wall,
        busiest * 100.0 / wall
    );
    value
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect(program);
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// One daemon's figures: (backend, job, ratio).
struct Figures {
    qemu: String,
    rows: Vec<(&'static str, &'static str, f64)>,
}

async fn measure(
    dir: &Path,
    binary: PathBuf,
    baseline: &[f64],
    seconds: u64,
    label: &str,
) -> Figures {
    let state = dir.join(label);
    let config = EngineConfig {
        node: NodeName::parse("bench").expect("node"),
        state_dir: state.join("state"),
        daemon: DaemonConfig { binary, ..DaemonConfig::managed(state.join("run")) },
        pools: vec![PoolConfig {
            name: PoolName::parse("bench").expect("pool"),
            path: state.join("pool"),
            kind: PoolKind::Local,
        }],
        default_max_chain_depth: 64,
        copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let engine = Engine::open(config).await.expect("engine");
    let pid = engine.daemon().pid().expect("daemon pid");
    let v = engine.daemon().version().qemu;
    let qemu = format!("{}.{}", v.major, v.minor);
    let core = engine.core_arc();
    let vol = core
        .create_volume(&CreateVolume::named("bench", "data", 2 << 30).expect("request"))
        .await
        .expect("create");
    // 1 GiB of data in the head image: reads and overwrites meet allocated clusters, as on
    // the raw baseline.
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    let head = pool.layer_path(chain[0]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 1G", &head.to_string_lossy()]);
    let mut rows = Vec::new();

    // fuse, as the node stages it.
    let attached = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach fuse");
    let direct = engine.daemon().features().loop_direct_io_over_fuse;
    let loop_dev = device::attach(Backend::Fuse, &attached.endpoint, direct, &vol.id.to_string())
        .await
        .expect("loop device");
    let label = format!("fuse {qemu}");
    for (spec, base) in JOBS.iter().zip(baseline) {
        let value = fio_on_volume(pid, &label, &Target::Path(&loop_dev), *spec, seconds);
        rows.push(("fuse", spec.0, value / base));
    }
    device::detach(Backend::Fuse, &loop_dev).await.expect("detach loop");
    if direct {
        // Where a direct-I/O loop is safe, the buffered one too, to keep the faster.
        let loop_dev =
            device::attach(Backend::Fuse, &attached.endpoint, false, &vol.id.to_string())
                .await
                .expect("loop device");
        let label = format!("fuse (buffered loop) {qemu}");
        for (spec, base) in JOBS.iter().zip(baseline) {
            let value = fio_on_volume(pid, &label, &Target::Path(&loop_dev), *spec, seconds);
            println!(
                "# fuse {qemu} host {}, buffered loop instead: ratio={:.2}",
                spec.0,
                value / base
            );
        }
        device::detach(Backend::Fuse, &loop_dev).await.expect("detach loop");
    }
    core.detach(&vol.id).await.expect("detach fuse");

    // nbd-user: the export the ublk backend reads (writeback; the ublk server replays writes).
    let attached = core.attach_with(&vol.id, ExportKind::Nbd, false).await.expect("attach nbd");
    let endpoint = &attached.endpoint;
    let nbd = Target::Nbd { socket: &endpoint.path, name: &endpoint.name };
    let label = format!("nbd-user {qemu}");
    for (spec, base) in JOBS.iter().zip(baseline) {
        rows.push(("nbd-user", spec.0, fio_on_volume(pid, &label, &nbd, *spec, seconds) / base));
    }
    core.detach(&vol.id).await.expect("detach nbd");

    // clone of 1 GiB of data against cp --sparse=always + sync of the same image.
    let copy = state.join("pool/cp-baseline.qcow2");
    let (mut cloned, mut copied) = (Vec::new(), Vec::new());
    for i in 0..3 {
        run("sync", &[]);
        let start = Instant::now();
        let mut request =
            CreateVolume::named("bench", &format!("clone-{i}"), 2 << 30).expect("request");
        request.source = Some(VolumeSource::Volume(vol.id.clone()));
        request.clone_mode = CloneMode::Copy;
        let task = core.start_clone(&request).await.expect("clone");
        let clone = task.finish().await.expect("clone finishes");
        run("sync", &[]);
        cloned.push(start.elapsed());
        core.delete_volume(&clone.id).await.expect("delete clone");
        run("sync", &[]);
        let start = Instant::now();
        run("cp", &["--sparse=always", &head.to_string_lossy(), &copy.to_string_lossy()]);
        run("sync", &[]);
        copied.push(start.elapsed());
        std::fs::remove_file(&copy).expect("remove copy");
    }
    let (cloned, copied) = (median(cloned), median(copied));
    println!(
        "clone of 1 GiB on QEMU {qemu}: {:.2} s; cp --sparse=always + sync: {:.2} s",
        cloned.as_secs_f64(),
        copied.as_secs_f64()
    );
    rows.push(("clone", "1GiB", copied.as_secs_f64() / cloned.as_secs_f64()));

    drop(engine);
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    Figures { qemu, rows }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = std::env::var("QSD_CSI_BENCH_SECONDS").ok().and_then(|s| s.parse().ok());
    let seconds = seconds.unwrap_or(10);
    let dir = tempfile::Builder::new()
        .prefix("qsd-bench-datapath-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    // The baseline: a fully written raw file in the pools' filesystem.
    let raw = dir.path().join("baseline.raw");
    let filename = format!("--filename={}", raw.display());
    let fill = ["--name=fill", "--rw=write", "--bs=1M", "--size=1G", "--direct=1", &filename];
    run("fio", &[&fill[..], &["--output=/dev/null"]].concat());
    let baseline: Vec<f64> = JOBS
        .iter()
        .map(|(_, rw, bs, qd)| fio(&Target::Path(&raw), rw, bs, *qd, seconds).0)
        .collect();
    for ((job, ..), value) in JOBS.iter().zip(&baseline) {
        let unit = if job.starts_with("seq") { "MiB/s" } else { "IOPS" };
        println!("baseline (raw file, libaio, O_DIRECT) {job}: {value:.0} {unit}");
    }

    let mut daemons = vec![("host", PathBuf::from("qemu-storage-daemon"))];
    match std::env::var_os("QSD_CSI_QEMU_NEWEST") {
        Some(newest) => daemons.push(("newest", Path::new(&newest).join("qemu-storage-daemon"))),
        None => println!("QSD_CSI_QEMU_NEWEST unset: the newest QEMU is not measured"),
    }
    let mut all = Vec::new();
    for (label, binary) in daemons {
        all.push(measure(dir.path(), binary, &baseline, seconds, label).await);
    }
    for figures in &all {
        for (backend, job, ratio) in &figures.rows {
            println!("datapath {backend} {} host {job} ratio={ratio:.2}", figures.qemu);
        }
    }
    println!("\n| backend | QEMU | {} |", JOBS.map(|j| j.0).join(" | "));
    println!("|---|---|{}", "---|".repeat(JOBS.len()));
    for figures in &all {
        for backend in ["fuse", "nbd-user"] {
            let cells: Vec<String> = figures
                .rows
                .iter()
                .filter(|(b, ..)| *b == backend)
                .map(|(.., r)| format!("{r:.2}"))
                .collect();
            println!("| {backend} | {} | {} |", figures.qemu, cells.join(" | "));
        }
    }
}
