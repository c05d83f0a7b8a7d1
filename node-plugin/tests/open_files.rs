//! The daemon's open-files limit: a test binary of its own, since it lowers this process's
//! soft limit first (as a host with the common default of 1,024 would start the plugin).

use qsd_node::qsd::{Daemon, DaemonConfig};

fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |f: &str| if f == "unlimited" { libc::RLIM_INFINITY } else { f.parse().expect(f) };
    (value(fields[3]), value(fields[4]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_may_open_as_many_files_as_the_hard_limit_allows() {
    let (_, hard) = open_files_limits("self");
    let soft = 1024.min(hard);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
        .expect("lower the soft limit");
    assert_eq!(open_files_limits("self"), (soft, hard));

    let dir = tempfile::tempdir().expect("tempdir");
    let (daemon, _) =
        Daemon::connect(DaemonConfig::managed(dir.path().join("run"))).await.expect("start");
    let pid = daemon.pid().expect("pid").to_string();
    assert_eq!(open_files_limits(&pid), (hard, hard), "a daemon holding 1,024 volumes needs more");
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
}
