//! Test environment: a real qemu-storage-daemon per test, under a temporary directory.
#![allow(dead_code)]

pub mod certs;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qsd_node::engine::{Engine, EngineConfig, EngineCore, EngineEvent, PoolConfig};
use qsd_node::pool::id::ObjectId;
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Origin};

pub const MIB: u64 = 1 << 20;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub engine: Option<Engine>,
    pub config: EngineConfig,
}

impl Env {
    pub async fn new() -> Env {
        Env::with_depth(8).await
    }

    pub async fn with_depth(depth: u32) -> Env {
        // The guest suite points this at a writable place (its /tmp is the host's, read-only).
        let base = std::env::var_os("QSD_TEST_TMPDIR").unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new().prefix("qsd-test-").tempdir_in(base).expect("tempdir");
        let config = EngineConfig {
            node: NodeName::parse("node-1").expect("node"),
            state_dir: dir.path().join("state"),
            daemon: DaemonConfig::managed(dir.path().join("run")),
            pools: vec![PoolConfig {
                name: PoolName::parse("local").expect("pool"),
                path: dir.path().join("pool"),
                kind: PoolKind::Local,
            }],
            default_max_chain_depth: depth,
            copy_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        };
        let engine = Engine::open(config.clone()).await.expect("engine opens");
        Env { dir, engine: Some(engine), config }
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine running")
    }

    pub fn core(&self) -> Arc<EngineCore> {
        // Engine derefs to EngineCore; operations that spawn work need the Arc.
        self.engine().core_arc()
    }

    pub fn pool_dir(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// What health answers may say of the pool now besides a volume's own findings: full or
    /// nearly full when the host's disk is (CI machines' often are), nothing otherwise.
    pub fn pool_space_reasons(&self) -> Vec<String> {
        let u = qsd_node::mount::usage(&self.pool_dir()).expect("statvfs");
        let found = qsd_csi_model::health::pool_space("local", u.bytes_available, u.bytes_total);
        found.into_iter().map(|f| f.reason).collect()
    }

    pub fn layer_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(self.pool_dir().join("layers"))
            .expect("layers dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        files.sort();
        files
    }

    /// Simulates a node-plugin restart: the engine goes away, the daemon keeps running.
    pub async fn restart_engine(&mut self) -> Engine {
        drop(self.engine.take());
        Engine::open(self.config.clone()).await.expect("engine reopens")
    }

    pub fn daemon_pid(&self) -> u32 {
        self.engine().daemon().pid().expect("daemon running")
    }

    pub fn kill_daemon(&self) {
        let pid = self.daemon_pid();
        let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -KILL {pid}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Stop supervision before killing the daemon: a live engine would (rightly) start a
        // new daemon the moment this one dies.
        drop(self.engine.take());
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("run/qsd.pid")) {
            let _ = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        // Dead FUSE exports stay mounted until detached.
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("state/exports")) {
            for entry in entries.flatten() {
                let _ = std::process::Command::new("umount").arg("-l").arg(entry.path()).status();
            }
        }
    }
}

/// Waits for an engine event matching `pred`, failing after a generous deadline.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
    pred: impl Fn(&EngineEvent) -> bool,
) -> EngineEvent {
    let deadline = Duration::from_secs(60);
    tokio::time::timeout(deadline, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => continue,
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("event within deadline")
}

pub fn is_reconciled(e: &EngineEvent) -> bool {
    matches!(e, EngineEvent::Reconciled { .. })
}

/// A reconciliation that rebuilt exports (after the daemon died).
pub fn is_rebuilt(e: &EngineEvent) -> bool {
    matches!(e, EngineEvent::Reconciled { rebuilt, .. } if *rebuilt > 0)
}

pub fn reconciled_origin(e: &EngineEvent) -> Option<(Origin, usize)> {
    match e {
        EngineEvent::Reconciled { origin, rebuilt } => Some((*origin, *rebuilt)),
        _ => None,
    }
}

/// A deterministic pattern for block `index` with `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8)).collect()
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open export");
    f.write_all_at(data, offset).expect("write export");
    f.sync_all().expect("fsync export");
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open export");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read export");
    buf
}

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    std::process::Command::new("qemu-img").args(args).output().expect("qemu-img runs")
}

/// Reads a whole volume's visible content offline through qemu-img (follows the chain).
pub fn read_volume_offline(env: &Env, volume_id: &ObjectId, out: &Path) {
    let core = env.core();
    let (pool, chain) = core.volume_chain(volume_id).expect("volume");
    let src = pool.layer_path(chain[0]);
    let o = qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        src.to_str().unwrap_or_default(),
        out.to_str().unwrap_or_default(),
    ]);
    assert!(o.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&o.stderr));
}

/// The URI of an NBD export for qemu-io / qemu-img.
pub fn nbd_uri(e: &qsd_node::graph::ExportEndpoint) -> String {
    format!("nbd+unix:///{}?socket={}", e.name, e.path.display())
}

/// Runs one qemu-io command against an NBD export; fails on any error or pattern mismatch.
pub fn nbd_io(e: &qsd_node::graph::ExportEndpoint, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, &nbd_uri(e)])
        .output()
        .expect("qemu-io runs");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "{cmd}: {text}"
    );
}

/// A request for a volume restored from a snapshot at the snapshot's size.
pub fn restore_request(name: &str, snapshot_id: &ObjectId) -> qsd_node::engine::CreateVolume {
    let mut r = qsd_node::engine::CreateVolume::named("local", name, 0).expect("request");
    r.size = None;
    r.source = Some(qsd_node::engine::VolumeSource::Snapshot(snapshot_id.clone()));
    r
}

/// A request for a full clone of a volume at its size.
pub fn clone_request(name: &str, volume_id: &ObjectId) -> qsd_node::engine::CreateVolume {
    let mut r = qsd_node::engine::CreateVolume::named("local", name, 0).expect("request");
    r.size = None;
    r.source = Some(qsd_node::engine::VolumeSource::Volume(volume_id.clone()));
    r
}

/// An ID as text, parsed (of the kind its prefix names).
pub fn id(text: &str) -> ObjectId {
    text.parse().expect("an ID")
}

/// A volume or snapshot name, parsed.
pub fn name(text: &str) -> qsd_node::pool::ObjectName {
    qsd_node::pool::ObjectName::parse(text).expect("a name")
}
