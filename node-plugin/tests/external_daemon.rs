//! A daemon managed elsewhere (the Kubernetes sidecar container): we only connect, and when it
//! dies and its manager restarts it, we reconnect and rebuild.

mod common;

use common::*;
use qsd_node::engine::{CreateVolume, Engine, EngineConfig, PoolConfig};
use qsd_node::graph::ExportKind;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Mode, Origin};

/// A daemon killed when dropped, so a failing test leaves none behind.
struct Sidecar(std::process::Child);

impl std::ops::Deref for Sidecar {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Sidecar {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An engine under `dir` connecting to a daemon managed elsewhere, listening in `run`.
fn external_config(dir: &std::path::Path, run: &std::path::Path) -> EngineConfig {
    EngineConfig {
        node: NodeName::parse("node-1").expect("node"),
        state_dir: dir.join("state"),
        daemon: DaemonConfig { mode: Mode::External, ..DaemonConfig::managed(run) },
        pools: vec![PoolConfig {
            name: PoolName::parse("local").expect("pool"),
            path: dir.join("pool"),
            kind: PoolKind::Local,
        }],
        default_max_chain_depth: 8,
        copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
    }
}

/// Starts a daemon the way the chart's daemon pod does: in the foreground of its own process.
fn start_sidecar(run: &std::path::Path) -> Sidecar {
    let child = std::process::Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!("socket,id=ctl,path={}/qmp.sock,server=on,wait=off", run.display()))
        .args(["--monitor", "chardev=ctl"])
        .spawn()
        .map(Sidecar)
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
    let config = external_config(dir.path(), &run);
    let engine = Engine::open(config).await.expect("connects to the sidecar");
    let mut events = engine.subscribe();
    assert_eq!(
        reconciled_origin(&wait_event(&mut events, is_reconciled).await),
        Some((Origin::Adopted, 0))
    );
    let core = engine.core_arc();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_plugin_started_before_its_external_daemon_waits_for_it() {
    // The chart's daemon runs in a pod of its own, which may start after the node plugin's.
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let config = external_config(dir.path(), &run);
    let opening = tokio::spawn(Engine::open(config));
    assert!(!run.join("qmp.sock").exists(), "no daemon yet");
    let mut sidecar = start_sidecar(&run);
    let engine = tokio::time::timeout(std::time::Duration::from_secs(60), opening)
        .await
        .expect("opened once the daemon listened")
        .expect("task")
        .expect("connects to the late daemon");
    let core = engine.core_arc();
    let vol = core
        .create_volume(&CreateVolume::named("local", "w", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    core.delete_volume(&vol.id).await.expect("delete");
    drop(engine);
    sidecar.kill().expect("stop sidecar");
    let _ = sidecar.wait();
}
