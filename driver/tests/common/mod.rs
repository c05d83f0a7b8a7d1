//! What the end-to-end suites share: the built `qsd-csi standalone` binary started on a
//! temporary socket and state directory, its CSI clients, and cleanup of whatever it left
//! mounted or attached.
#![allow(dead_code)]

pub mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use qsd_csi_proto::csi;
use qsd_csi_proto::csi::controller_client::ControllerClient;
use qsd_csi_proto::csi::identity_client::IdentityClient;
use qsd_csi_proto::csi::node_client::NodeClient;
use tonic::transport::Channel;

pub const MIB: i64 = 1 << 20;
/// How often a condition (a socket appearing, a file growing) is re-checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

pub struct Driver {
    /// Arguments added to `standalone` (kept for restarts).
    pub extra: Vec<String>,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
}

impl Driver {
    pub async fn start() -> Driver {
        Self::start_with(Vec::new()).await
    }

    /// A driver started with `extra` arguments to `standalone` (`--pool`, say).
    pub async fn start_with(extra: Vec<String>) -> Driver {
        let dir = tempfile::Builder::new().prefix("qsd-e2e-").tempdir_in("/tmp").expect("tempdir");
        let child = Self::spawn(dir.path(), &extra);
        Self::connected(dir, extra, child).await
    }

    /// A driver whose fault point `point` is armed: reaching it, the process SIGKILLs itself.
    /// `shared`: its default pool (`state/pools/default`) is a shared pool.
    pub async fn start_armed(point: &str, shared: bool) -> Driver {
        let dir =
            tempfile::Builder::new().prefix("qsd-crash-").tempdir_in("/tmp").expect("tempdir");
        let pool = dir.path().join("state/pools/default");
        let extra = match shared {
            true => vec!["--pool".to_owned(), format!("default={},shared", pool.display())],
            false => Vec::new(),
        };
        let child = Self::spawn_env(dir.path(), &extra, &[(qsd_node::fault::ENV, point)]);
        Self::connected(dir, extra, child).await
    }

    async fn connected(dir: tempfile::TempDir, extra: Vec<String>, child: Child) -> Driver {
        let channel = Self::connect(&dir.path().join("csi.sock")).await;
        Driver {
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            dir,
            extra,
            child: Some(child),
        }
    }

    /// Starts the driver again on its state (no fault point armed) with fresh clients.
    async fn respawn(&mut self) {
        self.child = Some(Self::spawn(self.dir.path(), &self.extra));
        let channel = Self::connect(&self.dir.path().join("csi.sock")).await;
        self.controller = ControllerClient::new(channel.clone());
        self.node = NodeClient::new(channel.clone());
        self.identity = IdentityClient::new(channel);
    }

    pub fn spawn(dir: &Path, extra: &[String]) -> Child {
        Self::spawn_env(dir, extra, &[])
    }

    /// Waits for a driver that killed itself at a fault point (asserting it died of SIGKILL),
    /// starts it again with no point armed, and returns how long it took to answer Probe ready.
    pub async fn restart_after_crash(&mut self) -> Duration {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("reaped");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the fault point killed it: {status}");
        let started = Instant::now();
        self.respawn().await;
        self.ready_since(started).await
    }

    /// Asks Probe until the driver says ready; how long that was after `started`.
    pub async fn ready_since(&mut self, started: Instant) -> Duration {
        loop {
            let probe = self.identity.probe(csi::ProbeRequest {}).await;
            if probe.is_ok_and(|r| r.into_inner().ready == Some(true)) {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the driver never became ready");
            tokio::time::sleep(POLL_INTERVAL).await; // poll the probe
        }
    }

    pub fn spawn_env(dir: &Path, extra: &[String], env: &[(&str, &str)]) -> Child {
        let socket = dir.join("csi.sock");
        let _ = std::fs::remove_file(&socket);
        // Appended to, so a restart keeps what the killed process said.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("driver.log"))
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
            .arg("standalone")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--node", "e2e-node"])
            .args(extra)
            .envs(env.iter().copied())
            .stderr(log)
            .spawn()
            .expect("qsd-csi runs");
        wait_until("the CSI socket", || socket.exists());
        child
    }

    pub async fn connect(socket: &Path) -> Channel {
        qsd_csi::calls::connect(socket).await.expect("connect to the CSI socket")
    }

    /// SIGKILLs the driver process (the daemon, devices and mounts stay) and starts it again.
    pub async fn kill_and_restart(&mut self) {
        self.kill_and_restart_after(|| {}).await;
    }

    /// SIGKILLs the driver, runs `between` before reaping it (a process stuck in an
    /// uninterruptible call exits only once that returns), and starts it again.
    pub async fn kill_and_restart_after(&mut self, between: impl FnOnce()) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        between();
        child.wait().expect("reaped");
        self.respawn().await;
    }

    /// The pid of the daemon the driver runs.
    pub fn daemon_pid(&self) -> String {
        let pid = std::fs::read_to_string(self.path("state/run/qsd.pid")).expect("daemon pid");
        pid.trim().to_owned()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the default pool's filesystem warrants saying in a health answer now (full, nearly
    /// full or nothing): the host's disk, not the driver, decides it.
    pub fn pool_space_finding(&self) -> Option<qsd_csi_model::health::Finding> {
        let u = qsd_node::mount::usage(&self.path("state/pools/default")).expect("statvfs");
        qsd_csi_model::health::pool_space("default", u.bytes_available, u.bytes_total)
    }

    pub async fn create(
        &mut self,
        name: &str,
        size: i64,
        cap: &csi::VolumeCapability,
        source: Option<csi::volume_content_source::Type>,
    ) -> Result<csi::Volume, tonic::Status> {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capabilities: vec![cap.clone()],
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            parameters: [("csi.storage.k8s.io/pvc/name".to_owned(), name.to_owned())].into(),
            ..Default::default()
        };
        Ok(self.controller.create_volume(req).await?.into_inner().volume.expect("volume"))
    }

    pub async fn stage_and_publish(
        &mut self,
        volume: &csi::Volume,
        cap: &csi::VolumeCapability,
        readonly: bool,
    ) -> Result<PathBuf, tonic::Status> {
        let id = &volume.volume_id;
        let staging = self.path(&format!("staging-{}", short(id)));
        let target = self.path(&format!("target-{}", short(id)));
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap.clone()),
                readonly,
                ..Default::default()
            })
            .await?;
        Ok(target)
    }

    pub async fn unpublish_and_unstage(&mut self, id: &str) {
        let staging = self.path(&format!("staging-{}", short(id)));
        let target = self.path(&format!("target-{}", short(id)));
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .expect("unpublish");
        assert!(!target.exists(), "target removed");
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .expect("unstage");
    }

    pub async fn snapshot(&mut self, volume_id: &str, name: &str) -> csi::Snapshot {
        let req = csi::CreateSnapshotRequest {
            source_volume_id: volume_id.into(),
            name: name.into(),
            ..Default::default()
        };
        self.controller
            .create_snapshot(req)
            .await
            .expect("snapshot")
            .into_inner()
            .snapshot
            .expect("snapshot")
    }

    pub async fn delete(&mut self, volume_id: &str) {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume_id.into(),
                ..Default::default()
            })
            .await
            .expect("delete");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // A failing test shows what the driver said last, and keeps the whole log.
            let log =
                std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default();
            let kept =
                std::env::temp_dir().join(format!("qsd-csi-failed-{}.log", std::process::id()));
            let _ = std::fs::write(&kept, &log);
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("the driver's last words (whole log kept at {}):", kept.display());
            for line in tail.into_iter().rev() {
                eprintln!("  {line}");
            }
        }
        let mounted: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name =
                    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                (name.starts_with("target-") || name.starts_with("staging-"))
                    && qsd_node::mount::is_mountpoint(p)
            })
            .collect();
        for path in mounted {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("state/run/qsd.pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        let exports = self.dir.path().join("state/exports");
        for entry in std::fs::read_dir(exports).into_iter().flatten().flatten() {
            let _ = Command::new("losetup").arg("-j").arg(entry.path()).output().map(|o| {
                for dev in
                    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.split(':').next())
                {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            });
            if qsd_node::mount::is_mountpoint(&entry.path()) {
                let _ = Command::new("umount").arg("-l").arg(entry.path()).status();
            }
        }
    }
}

pub fn short(id: &str) -> String {
    id.rsplit(':').next().unwrap_or(id).to_owned()
}

pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn df_size(path: &Path) -> u64 {
    let out = Command::new("df").args(["--output=size", "-B1"]).arg(path).output().expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df size")
}

pub fn sync_fs(path: &Path) {
    assert!(Command::new("sync").arg("-f").arg(path).status().is_ok_and(|s| s.success()));
}

/// Runs the client binary against `d`'s endpoint: (success, stdout, stderr).
pub fn cli(d: &Driver, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
        .arg(format!("--endpoint=unix://{}", d.path("csi.sock").display()))
        .args(args)
        .output()
        .expect("qsd-csi runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tmpfs of `size` at a fresh directory, unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("qsd-pool-").tempdir_in("/tmp").expect("dir");
        let path = dir.keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs");
        Tmpfs(path)
    }

    /// Fills it up; the filler's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .arg("bs=1M")
            .output();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
