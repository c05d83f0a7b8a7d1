//! A daemon managed elsewhere (the Kubernetes sidecar container): we only connect, and when it
//! dies and its manager restarts it, we reconnect and rebuild.

mod common;

use common::*;
use qsd_node::engine::{CreateVolume, Engine, EngineConfig, PoolConfig};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Mode, Origin};

/// Starts a daemon the way the chart's sidecar does: in the foreground of its own process.
fn start_sidecar(run: &std::path::Path) -> std::process::Child {
    let child = std::process::Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!("socket,id=ctl,path={}/qmp.sock,server=on,wait=off", run.display()))
        .args(["--monitor", "chardev=ctl"])
        .spawn()
        .expect("sidecar daemon");
    // The socket appears once the daemon listens; watch the directory for it.
    let socket = run.join("qmp.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "sidecar never listened");
        std::thread::yield_now();
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_externally_managed_daemon_is_reconnected_and_rebuilt_after_its_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let mut sidecar = start_sidecar(&run);
    let config = EngineConfig {
        node: NodeName::parse("node-1").expect("node"),
        state_dir: dir.path().join("state"),
        daemon: DaemonConfig { mode: Mode::External, ..DaemonConfig::managed(&run) },
        pools: vec![PoolConfig {
            name: PoolName::parse("local").expect("pool"),
            path: dir.path().join("pool"),
            kind: PoolKind::Local,
        }],
        default_max_chain_depth: 8,
    };
    let engine = Engine::open(config).await.expect("connects to the sidecar");
    let mut events = engine.subscribe();
    assert_eq!(
        reconciled_origin(&wait_event(&mut events, is_reconciled).await),
        Some((Origin::Adopted, 0))
    );
    let core = engine.core_arc();
    let vol =
        core.create_volume(&CreateVolume::new("local", "v", 8 * MIB as i64)).await.expect("create");
    let ep = core.attach(&vol.id, ExportKind::Nbd).await.expect("attach").endpoint;
    nbd_io(&ep, "write -P 0x77 0 1M");
    nbd_io(&ep, "flush");

    sidecar.kill().expect("SIGKILL the sidecar");
    sidecar.wait().expect("reaped");
    let _ = std::fs::remove_file(run.join("qmp.sock"));
    let mut sidecar = start_sidecar(&run); // its manager restarts it
    let event = wait_event(&mut events, is_reconciled).await;
    assert_eq!(reconciled_origin(&event), Some((Origin::Adopted, 1)), "reconnected and rebuilt");
    nbd_io(&ep, "read -P 0x77 0 1M");
    core.detach(&vol.id).await.expect("detach");
    drop(engine);
    sidecar.kill().expect("stop sidecar");
    let _ = sidecar.wait();
}
