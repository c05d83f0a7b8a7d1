//! Starting, adopting and reconnecting to qemu-storage-daemon.
//!
//! ```text
//!   run dir (0700)
//!   ├── qmp.sock           our persistent control monitor
//!   ├── qmp-operator.sock  a second monitor for people and tools
//!   ├── nbd.sock           the daemon's NBD server (started on first NBD export)
//!   ├── qsd.pid            written by the daemon once it is ready
//!   └── qsd.log            the daemon's start-up errors
//! ```
//!
//! In [`Mode::Managed`] the daemon is started detached (`--daemonize`: the parent exits once the
//! monitors listen), so it outlives the node plugin; after a restart of the plugin it is adopted
//! from its pidfile and socket. In [`Mode::External`] something else (the Kubernetes sidecar
//! container) runs it and we only connect.

pub mod copy_server;
pub mod fuse_reads;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::qmp::commands::{QueryVersion, VersionInfo};
use crate::qmp::{QmpClient, QmpError};

/// Who runs the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// We start it (and restart it if it dies).
    Managed,
    /// It is managed elsewhere; we connect to its socket and wait for it to come back.
    External,
}

/// Where and how the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The `qemu-storage-daemon` executable.
    pub binary: PathBuf,
    /// Directory for sockets, pidfile and log; created 0700.
    pub run_dir: PathBuf,
    /// Who runs the daemon.
    pub mode: Mode,
}

impl DaemonConfig {
    /// A managed daemon from `PATH` with its files under `run_dir`.
    pub fn managed(run_dir: impl Into<PathBuf>) -> Self {
        DaemonConfig {
            binary: PathBuf::from("qemu-storage-daemon"),
            run_dir: run_dir.into(),
            mode: Mode::Managed,
        }
    }

    /// Our control monitor socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The operators' monitor socket.
    pub fn operator_socket(&self) -> PathBuf {
        self.run_dir.join("qmp-operator.sock")
    }

    /// The NBD server's socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir.join("nbd.sock")
    }

    /// The daemon's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("qsd.pid")
    }
}

/// How we came to be connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// We started a fresh daemon: its graph is empty.
    Started,
    /// We reconnected to a daemon that was already running: its graph may hold our nodes.
    Adopted,
}

/// What differs between the QEMU versions we support (7.2 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// A loop device may use direct I/O over a FUSE export (the FUSE export corrupts parallel
    /// O_DIRECT writes before QEMU 10.1).
    pub loop_direct_io_over_fuse: bool,
    /// The daemon serves FUSE exports with blocking reads from its main loop, which a request
    /// dropped by the kernel stops for good (before QEMU 10.1; see `fuse_reads`).
    pub fuse_reads_can_block: bool,
}

impl Features {
    /// Derives the feature set from the daemon's version.
    pub fn for_version(version: &VersionInfo) -> Self {
        let fuse_rework = version.at_least(10, 1);
        Features { loop_direct_io_over_fuse: fuse_rework, fuse_reads_can_block: !fuse_rework }
    }
}

/// A connection to a running daemon, replaced when the daemon restarts.
#[derive(Debug)]
pub struct Daemon {
    config: DaemonConfig,
    client: Mutex<QmpClient>,
    version: Mutex<VersionInfo>,
    /// Each QMP command's round trip, by command (`qsd_csi_qmp_command_duration_seconds`).
    latency: prometheus::HistogramVec,
    /// Times the connection was lost and made again: the daemon died (or its container
    /// restarted) and was restarted or waited for.
    restarts: std::sync::atomic::AtomicU64,
}

/// How long we wait for the greeting; a monitor busy with another client never sends one.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon whose monitor is closed may take to exit before we call it wedged.
const DYING_DAEMON_WAIT: Duration = Duration::from_secs(10);

impl Daemon {
    /// Adopts a running daemon or starts one (managed), or connects (external).
    pub async fn connect(config: DaemonConfig) -> Result<(Daemon, Origin)> {
        prepare_run_dir(&config.run_dir)?;
        let (client, origin) = establish_or_wait(&config).await?;
        let version = query_version(&client).await?;
        tracing::info!(
            version = %format!("{}.{}.{}", version.qemu.major, version.qemu.minor, version.qemu.micro),
            ?origin,
            "connected to qemu-storage-daemon"
        );
        let latency = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "qsd_csi_qmp_command_duration_seconds",
                "Round trip of a QMP command to qemu-storage-daemon, by command.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                5.0,
            ]),
            &["command"],
        )
        .map_err(|e| Error::Inconsistent(format!("the QMP latency histogram: {e}")))?;
        client.record_latency(latency.clone());
        let daemon = Daemon {
            config,
            client: Mutex::new(client),
            version: Mutex::new(version),
            latency,
            restarts: Default::default(),
        };
        daemon.guard_fuse_reads(); // the exports of an adopted daemon
        Ok((daemon, origin))
    }

    /// After the connection dropped: adopt the daemon if it still runs, otherwise start a new
    /// one (managed) or wait for it to come back (external).
    pub async fn reconnect(&self) -> Result<Origin> {
        let (client, origin) = establish_or_wait(&self.config).await?;
        let version = query_version(&client).await?;
        client.record_latency(self.latency.clone());
        *lock(&self.version) = version;
        *lock(&self.client) = client;
        self.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.guard_fuse_reads();
        Ok(origin)
    }

    /// The current QMP client.
    pub fn qmp(&self) -> QmpClient {
        lock(&self.client).clone()
    }

    /// The QMP round-trip histogram.
    pub fn latency(&self) -> &prometheus::HistogramVec {
        &self.latency
    }

    /// How often the connection was lost and made again since this process started.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the connection to the daemon is up now.
    pub fn is_up(&self) -> bool {
        !lock(&self.client).is_closed()
    }

    /// The daemon's version.
    pub fn version(&self) -> VersionInfo {
        lock(&self.version).clone()
    }

    /// Version-dependent behaviour.
    pub fn features(&self) -> Features {
        Features::for_version(&self.version())
    }

    /// The configuration this daemon runs with.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// Makes the daemon's FUSE reads non-blocking where they can stop it (`fuse_reads`): after
    /// each FUSE export is added, and on connecting. Without the daemon's pid (an external
    /// daemon that writes no pidfile, or one in another PID namespace) or the right to inspect
    /// it, the exports work as before and a warning says what is at risk.
    pub fn guard_fuse_reads(&self) {
        if !self.features().fuse_reads_can_block {
            return;
        }
        let outcome = match self.pid() {
            Some(pid) => fuse_reads::guard(pid).map_err(|e| e.to_string()),
            None => Err(format!("no live daemon in {}", self.config.pidfile().display())),
        };
        match outcome {
            Ok(0) => {}
            Ok(changed) => tracing::debug!(changed, "FUSE export reads made non-blocking"),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot make the daemon's FUSE reads non-blocking: a process killed while \
                 waiting on a FUSE export can stop the daemon until that export is used again"
            ),
        }
    }

    /// The daemon's pid, from its pidfile, if it is alive.
    pub fn pid(&self) -> Option<u32> {
        running_pid(&self.config.pidfile())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn query_version(client: &QmpClient) -> Result<VersionInfo> {
    client
        .call(&QueryVersion {})
        .await
        .map_err(|source| Error::Qmp { command: "query-version", source })
}

/// [`establish`], except that an external daemon not reachable yet (its pod starting, or
/// restarting) is waited for, with backoff, however long it takes.
async fn establish_or_wait(config: &DaemonConfig) -> Result<(QmpClient, Origin)> {
    let mut delay = Duration::from_millis(50);
    loop {
        match establish(config).await {
            Err(e) if config.mode == Mode::External => {
                tracing::warn!(error = %e, socket = %config.qmp_socket().display(), "daemon not reachable yet; retrying");
                tokio::time::sleep(delay).await; // retry backoff
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

async fn establish(config: &DaemonConfig) -> Result<(QmpClient, Origin)> {
    let socket = config.qmp_socket();
    let running = running_pid(&config.pidfile());
    if let Some(pid) = running {
        free_if_stuck(pid).await;
    }
    if config.mode == Mode::External {
        return Ok((connect_qmp(&socket).await?, Origin::Adopted));
    }
    if let Some(pid) = running {
        match connect_qmp(&socket).await {
            Ok(client) => return Ok((client, Origin::Adopted)),
            // A daemon killed a moment ago (with its node plugin, say) keeps its pid and its
            // command line while it exits, but its monitor is already closed: once it has
            // gone, a new one is started.
            Err(e) if !ends_within(pid, DYING_DAEMON_WAIT).await => {
                return Err(Error::DaemonStart {
                    reason: format!(
                        "a daemon is running (pidfile {}) but its monitor does not answer: {}",
                        config.pidfile().display(),
                        e.with_causes()
                    ),
                    source: None,
                })
            }
            Err(e) => tracing::info!(pid, error = %e, "the daemon found running was exiting"),
        }
    }
    start(config).await?;
    Ok((connect_qmp(&socket).await?, Origin::Started))
}

/// Whether process `pid` has ended, or ends within `limit` (its pidfd turns readable when it
/// does).
async fn ends_within(pid: u32, limit: Duration) -> bool {
    let pidfd = match fuse_reads::open_pidfd(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()) => return true,
        Err(_) => return false,
    };
    let timeout = rustix::event::Timespec::try_from(limit).ok();
    let waited = tokio::task::spawn_blocking(move || {
        let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut fds, timeout.as_ref())
    });
    matches!(waited.await, Ok(Ok(n)) if n > 0)
}

/// A daemon found stuck on an empty FUSE queue (`fuse_reads`) is freed before we connect: its
/// monitor would never greet us otherwise.
async fn free_if_stuck(pid: u32) {
    match tokio::task::spawn_blocking(move || fuse_reads::free(pid)).await {
        Ok(Ok(true)) => tracing::warn!(
            pid,
            "the daemon was stuck reading an empty FUSE queue (a process waiting on an export \
             was killed); freed"
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!(pid, error = %e, "cannot check the daemon's FUSE reads"),
        Err(e) => tracing::warn!(pid, error = %e, "the FUSE read check did not finish"),
    }
}

async fn connect_qmp(socket: &Path) -> Result<QmpClient> {
    match tokio::time::timeout(GREETING_TIMEOUT, QmpClient::connect(socket)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(source)) => Err(Error::Qmp { command: "connect", source }),
        Err(_) => Err(Error::Qmp {
            command: "connect",
            source: QmpError::Protocol("no greeting: is another client on this monitor?".into()),
        }),
    }
}

fn prepare_run_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.to_string_lossy().contains(',') {
        return Err(Error::invalid("run dir", "must not contain ',' (QEMU option separator)"));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create run dir", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("restrict run dir", dir, e))
}

/// The pid in `pidfile` if that process is a live qemu-storage-daemon (not a recycled pid,
/// not a zombie).
fn running_pid(pidfile: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|b| *b == 0).next()?;
    String::from_utf8_lossy(argv0).contains("qemu-storage-daemon").then_some(pid)
}

async fn start(config: &DaemonConfig) -> Result<()> {
    let log_path = config.run_dir.join("qsd.log");
    let log = std::fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
    let _ = std::fs::remove_file(config.pidfile());
    let chardev = |id: &str, path: PathBuf| {
        format!("socket,id={id},path={},server=on,wait=off", path.display())
    };
    let mut command = tokio::process::Command::new(&config.binary);
    command
        .arg("--chardev")
        .arg(chardev("ctl", config.qmp_socket()))
        .args(["--monitor", "chardev=ctl"])
        .arg("--chardev")
        .arg(chardev("op", config.operator_socket()))
        .args(["--monitor", "chardev=op"])
        .arg("--pidfile")
        .arg(config.pidfile())
        .arg("--daemonize")
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    crate::sys::raise_open_files_limit(&mut command);
    if crate::sys::has_cap_sys_resource() {
        crate::sys::mark_as_io_server(&mut command);
    } else {
        tracing::warn!(
            "no CAP_SYS_RESOURCE: qemu-storage-daemon runs without PR_SET_IO_FLUSHER and \
             oom_score_adj -1000; a kernel device on this host could deadlock in memory reclaim"
        );
    }
    let mut child = command.spawn().map_err(|source| Error::DaemonStart {
        reason: format!("cannot run {}", config.binary.display()),
        source: Some(source),
    })?;
    // With --daemonize the parent exits once the monitors listen (or start-up failed).
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .map_err(|_| Error::DaemonStart { reason: "start-up timed out".into(), source: None })?
        .map_err(|source| Error::DaemonStart { reason: "wait".into(), source: Some(source) })?;
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(Error::DaemonStart {
            reason: format!("exited with {status}: {}", log.trim()),
            source: None,
        });
    }
    tracing::info!(pidfile = %config.pidfile().display(), "started qemu-storage-daemon");
    Ok(())
}
