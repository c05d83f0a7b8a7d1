//! The QMP client and the daemon supervisor against a real qemu-storage-daemon.

mod common;

use std::time::Duration;

use qsd_node::qmp::commands::{BlockdevDel, QueryBlockExports, QueryVersion};
use qsd_node::qmp::{QmpClient, QmpError};
use qsd_node::qsd::{Daemon, DaemonConfig, Origin};

fn kill(pid: u32) {
    let ok = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(ok.is_ok_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_daemon_starts_detached_and_is_adopted_after_our_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, origin) =
        Daemon::connect(DaemonConfig::managed(dir.path().join("run"))).await.expect("start");
    assert_eq!(origin, Origin::Started);
    let pid = daemon.pid().expect("pid");
    let version = daemon.version();
    assert!(version.at_least(7, 2), "{version:?}");
    assert_eq!(daemon.features().loop_direct_io_over_fuse, version.at_least(10, 1));
    drop(daemon); // our process "restarts": the daemon must live on
    let (adopted, origin) =
        Daemon::connect(DaemonConfig::managed(dir.path().join("run"))).await.expect("adopt");
    assert_eq!((origin, adopted.pid()), (Origin::Adopted, Some(pid)));
    // The operators' monitor answers independently of ours.
    let operator =
        QmpClient::connect(&adopted.config().operator_socket()).await.expect("operator monitor");
    assert_eq!(operator.call(&QueryVersion {}).await.expect("version").qemu, version.qemu);
    let mode = std::fs::metadata(dir.path().join("run"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o700), "sockets live in a root-only directory");
    kill(pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_errors_carry_class_and_description_and_a_dead_daemon_fails_pending_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _) =
        Daemon::connect(DaemonConfig::managed(dir.path().join("run"))).await.expect("start");
    let qmp = daemon.qmp();
    let err = qmp
        .call(&BlockdevDel { node_name: "no-such-node".into() })
        .await
        .expect_err("unknown node");
    match err {
        QmpError::Command { class, desc } => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    let mut events = qmp.subscribe();
    kill(daemon.pid().expect("pid"));
    tokio::time::timeout(Duration::from_secs(30), qmp.closed()).await.expect("closed is noticed");
    assert!(events.recv().await.is_none(), "subscriptions end with the connection");
    let err = qmp.call(&QueryBlockExports {}).await.expect_err("no daemon");
    assert!(matches!(err, QmpError::Disconnected), "{err:?}");
    // Reconnecting starts a fresh daemon.
    assert_eq!(daemon.reconnect().await.expect("reconnect"), Origin::Started);
    assert!(daemon.qmp().call(&QueryBlockExports {}).await.expect("new daemon answers").is_empty());
    kill(daemon.pid().expect("pid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_cannot_start_reports_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = DaemonConfig::managed(dir.path().join("run"));
    config.binary = "/nonexistent/qemu-storage-daemon".into();
    let err = Daemon::connect(config).await.expect_err("no binary");
    assert_eq!(err.kind(), qsd_node::ErrorKind::Unavailable);
    let err =
        Daemon::connect(DaemonConfig::managed(dir.path().join("a,b"))).await.expect_err("comma");
    assert_eq!(err.kind(), qsd_node::ErrorKind::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs CAP_SYS_RESOURCE, which this CI sandbox withholds (privileged node pods have it)"]
async fn the_daemon_runs_as_an_io_flusher_the_oom_killer_leaves_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _) =
        Daemon::connect(DaemonConfig::managed(dir.path().join("run"))).await.expect("start");
    let pid = daemon.pid().expect("pid");
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("oom_score_adj");
    assert_eq!(adj.trim(), "-1000");
    // Field 9 of /proc/<pid>/stat holds the task flags; PF_MEMALLOC_NOIO is 0x80000.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = stat.rsplit(')').next().expect("stat fields");
    let flags: u64 =
        after_comm.split_whitespace().nth(6).and_then(|f| f.parse().ok()).expect("flags");
    assert_ne!(flags & 0x80000, 0, "PR_SET_IO_FLUSHER set");
    kill(pid);
}

/// What a daemon killed a moment ago looks like: its pidfile names a live process called
/// qemu-storage-daemon, whose monitor socket refuses connections. A real daemon is only in that
/// state for the instant it takes to exit, which a test cannot catch reliably, so a stand-in (a
/// shell named qemu-storage-daemon, waiting in its `read` builtin) holds it for `seconds`.
fn dying_daemon(config: &DaemonConfig, seconds: u32) -> std::process::Child {
    use std::io::BufRead;
    use std::os::unix::{fs::DirBuilderExt, process::CommandExt};
    use std::process::Stdio;
    std::fs::DirBuilder::new().mode(0o700).create(&config.run_dir).expect("run dir");
    drop(std::os::unix::net::UnixListener::bind(config.qmp_socket()).expect("bind"));
    // spawn() returns a moment before the kernel sets the child's new command line (empty until
    // then, as a zombie's is); the shell's first line says it runs, its name in place.
    let mut child = std::process::Command::new("bash")
        .arg0("qemu-storage-daemon")
        .args(["-c", &format!("echo running; read -rt {seconds}; :")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bash");
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("stdout");
    std::io::BufReader::new(stdout).read_line(&mut line).expect("the stand-in's first line");
    assert_eq!(line, "running\n");
    std::fs::write(config.pidfile(), format!("{}\n", child.id())).expect("pidfile");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_still_exiting_when_the_plugin_starts_is_replaced_once_it_has_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::managed(dir.path().join("run"));
    let mut dying = dying_daemon(&config, 2);
    let (daemon, origin) = Daemon::connect(config).await.expect("starts after the old one");
    assert_eq!(origin, Origin::Started);
    assert!(dying.try_wait().expect("wait").is_some(), "started only once the old one had gone");
    assert_ne!(daemon.pid(), Some(dying.id()));
    assert!(daemon.qmp().call(&QueryBlockExports {}).await.expect("answers").is_empty());
    kill(daemon.pid().expect("pid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_daemon_whose_monitor_is_closed_is_reported_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = DaemonConfig::managed(dir.path().join("run"));
    let mut wedged = dying_daemon(&config, 3600);
    let err = Daemon::connect(config.clone()).await.expect_err("two daemons on one pool");
    assert!(err.to_string().contains("monitor does not answer"), "{err}");
    assert!(wedged.try_wait().expect("wait").is_none(), "left alone");
    let _ = wedged.kill();
    let _ = wedged.wait();
}
