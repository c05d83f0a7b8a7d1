//! A volume copied between two nodes against `cp --sparse=always` of the same image.
//!
//! Two engines, each with its own qemu-storage-daemon and pool, stand for two nodes. The
//! source holds a 1 GiB volume with 512 MiB of data in 1 MiB pieces scattered over it. The
//! baseline copies its image file with `cp --sparse=always` and fsyncs the copy (the copy
//! between nodes writes its target with O_DIRECT: both end durable). The copy runs as the
//! controller drives it: the source node serves a point-in-time snapshot of the volume over
//! NBD with TLS, the target's daemon pulls it, over loopback, whose byte counter gives what
//! crossed. Then QEMU's mechanism alone, without the driver (two bare daemons and the same
//! job, with and without TLS), in the same run: the ceiling this machine puts on the ratio.
//! Prints `cross-node copy 1GiB ratio=R bytes_sent=B allocated=A`, R = cp's time / the copy's
//! time (goal ≥ 0.5), and B within 10 % of A. Run with
//! `cargo bench -p qsd-csi-node --bench copy` (root, QEMU ≥ 7.2, FUSE).

use std::os::unix::fs::FileExt;
use std::time::Instant;

use qsd_node::engine::{CreateVolume, Engine, EngineConfig, PoolConfig, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qmp::QmpClient;
use qsd_node::qsd::DaemonConfig;

const MIB: u64 = 1 << 20;
/// Rounds: each copies afresh (a new target volume); the medians are compared.
const ROUNDS: usize = 5;

async fn node(root: &std::path::Path, name: &str) -> Engine {
    let config = EngineConfig {
        node: NodeName::parse(name).expect("node"),
        state_dir: root.join(name).join("state"),
        daemon: DaemonConfig::managed(root.join(name).join("run")),
        pools: vec![PoolConfig {
            name: PoolName::parse("local").expect("pool"),
            path: root.join(name).join("pool"),
            kind: PoolKind::Local,
        }],
        default_max_chain_depth: 64,
        copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    Engine::open(config).await.expect("engine")
}

/// Bytes the loopback interface has carried (each once: on `lo` what is sent is received).
/// The copies run over loopback, so the difference around a copy is what it put on the wire,
/// TCP/IP headers included, plus whatever else used loopback meanwhile (little on an idle
/// machine): an upper bound. A relay counting bytes in user space would cost the copy a share
/// of the machine's two cores and distort its time.
fn loopback_bytes() -> u64 {
    let counter = "/sys/class/net/lo/statistics/tx_bytes";
    std::fs::read_to_string(counter).expect("lo counter").trim().parse().expect("a count")
}

/// The ceiling this machine puts on any copy made QEMU's way: one bare daemon serves `image`
/// over NBD (with the driver's TLS settings when `tls`), another pulls it through a counting
/// relay into a new qcow2 image (O_DIRECT, as the driver's target) with the same
/// `blockdev-backup` job, with no driver around either. Seconds per round, `ROUNDS` rounds.
async fn bare_rounds(dir: &std::path::Path, image: &std::path::Path, tls: bool) -> Vec<f64> {
    use qsd_node::qsd::copy_server::{write_key, TLS_PRIORITY};
    use serde_json::json;
    let bare = dir.join(if tls { "bare-tls" } else { "bare" });
    write_key(&bare, "bench", &[7; 32]).expect("bare dir and key");
    let creds = |endpoint: &str| {
        let mut creds = json!({"qom-type": "tls-creds-psk", "id": "tls", "endpoint": endpoint,
            "dir": bare, "priority": TLS_PRIORITY});
        if endpoint == "client" {
            creds["username"] = "bench".into();
        }
        creds
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let (server, _server_pid) = bare_daemon(&bare.join("server.sock")).await;
    let source = json!({"driver": "qcow2", "node-name": "src", "read-only": true,
        "file": {"driver": "file", "filename": image, "read-only": true}});
    server.execute("blockdev-add", source).await.expect("server blockdev");
    let mut start =
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}});
    if tls {
        server.execute("object-add", creds("server")).await.expect("server creds");
        start["tls-creds"] = "tls".into();
    }
    server.execute("nbd-server-start", start).await.expect("nbd server");
    let export = json!({"type": "nbd", "id": "e", "node-name": "src", "name": "src"});
    server.execute("block-export-add", export).await.expect("export");
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let (qmp, pid) = bare_daemon(&bare.join(format!("client-{round}.sock"))).await;
        let target = bare.join(format!("target-{round}.qcow2"));
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&target)
            .arg("1G")
            .status()
            .expect("qemu-img");
        assert!(created.success());
        let mut nbd = json!({"driver": "nbd", "node-name": "remote", "read-only": true, "export": "src",
            "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}});
        if tls {
            qmp.execute("object-add", creds("client")).await.expect("client creds");
            nbd["tls-creds"] = "tls".into();
        }
        qmp.execute("blockdev-add", nbd).await.expect("nbd node");
        let dst = json!({"driver": "qcow2", "node-name": "dst", "file": {"driver": "file",
            "filename": target, "cache": {"direct": true}}});
        qmp.execute("blockdev-add", dst).await.expect("target node");
        let mut events = qmp.subscribe();
        let started = Instant::now();
        let job = json!({"job-id": "j", "device": "remote", "target": "dst", "sync": "full"});
        qmp.execute("blockdev-backup", job).await.expect("backup");
        while let Some(event) = events.recv().await {
            if event.event == "BLOCK_JOB_COMPLETED" {
                assert!(event.data.get("error").is_none(), "bare copy failed: {}", event.data);
                break;
            }
        }
        times.push(started.elapsed().as_secs_f64());
        drop(pid);
        std::fs::remove_file(&target).expect("remove");
    }
    times
}

/// A `qemu-storage-daemon` with nothing but a monitor at `socket` (it returns from
/// `--daemonize` once the monitor listens), its QMP client and its pid.
async fn bare_daemon(socket: &std::path::Path) -> (QmpClient, Bare) {
    let pidfile = socket.with_extension("pid");
    let started = tokio::process::Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!("socket,id=m,path={},server=on,wait=off", socket.display()))
        .args(["--monitor", "chardev=m", "--daemonize", "--pidfile"])
        .arg(&pidfile)
        .status()
        .await
        .expect("qemu-storage-daemon");
    assert!(started.success(), "bare daemon did not start");
    let pid = std::fs::read_to_string(&pidfile).expect("pidfile").trim().to_owned();
    (QmpClient::connect(socket).await.expect("bare daemon's monitor"), Bare(pid))
}

/// A bare daemon's pid: killed when dropped.
struct Bare(String);

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-KILL", &self.0]).status();
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir =
        tempfile::Builder::new().prefix("qsd-copy-bench-").tempdir_in("/var/tmp").expect("dir");
    let (source, target) = (node(dir.path(), "n1").await, node(dir.path(), "n2").await);
    let (e1, e2) = (source.core_arc(), target.core_arc());
    let volume = e1
        .create_volume(&CreateVolume::named("local", "data", (1024 * MIB) as i64).expect("request"))
        .await
        .expect("create");
    // 512 MiB in 1 MiB pieces: every other MiB, in a shuffled order.
    let export = e1.attach(&volume.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    let file = std::fs::OpenOptions::new().write(true).open(&export).expect("open export");
    let mut order: Vec<u64> = (0..512).collect();
    let mut seed = 0x9e37_79b9_u64;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    for piece in order {
        let data: Vec<u8> = (0..MIB).map(|b| (b as u8) ^ (piece as u8) | 1).collect();
        file.write_all_at(&data, piece * 2 * MIB).expect("write");
    }
    file.sync_all().expect("fsync");
    drop(file);
    e1.detach(&volume.id).await.expect("detach");
    let (pool, chain) = e1.volume_chain(&volume.id).expect("chain");
    let image = pool.layer_path(chain[0]);

    let mut cp_times = Vec::new();
    let mut copy_times = Vec::new();
    let (mut sent, mut allocated) = (0, 0);
    for round in 0..ROUNDS {
        let dest = dir.path().join(format!("cp-{round}.qcow2"));
        let started = Instant::now();
        let cp = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&image)
            .arg(&dest)
            .status()
            .expect("cp runs");
        assert!(cp.success());
        std::fs::File::open(&dest).expect("open copy").sync_all().expect("fsync copy");
        cp_times.push(started.elapsed().as_secs_f64());
        std::fs::remove_file(&dest).expect("remove");

        let source_id = VolumeSource::Volume(volume.id.clone());
        let on_wire = loopback_bytes();
        let started = Instant::now();
        let served = e1
            .export_for_copy(&source_id, &NodeName::parse("n2").expect("node"))
            .await
            .expect("export");
        let exported = started.elapsed().as_secs_f64();
        let remote = served.remote().clone();
        let mut request =
            CreateVolume::named("local", &format!("copy-{round}"), 0).expect("request");
        request.size = None;
        request.source = Some(source_id);
        request.remote = Some(remote.clone());
        e2.create_volume(&request).await.expect("copy across");
        copy_times.push(started.elapsed().as_secs_f64());
        served.close().await;
        sent = loopback_bytes() - on_wire;
        allocated = remote.allocated;
        println!(
            "round {round}: cp --sparse=always {:.2} s, copy across nodes {:.2} s (export ready after {exported:.2} s), {sent} bytes on loopback",
            cp_times[round], copy_times[round]
        );
    }
    // The same job on one node (no network, no TLS): what the transport costs.
    let started = Instant::now();
    let mut local = CreateVolume::named("local", "local-clone", 0).expect("request");
    local.size = None;
    local.source = Some(VolumeSource::Volume(volume.id.clone()));
    e1.create_volume(&local).await.expect("local clone");
    println!(
        "a local clone of the same volume (the same job, no network): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let (cp, copy) = (median(cp_times), median(copy_times));
    // What QEMU's mechanism costs here without the driver, with and without TLS: the goal's
    // ceiling on this machine.
    for tls in [false, true] {
        let bare = median(bare_rounds(dir.path(), &image, tls).await);
        println!(
            "QEMU's mechanism alone ({}): {bare:.2} s, ratio {:.2} against cp; the driver's copy takes {:.2}× that",
            if tls { "two bare daemons, NBD with the driver's TLS" } else { "two bare daemons, NBD without TLS" },
            cp / bare,
            copy / bare
        );
    }
    println!(
        "cross-node copy 1GiB ratio={:.2} bytes_sent={sent} allocated={allocated} (cp {cp:.2} s, copy {copy:.2} s, medians of {ROUNDS}; bytes_sent/allocated = {:.3})",
        cp / copy,
        sent as f64 / allocated as f64
    );
    for engine in [source, target] {
        let pid = engine.daemon().pid();
        drop(engine);
        if let Some(pid) = pid {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}
