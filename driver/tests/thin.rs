//! Thin provisioning managed end to end, on the real driver in standalone mode (FUSE export
//! and loop device, real xfs): the metrics a scrape shows, and volumes of an auto-expanding
//! class growing under a steady writer until their limit.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{block_cap, mount_cap, wait_until, Driver, MIB};
use qsd_csi_proto::csi;

const GIB: i64 = 1 << 30;

/// A port nothing listens on now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// `GET /metrics` on `port`: the body.
fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches =
            metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

/// Waits until a scrape shows `name{labels}` satisfying `ok`; the last scrape.
fn scrape_until(
    port: u16,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> String {
    let mut last = String::new();
    wait_until(&format!("{name}{labels:?} in the metrics"), || {
        last = scrape(port);
        sample(&last, name, labels).is_some_and(&ok)
    });
    last
}

async fn create_with(
    d: &mut Driver,
    name: &str,
    size: i64,
    cap: &csi::VolumeCapability,
    parameters: &[(&str, &str)],
) -> csi::Volume {
    let mut parameters: std::collections::HashMap<String, String> =
        parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    parameters.insert("csi.storage.k8s.io/pvc/name".into(), name.into());
    parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), "thin".into());
    let req = csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        parameters,
        ..Default::default()
    };
    d.controller.create_volume(req).await.expect("create").into_inner().volume.expect("volume")
}

fn write_file(path: &Path, bytes: usize) {
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    let mut f = std::fs::File::create(path).expect("create file");
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("fsync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_show_a_volumes_writes_allocation_and_threshold_and_a_scrape_never_waits_for_the_daemon(
) {
    let port = free_port();
    let mut d =
        Driver::start_with(vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]).await;
    let cap = mount_cap("ext4");
    let vol =
        create_with(&mut d, "watched", 256 * MIB, &cap, &[("writeThresholdPercent", "50")]).await;
    let id = vol.volume_id.as_str();
    let target = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let me = [("volume", id), ("pool", "default"), ("namespace", "thin"), ("claim", "watched")];

    write_file(&target.join("data"), 48 * MIB as usize);
    let text =
        scrape_until(port, "qsd_csi_volume_write_bytes_total", &me, |b| b >= 48.0 * MIB as f64);
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{text}"))
    };
    assert_eq!(value("qsd_csi_volume_size_bytes", &me), 256.0 * MIB as f64);
    assert_eq!(value("qsd_csi_volume_write_threshold_bytes", &me), 128.0 * MIB as f64);
    assert!(value("qsd_csi_volume_allocated_bytes", &me) >= 48.0 * MIB as f64);
    assert!(value("qsd_csi_volume_write_ops_total", &me) > 0.0);
    assert_eq!(value("qsd_csi_volume_chain_depth", &me), 1.0);
    assert_eq!(value("qsd_csi_volume_attached", &[("volume", id), ("backend", "loop")]), 1.0);
    assert_eq!(value("qsd_csi_pool_objects", &[("pool", "default"), ("kind", "volume")]), 1.0);
    assert!(value("qsd_csi_pool_capacity_bytes", &[("pool", "default")]) > 0.0);
    assert!(value("qsd_csi_pool_free_bytes", &[("pool", "default")]) > 0.0);
    assert_eq!(value("qsd_csi_daemon_up", &[]), 1.0);
    let stage = [("service", "csi.v1.Node"), ("method", "NodeStageVolume"), ("code", "Ok")];
    assert!(value("qsd_csi_grpc_request_duration_seconds_count", &stage) >= 1.0);
    assert!(
        value("qsd_csi_qmp_command_duration_seconds_count", &[("command", "block-export-add")])
            >= 1.0
    );

    // Past the threshold: the alert is counted.
    write_file(&target.join("more"), 112 * MIB as usize);
    scrape_until(port, "qsd_csi_volume_write_threshold_crossings_total", &me, |n| n >= 1.0);

    // A discard gives the space back to the pool: the head's allocation falls.
    let before = sample(&scrape(port), "qsd_csi_volume_allocated_bytes", &me).expect("allocated");
    std::fs::remove_file(target.join("more")).expect("rm");
    std::fs::remove_file(target.join("data")).expect("rm");
    // Blocks are free once the deletion is committed; fstrim before that trims nothing of it.
    common::sync_fs(&target);
    let trimmed = Command::new("fstrim").arg(&target).output().expect("fstrim");
    if qemu_major() < 10 {
        assert!(trimmed.status.success(), "{}", String::from_utf8_lossy(&trimmed.stderr));
        scrape_until(port, "qsd_csi_volume_allocated_bytes", &me, |b| {
            b < before - 64.0 * MIB as f64
        });
    } else {
        // QEMU 10's rewritten FUSE export does not pass a hole punched in its file down as a
        // discard (11.1.3 here: the loop device's discards fail as unsupported, a punch on the
        // export file itself frees nothing): the FUSE backend gives no space back there.
        let after =
            sample(&scrape(port), "qsd_csi_volume_allocated_bytes", &me).expect("allocated");
        println!(
            "QEMU {}: fstrim over the FUSE export: {} — allocation {} -> {} bytes",
            qemu_major(),
            String::from_utf8_lossy(&trimmed.stderr).trim(),
            before,
            after
        );
    }

    // A scrape never waits for the daemon: with it stopped, volume operations would hang, but
    // the metrics answer from what they hold.
    let pid = d.daemon_pid();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let started = Instant::now();
    let text = scrape(port);
    let took = started.elapsed();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    assert!(sample(&text, "qsd_csi_volume_size_bytes", &me).is_some());
    assert!(took < Duration::from_secs(2), "a scrape took {took:?} with the daemon stopped");
    d.unpublish_and_unstage(id).await;
}

/// The major version of the qemu-storage-daemon first on PATH (the one the driver starts).
fn qemu_major() -> u32 {
    let out = Command::new("qemu-storage-daemon").arg("--version").output().expect("qsd --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let version =
        text.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()));
    version.and_then(|v| v.split('.').next()).and_then(|m| m.parse().ok()).expect("a version")
}

/// promtool, built from the Go module proxy by `scripts/build-prometheus` (which
/// `scripts/test` runs first).
fn promtool() -> std::path::PathBuf {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let version =
        Command::new(top.join("scripts/versions")).arg("prometheus").output().expect("versions");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let path = top.join(format!("target/tools/prometheus-{version}/promtool"));
    assert!(path.exists(), "needs promtool at {}: run scripts/build-prometheus", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_of_standalone_mode_passes_promtool_check_metrics() {
    let promtool = promtool();
    let port = free_port();
    let mut d =
        Driver::start_with(vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]).await;
    let cap = block_cap();
    let vol = create_with(&mut d, "linted", 64 * MIB, &cap, &[("autoExpand", "true")]).await;
    d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let me = [("volume", vol.volume_id.as_str())];
    let text = scrape_until(port, "qsd_csi_volume_attached", &me, |v| v == 1.0);
    let check =
        Command::new(promtool).args(["check", "metrics"]).output_with_stdin(text.as_bytes());
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    d.unpublish_and_unstage(&vol.volume_id).await;
}

/// `Command::output` with bytes written to the child's stdin.
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> std::process::Output {
        let mut child = self
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
        child.wait_with_output().expect("output")
    }
}

/// What the block writer saw.
#[derive(Debug)]
struct Writer {
    /// Device sizes it saw, in order (each a growth).
    sizes: Vec<u64>,
    /// Per growth: from the writer passing the threshold of the size it had to the new size
    /// being visible to it.
    latencies: Vec<Duration>,
    /// How long it waited, in all, for room.
    stalled: Duration,
}

const RATE: u64 = 20 << 20;
const CHUNK: usize = 1 << 20;

/// Writes `total` bytes at [`RATE`] into a file under `mount`, fsyncing every chunk; returns
/// the filesystem sizes it saw. An I/O error (ENOSPC: the volume filled before it grew) fails
/// the test.
fn write_filesystem(mount: &Path, total: u64) -> Vec<u64> {
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 241) as u8).collect();
    let mut f = std::fs::File::create(mount.join("steady")).expect("create");
    let mut sizes = vec![common::df_size(mount)];
    let started = Instant::now();
    let mut written = 0u64;
    while written < total {
        f.write_all(&chunk).unwrap_or_else(|e| panic!("write at {written}: {e}"));
        f.sync_data().unwrap_or_else(|e| panic!("fsync at {written}: {e}"));
        written += CHUNK as u64;
        let size = common::df_size(mount);
        if size > *sizes.last().expect("a size") {
            sizes.push(size);
        }
        pace(started, written);
    }
    sizes
}

/// Writes `total` bytes at [`RATE`] from offset 0 of the block device at `dev`; before passing
/// the device's end it waits for it to grow (a program on a raw device stays within it).
fn write_block(dev: &Path, total: u64, percent: u64) -> Writer {
    use std::os::unix::fs::FileExt;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 239) as u8).collect();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(dev).expect("open");
    let mut size_now = || f.seek(SeekFrom::End(0)).expect("seek");
    let mut w = Writer { sizes: vec![size_now()], latencies: Vec::new(), stalled: Duration::ZERO };
    let started = Instant::now();
    let mut crossed: Option<Instant> = None;
    let mut written = 0u64;
    let file = std::fs::OpenOptions::new().write(true).open(dev).expect("open");
    while written < total {
        let waiting = Instant::now();
        let deadline = waiting + Duration::from_secs(60);
        loop {
            let size = size_now();
            if size > *w.sizes.last().expect("a size") {
                w.sizes.push(size);
                w.latencies.extend(crossed.take().map(|at| at.elapsed()));
            }
            if written + CHUNK as u64 <= size {
                break;
            }
            assert!(Instant::now() < deadline, "the device never grew past {size}");
            std::thread::sleep(common::POLL_INTERVAL); // wait for the device to grow
        }
        w.stalled += waiting.elapsed();
        file.write_all_at(&chunk, written).unwrap_or_else(|e| panic!("write at {written}: {e}"));
        file.sync_data().unwrap_or_else(|e| panic!("fsync at {written}: {e}"));
        written += CHUNK as u64;
        let size = *w.sizes.last().expect("a size");
        if crossed.is_none() && written * 100 >= size * percent {
            crossed = Some(Instant::now());
        }
        pace(started, written);
    }
    w
}

/// Keeps a writer at [`RATE`]: sleeps until `written` bytes are due.
fn pace(started: Instant, written: u64) {
    let due = started + Duration::from_secs_f64(written as f64 / RATE as f64);
    if let Some(ahead) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(ahead); // pacing the writer, not waiting on anything
    }
}

/// The queries of the chart's dashboard (panel targets and template variables).
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition" | "query", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/qsd-csi/dashboards/qsd-csi.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("the dashboard")).expect("JSON");
    let mut queries = Vec::new();
    walk(&json, &mut queries);
    queries.retain(|q| q != "prometheus"); // the data source variable's type
    queries
}

/// What the dashboard asks for that `scrape` does not have: queries naming no qsd-csi series,
/// and series names no sample of the scrape carries.
fn dashboard_gaps(scrape: &str) -> Vec<String> {
    let exported: std::collections::HashSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "the dashboard's queries were found: {queries:?}");
    let mut gaps = Vec::new();
    for query in queries {
        let names: Vec<&str> = query
            .match_indices("qsd_csi_")
            .map(|(at, _)| {
                let rest = &query[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        if names.is_empty() {
            gaps.push(format!("{query:?} names no qsd-csi series"));
        }
        gaps.extend(names.into_iter().filter(|n| !exported.contains(n)).map(str::to_owned));
    }
    gaps
}

#[test]
fn the_dashboard_check_finds_a_query_for_a_series_nobody_exports() {
    let scrape = "qsd_csi_volume_size_bytes{claim=\"a\"} 1\n";
    let gaps = dashboard_gaps(scrape);
    assert!(gaps.iter().any(|g| g == "qsd_csi_volume_allocated_bytes"), "{gaps:?}");
    assert!(!gaps.iter().any(|g| g == "qsd_csi_volume_size_bytes"), "{gaps:?}");
}

/// The driver's log lines that contain `needle`, without terminal colours.
fn log_lines(d: &Driver, needle: &str) -> Vec<String> {
    let log = std::fs::read_to_string(d.path("driver.log")).unwrap_or_default();
    log.lines().map(plain).filter(|l| l.contains(needle)).collect()
}

/// A log line without its ANSI colour sequences.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

/// The seconds since midnight of a log line's leading timestamp (`2026-12-07T01:01:36.485941Z`).
fn seconds_of_day(line: &str) -> f64 {
    let time = line.split_once('T').and_then(|(_, rest)| rest.split_once('Z')).map(|(t, _)| t);
    let parts: Vec<f64> =
        time.expect("a timestamp").split(':').map(|p| p.parse().expect("a number")).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_of_an_auto_expanding_class_grow_under_a_steady_writer_until_their_limit() {
    let port = free_port();
    let mut d =
        Driver::start_with(vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]).await;
    let class = [("autoExpand", "true"), ("autoExpandStep", "25%"), ("autoExpandLimit", "3Gi")];
    let fs_cap = mount_cap("xfs");
    let fs_vol = create_with(&mut d, "grows-fs", GIB, &fs_cap, &class).await;
    let block_vol = create_with(&mut d, "grows-block", GIB, &block_cap(), &class).await;
    assert_eq!(fs_vol.volume_context.get("writeThresholdPercent").map(String::as_str), Some("80"));
    let mount = d.stage_and_publish(&fs_vol, &fs_cap, false).await.expect("publish fs");
    let dev = d.stage_and_publish(&block_vol, &block_cap(), false).await.expect("publish block");

    // Well past the first size, short of the limit.
    let total = (2600 * MIB) as u64;
    let (fs_writer, block_writer) = std::thread::scope(|s| {
        let fs = s.spawn(|| write_filesystem(&mount, total));
        let block = s.spawn(|| write_block(&dev, total, 80));
        (fs.join().expect("fs writer"), block.join().expect("block writer"))
    });
    println!("filesystem writer: sizes {fs_writer:?}");
    println!(
        "block writer: sizes {:?}, growth latencies {:?}, stalled {:?} in all",
        block_writer.sizes, block_writer.latencies, block_writer.stalled
    );

    let mut latencies = Vec::new();
    for (vol, name) in [(&fs_vol, "grows-fs"), (&block_vol, "grows-block")] {
        let id = vol.volume_id.as_str();
        let me = [("volume", id), ("claim", name)];
        scrape_until(port, "qsd_csi_volume_size_bytes", &me, |s| s == 3.0 * GIB as f64);
        scrape_until(port, "qsd_csi_volume_auto_expansions_total", &me, |n| n == 5.0);
        // One notice per growth: 1 → 1.25 → 1.56 → 1.95 → 2.44 → 3 GiB, each right after the
        // crossing that caused it.
        let lines: Vec<String> = log_lines(&d, id);
        let grown: Vec<usize> =
            (0..lines.len()).filter(|i| lines[*i].contains("reason=\"AutoExpanded\"")).collect();
        assert_eq!(grown.len(), 5, "{name}: one AutoExpanded notice per growth");
        for i in grown {
            let crossed = lines[..i]
                .iter()
                .rev()
                .find(|l| l.contains("write threshold crossed"))
                .expect("a crossing before each growth");
            latencies.push(seconds_of_day(&lines[i]) - seconds_of_day(crossed));
        }
        let limit = lines.iter().filter(|l| l.contains("AutoExpandLimitReached")).count();
        assert!(limit <= 2, "{name}: the limit is said once a crossing, not in a storm ({limit})");
        assert!(!lines.iter().any(|l| l.contains("AutoExpandFailed")), "{name}: no growth failed");
    }
    assert_eq!(block_writer.sizes.last().copied(), Some(3 << 30));
    assert!(fs_writer.last().copied().unwrap_or(0) > (2900 * MIB) as u64, "{fs_writer:?}");
    let worst = latencies.iter().copied().fold(0.0, f64::max);
    println!(
        "auto-expansion (standalone): threshold event -> new size on the device and filesystem: {} growths, mean {:.3} s, worst {:.3} s; the block writer waited {:.3} s in all",
        latencies.len(),
        latencies.iter().sum::<f64>() / latencies.len().max(1) as f64,
        worst,
        block_writer.stalled.as_secs_f64()
    );
    // Every series the chart's Grafana dashboard asks for is one the driver exports (all of
    // them have samples now: growths, crossings and a refusal at the limit happened).
    let missing = dashboard_gaps(&scrape(port));
    assert!(missing.is_empty(), "the dashboard asks for series no scrape has: {missing:?}");
    for id in [&fs_vol.volume_id, &block_vol.volume_id] {
        d.unpublish_and_unstage(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_that_filled_while_nobody_watched_grows_at_its_next_stage() {
    // Staged once without its threshold (as a plugin that crashed before arming it would have),
    // filled past it, unstaged; staged again with it: the head already holds more than the
    // threshold, so the crossing is reported at once and the volume grows.
    let port = free_port();
    let mut d =
        Driver::start_with(vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]).await;
    let cap = mount_cap("xfs");
    let class =
        [("autoExpand", "true"), ("autoExpandStep", "128Mi"), ("writeThresholdPercent", "60")];
    let mut vol = create_with(&mut d, "filled-unwatched", 320 * MIB, &cap, &class).await;
    let context = vol.volume_context.clone();
    vol.volume_context.remove("writeThresholdPercent");
    let mount = d.stage_and_publish(&vol, &cap, false).await.expect("publish unwatched");
    let unwatched = common::df_size(&mount);
    write_file(&mount.join("data"), 224 * MIB as usize);
    d.unpublish_and_unstage(&vol.volume_id).await;
    let me = [("volume", vol.volume_id.as_str())];
    let before =
        scrape_until(port, "qsd_csi_volume_write_threshold_crossings_total", &me, |_| true);
    assert_eq!(sample(&before, "qsd_csi_volume_write_threshold_crossings_total", &me), Some(0.0));
    assert_eq!(sample(&before, "qsd_csi_volume_size_bytes", &me), Some(320.0 * MIB as f64));

    vol.volume_context = context;
    // The growth the stage set off holds the volume for a moment: a publish then is ABORTED,
    // and retried, as a CO does.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mount = loop {
        match d.stage_and_publish(&vol, &cap, false).await {
            Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(common::POLL_INTERVAL).await; // the growth ends
            }
            other => break other.expect("publish watched"),
        }
    };
    scrape_until(port, "qsd_csi_volume_size_bytes", &me, |s| s == 448.0 * MIB as f64);
    wait_until("the filesystem to grow by the step", || {
        common::df_size(&mount) >= unwatched + (120 * MIB) as u64
    });
    let missed = log_lines(&d, "write threshold crossed");
    assert!(missed.iter().any(|l| l.contains("missed=true")), "{missed:?}");
    d.unpublish_and_unstage(&vol.volume_id).await;
}
