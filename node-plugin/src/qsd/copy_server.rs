//! A copy's source served to another node: a qemu-storage-daemon of its own (the node's
//! daemon has one NBD server, on a unix socket, for its kernel devices) that opens the
//! source's layers read-only and exports them over NBD on TCP, with TLS and a pre-shared key
//! made for this copy alone.
//!
//! ```text
//!   <run>/copies/<tag>/  (0700)
//!   ├── keys.psk   "<identity>:<hex key>" (0600), read by the server at each handshake
//!   ├── qsd.pid    written once the export exists (the daemon's documented order)
//!   └── qsd.log    its errors
//! ```
//! The listening socket is bound here and handed to the child as descriptor 3, so its port is
//! known before the child starts and no other process can take it in between. The child dies
//! with the thread that spawned it (`PR_SET_PDEATHSIG`) and when dropped; a plugin restarted
//! after a kill sweeps what is left ([`sweep`]).

use std::net::{IpAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::pool::store;

/// The TLS versions and ciphers of a copy, for both ends (gnutls priority syntax): TLS 1.3
/// with AES-128-GCM. gnutls' default picks a cipher its nettle backend runs at a third of the
/// speed here (a 512 MiB copy took 3.4 s of TLS against 1.9 s).
pub const TLS_PRIORITY: &str = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM";

/// The server's listening descriptor in the child.
const LISTEN_FD: i32 = 3;
/// How long the child may take to open the layers and export them.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What to serve and how.
#[derive(Debug)]
pub struct CopyServerConfig<'a> {
    /// The `qemu-storage-daemon` executable.
    pub binary: &'a Path,
    /// This copy's directory (created 0700; removed when the server stops).
    pub dir: PathBuf,
    /// The source's node definition (the layers, read-only), as `blockdev-add` JSON.
    pub blockdev: serde_json::Value,
    /// The definition's top node.
    pub node: &'a str,
    /// Where to listen (port chosen by the kernel).
    pub listen: IpAddr,
    /// The NBD export's name.
    pub export: &'a str,
    /// The PSK identity and key.
    pub identity: &'a str,
    /// The pre-shared key.
    pub key: &'a [u8],
}

/// A running copy server; stopped (and its directory removed) when dropped.
#[derive(Debug)]
pub struct CopyServer {
    child: Option<tokio::process::Child>,
    dir: PathBuf,
    port: u16,
}

/// A listening socket on `ip` (any port) whose connections have Nagle's algorithm off. The
/// accepted sockets inherit it; QEMU 7.2's NBD server does not set it, and its TLS channel
/// sends a reply's header and data as separate records, so with Nagle each reply waited for
/// the client's delayed ACK: a copy ran 20 times slower than without TLS.
fn listener(ip: IpAddr) -> std::io::Result<TcpListener> {
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    socket.bind((ip, 0).into())?;
    socket.listen(16)?.into_std()
}

/// Doubles the commas of a value for QEMU's `key=value,…` option syntax.
fn keyval(value: &Path) -> String {
    value.display().to_string().replace(',', ",,")
}

/// Writes the PSK file the server (or a client daemon) reads.
pub fn write_key(dir: &Path, identity: &str, key: &[u8]) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create copy directory", dir, e))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    store::write_bytes(dir, "keys.psk", format!("{identity}:{hex}\n").as_bytes(), 0o600)
}

impl CopyServer {
    /// Starts the server and waits until its export exists.
    pub async fn start(config: CopyServerConfig<'_>) -> Result<CopyServer> {
        write_key(&config.dir, config.identity, config.key)?;
        let listener =
            listener(config.listen).map_err(|e| Error::io("listen for a copy", &config.dir, e))?;
        let port = listener.local_addr().map_err(|e| Error::io("listen", &config.dir, e))?.port();
        let pidfile = config.dir.join("qsd.pid");
        let log_path = config.dir.join("qsd.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
        let mut command = tokio::process::Command::new(config.binary);
        command
            .arg("--object")
            .arg(format!(
                "tls-creds-psk,id=tls0,endpoint=server,dir={},priority={TLS_PRIORITY}",
                keyval(&config.dir)
            ))
            .arg("--blockdev")
            .arg(config.blockdev.to_string())
            .arg("--nbd-server")
            .arg(format!("addr.type=fd,addr.str={LISTEN_FD},tls-creds=tls0"))
            .arg("--export")
            .arg(format!(
                "type=nbd,id=copy,node-name={},name={},writable=off",
                config.node, config.export
            ))
            .arg("--pidfile")
            .arg(&pidfile)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        crate::sys::die_with_parent(&mut command);
        crate::sys::pass_fd(&mut command, listener.as_raw_fd(), LISTEN_FD);
        let child = crate::command::spawn_tied(command).await.map_err(|source| Error::Spawn {
            program: config.binary.display().to_string(),
            source,
        })?;
        drop(listener); // the child holds it now
        let mut server = CopyServer { child: Some(child), dir: config.dir, port };
        server.ready(&pidfile, &log_path).await?;
        Ok(server)
    }

    /// Waits for the pidfile (written after the export was made) or the child's exit.
    async fn ready(&mut self, pidfile: &Path, log: &Path) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let child = self.child.as_mut().expect("a started server has its child");
        loop {
            if pidfile.exists() {
                return Ok(());
            }
            let exited = child.try_wait().map_err(|e| Error::io("wait for", pidfile, e))?;
            if let Some(status) = exited {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                return Err(Error::DaemonStart {
                    reason: format!("the copy server exited with {status}: {}", log.trim()),
                    source: None,
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::DaemonStart {
                    reason: "the copy server did not start in time".into(),
                    source: None,
                });
            }
            // The child signals readiness only through its pidfile.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server and removes its directory.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for CopyServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills a copy server a killed plugin left in `dir` (its pidfile naming a live
/// qemu-storage-daemon) and removes the directory.
pub fn sweep(dir: &Path) {
    if let Some(pid) = super::running_pid(&dir.join("qsd.pid")) {
        tracing::warn!(pid, dir = %dir.display(), "stopping a copy server left by a restart");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
