//! A process killed while qemu-storage-daemon holds its FUSE request must not stop the daemon
//! (`qsd::fuse_reads`). Before QEMU 10.1 the daemon reads a FUSE export's request with a
//! blocking read once its main loop has seen one waiting; the kernel drops a request whose
//! maker is SIGKILLed before it is read, and the read then waits for good, the daemon with it.
//!
//! Made to happen on purpose here, not by chance: strace holds the daemon at the entry of each
//! `read` (`inject=read:delay_enter`), a `dd` opens the export, and it is SIGKILLed while the
//! daemon is held at the entry of its read of that request; strace then lets go.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pattern, qemu_img, read_at, write_at, Env, MIB};
use qsd_node::engine::CreateVolume;
use qsd_node::graph::ExportKind;
use qsd_node::qmp::commands::QueryVersion;
use qsd_node::qmp::QmpClient;
use qsd_node::qsd::{fuse_reads, Daemon, DaemonConfig, Origin};
use serde_json::json;

/// How long a daemon that still runs takes to answer at most (a stopped one never does).
const ANSWERS_WITHIN: Duration = Duration::from_secs(30);

/// A child killed when dropped (a test that fails half-way leaves no strace attached).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon and its FUSE mountpoints, killed and unmounted when dropped.
struct Cleanup(u32, Vec<std::path::PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        for mountpoint in &self.1 {
            let _ = Command::new("umount").arg("-l").arg(mountpoint).stderr(Stdio::null()).status();
        }
    }
}

/// Whether every `/dev/fuse` descriptor of process `pid` is non-blocking (its `fdinfo` flags,
/// octal, hold O_NONBLOCK), and how many there are.
fn fuse_descriptors_nonblocking(pid: u32) -> (bool, usize) {
    let mut all = (true, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten() {
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(Path::new("/dev/fuse")) {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let info = std::fs::read_to_string(info).expect("fdinfo");
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("flags");
        let flags = u32::from_str_radix(flags.trim(), 8).expect("octal flags");
        all = (all.0 && flags & libc::O_NONBLOCK as u32 != 0, all.1 + 1);
    }
    all
}

/// A `dd` reading `export`, SIGKILLed before its open is answered if the daemon is slow to.
fn kill_a_reader(export: &Path) {
    let dd = Command::new("dd")
        .arg(format!("if={}", export.display()))
        .args(["of=/dev/null", "bs=4096", "count=1", "status=none"])
        .spawn()
        .expect("dd");
    drop(Killed(dd));
}

/// Makes daemon `pid` lose a FUSE request on `export` after its main loop has seen it: returns
/// once the requester is dead and the daemon's read of it is let go. Only a daemon that reads
/// its FUSE requests blocking (before QEMU 10.1) is ever held at such a read.
fn lose_a_request(pid: u32, export: &Path) {
    let mut strace = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "-e", "trace=read"])
        .args(["-e", "inject=read:delay_enter=2000000", "-p", &pid.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("strace (scripts/install-deps installs it)");
    let said = strace.stderr.take().expect("stderr");
    let strace = Killed(strace);
    let mut said = BufReader::new(said);
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        assert!(said.read_line(&mut line).expect("strace's stderr") > 0, "strace ended");
    }
    let dd = Command::new("dd")
        .arg(format!("if={}", export.display()))
        .args(["of=/dev/null", "bs=4096", "count=1", "status=none"])
        .spawn()
        .expect("dd");
    let dd = Killed(dd);
    let started = Instant::now();
    while fuse_reads::stuck_on(pid).is_none() {
        assert!(started.elapsed() < ANSWERS_WITHIN, "the daemon never read the request");
        std::thread::sleep(Duration::from_millis(5)); // poll /proc/PID/syscall
    }
    drop(dd); // SIGKILLed and reaped: its request is dropped
    let mut strace = strace;
    let _ = Command::new("kill").args(["-TERM", &strace.0.id().to_string()]).status();
    strace.0.wait().expect("strace lets go");
}

async fn answers(qmp: &QmpClient, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, qmp.call(&QueryVersion {})).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_killed_while_the_daemon_holds_its_fuse_request_does_not_stop_the_daemon() {
    let env = Env::new().await;
    let core = env.core();
    let mut exports = Vec::new();
    for name in ["a", "b"] {
        let request = CreateVolume::named("local", name, 16 * MIB as i64).expect("request");
        let volume = core.create_volume(&request).await.expect("create");
        exports.push(core.attach(&volume.id, ExportKind::Fuse).await.expect("attach").endpoint);
    }
    let pid = env.daemon_pid();
    let exports: Vec<_> = exports.into_iter().map(|e| e.path).collect();
    // Whichever QEMU: its FUSE reads cannot block (QEMU 10.1 and later open /dev/fuse so).
    assert_eq!(fuse_descriptors_nonblocking(pid), (true, 2), "both exports' descriptors");
    let (first, second) = (exports[0].clone(), exports[1].clone());
    let held = core.daemon().features().fuse_reads_can_block;
    tokio::task::spawn_blocking(move || match held {
        true => lose_a_request(pid, &first),
        false => kill_a_reader(&first),
    })
    .await
    .expect("setup");
    assert!(
        answers(&core.daemon().qmp(), ANSWERS_WITHIN).await,
        "the daemon stopped answering after losing a FUSE request"
    );
    let data = pattern(7, MIB as usize);
    for export in [&exports[0], &second] {
        write_at(export, MIB, &data);
        assert_eq!(read_at(export, MIB, data.len()), data, "{}", export.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_by_a_lost_fuse_request_is_freed_when_the_plugin_starts_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::managed(dir.path().join("run"));
    let (daemon, _) = Daemon::connect(config.clone()).await.expect("start");
    let pid = daemon.pid().expect("pid");
    let image = dir.path().join("v.qcow2");
    let export = dir.path().join("v.img");
    let _cleanup = Cleanup(pid, vec![export.clone()]);
    if !daemon.features().fuse_reads_can_block {
        eprintln!("QEMU 10.1 and later read FUSE requests without blocking: nothing to free");
        return;
    }
    // An export the plugin never guarded: as an older plugin left it, or one that lost its
    // request in the instant between being added and being guarded.
    assert!(qemu_img(&["create", "-f", "qcow2", &image.display().to_string(), "16M"])
        .status
        .success());
    std::fs::File::create(&export).expect("mountpoint");
    let qmp = daemon.qmp();
    let file = json!({ "driver": "file", "filename": image });
    qmp.execute("blockdev-add", json!({ "driver": "qcow2", "node-name": "v", "file": file }))
        .await
        .expect("blockdev-add");
    let fuse = json!({ "type": "fuse", "id": "v", "node-name": "v", "mountpoint": export, "writable": true });
    qmp.execute("block-export-add", fuse).await.expect("block-export-add");
    assert_eq!(fuse_descriptors_nonblocking(pid), (false, 1), "an unguarded export");
    let held = export.clone();
    tokio::task::spawn_blocking(move || lose_a_request(pid, &held)).await.expect("setup");
    assert!(!answers(&qmp, Duration::from_secs(3)).await, "the setup did not stop the daemon");
    drop((qmp, daemon)); // the plugin is killed (its connection closed) and started again

    let started = Instant::now();
    let (adopted, origin) = Daemon::connect(config).await.expect("the stopped daemon is adopted");
    eprintln!("adopted in {:?}", started.elapsed());
    assert_eq!((origin, adopted.pid()), (Origin::Adopted, Some(pid)));
    assert!(answers(&adopted.qmp(), ANSWERS_WITHIN).await);
    let data = pattern(3, MIB as usize);
    write_at(&export, 0, &data);
    assert_eq!(read_at(&export, 0, data.len()), data);
    assert_eq!(fuse_descriptors_nonblocking(pid), (true, 1), "guarded once adopted");
}
