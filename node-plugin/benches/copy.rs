//! A volume copied between two nodes against `cp --sparse=always` of the same image.
//!
//! Two engines, each with its own qemu-storage-daemon and pool, stand for two nodes. The
//! source holds a 1 GiB volume with 512 MiB of data in 1 MiB pieces scattered over it. The
//! baseline copies its image file with `cp --sparse=always` and fsyncs the copy (the copy
//! between nodes writes its target with O_DIRECT: both end durable). The copy runs as the
//! controller drives it: the source node serves a point-in-time snapshot of the volume over
//! NBD with TLS, the target's daemon pulls it; its traffic passes a relay that counts the
//! bytes in both directions. Prints
//! `cross-node copy 1GiB ratio=R bytes_sent=B allocated=A`, R = cp's time / the copy's time
//! (goal ≥ 0.5), and B within 10 % of A. Run with `cargo bench -p qsd-csi-node --bench copy`
//! (root, QEMU ≥ 7.2, FUSE).

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use qsd_node::engine::{CreateVolume, Engine, EngineConfig, PoolConfig, VolumeSource};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
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

/// Relays connections from a port of its own to `port`, counting the bytes both ways.
async fn counting_relay(port: u16, bytes: Arc<AtomicU64>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                else {
                    return;
                };
                // A relay adds no delay of its own (the copy server's sockets have none).
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                if let Ok((up, down)) =
                    tokio::io::copy_bidirectional(&mut client, &mut server).await
                {
                    bytes.fetch_add(up + down, Ordering::SeqCst);
                }
            });
        }
    });
    relay_port
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
        .create_volume(&CreateVolume::new("local", "data", (1024 * MIB) as i64))
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

        let bytes = Arc::new(AtomicU64::new(0));
        let source_id = VolumeSource::Volume(volume.id.clone());
        let started = Instant::now();
        let served = e1.export_for_copy(&source_id, "n2").await.expect("export");
        let exported = started.elapsed().as_secs_f64();
        let mut remote = served.remote().clone();
        remote.port = counting_relay(remote.port, bytes.clone()).await;
        let mut request = CreateVolume::new("local", &format!("copy-{round}"), 0);
        request.size = None;
        request.source = Some(source_id);
        request.remote = Some(remote.clone());
        e2.create_volume(&request).await.expect("copy across");
        copy_times.push(started.elapsed().as_secs_f64());
        served.close().await;
        // The relay's count lands when the target's connection closes (with its node).
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while bytes.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        sent = bytes.load(Ordering::SeqCst);
        allocated = remote.allocated;
        println!(
            "round {round}: cp --sparse=always {:.2} s, copy across nodes {:.2} s (export ready after {exported:.2} s), {sent} bytes on the wire",
            cp_times[round], copy_times[round]
        );
    }
    // The same job on one node (no network, no TLS): what the transport costs.
    let started = Instant::now();
    let mut local = CreateVolume::new("local", "local-clone", 0);
    local.size = None;
    local.source = Some(VolumeSource::Volume(volume.id.clone()));
    e1.create_volume(&local).await.expect("local clone");
    println!(
        "a local clone of the same volume (the same job, no network): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let (cp, copy) = (median(cp_times), median(copy_times));
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
