//! What the driver's benchmarks share: the standalone driver they measure.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// The built `qsd-csi standalone` with its state (and `extra` arguments, e.g. pools) under
/// `dir`, its log in `dir/driver.log`; returns it once its socket answers, with a channel to it.
pub async fn start_standalone(dir: &Path, extra: &[String]) -> (Child, Channel) {
    let socket = dir.join("csi.sock");
    let driver = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
        .arg("standalone")
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg("--node=bench")
        .args(extra)
        .stderr(std::fs::File::create(dir.join("driver.log")).expect("log"))
        .spawn()
        .expect("qsd-csi");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "driver did not start");
        std::thread::sleep(Duration::from_millis(20)); // poll_interval for the socket
    }
    let channel = qsd_csi::calls::connect(&socket).await.expect("connect");
    (driver, channel)
}

/// Stops the driver and the daemon it started (which outlives it by design).
pub fn stop_standalone(mut driver: Child, dir: &Path) {
    let _ = driver.kill();
    let _ = driver.wait();
    if let Ok(pid) = std::fs::read_to_string(dir.join("state/run/qsd.pid")) {
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    }
}
