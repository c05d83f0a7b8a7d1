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

/// Makes daemon `pid` lose a FUSE request on `export` after its main loop has seen it: returns
/// once the requester is dead and the daemon's read of it is let go.
fn lose_a_request(pid: u32, export: &Path) {
    let mut strace = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "-e", "trace=read"])
        .args(["-e", "inject=read:delay_enter=2000000", "-p", &pid.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (scripts/install-deps installs it)");
    let mut said = BufReader::new(strace.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("attached") {
        line.clear();
        assert!(said.read_line(&mut line).expect("strace's stderr") > 0, "strace ended");
    }
    let mut dd = Command::new("dd")
        .arg(format!("if={}", export.display()))
        .args(["of=/dev/null", "bs=4096", "count=1", "status=none"])
        .spawn()
        .expect("dd");
    let started = Instant::now();
    while fuse_reads::stuck_on(pid).is_none() {
        assert!(started.elapsed() < ANSWERS_WITHIN, "the daemon never read the request");
        std::thread::sleep(Duration::from_millis(5)); // poll /proc/PID/syscall
    }
    dd.kill().expect("SIGKILL dd");
    dd.wait().expect("reap dd");
    let _ = Command::new("kill").args(["-TERM", &strace.id().to_string()]).status();
    strace.wait().expect("strace lets go");
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
    let (first, second) = (exports[0].clone(), exports[1].clone());
    tokio::task::spawn_blocking(move || lose_a_request(pid, &first)).await.expect("setup");
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
    // An export the plugin never guarded: as an older plugin left it, or one that lost its
    // request in the instant between being added and being guarded.
    let image = dir.path().join("v.qcow2");
    let export = dir.path().join("v.img");
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
    let held = export.clone();
    tokio::task::spawn_blocking(move || lose_a_request(pid, &held)).await.expect("setup");
    if !daemon.features().fuse_reads_can_block {
        // QEMU 10.1 and later read FUSE requests without blocking: nothing to free.
        assert!(answers(&qmp, ANSWERS_WITHIN).await, "a QEMU ≥ 10.1 daemon stopped");
        let _ = Command::new("umount").arg("-l").arg(&export).status();
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        return;
    }
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
    let _ = Command::new("umount").arg("-l").arg(&export).status();
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}
