//! Fault points: named places in multi-step operations where a crash test has this process
//! killed, for real (SIGKILL: no destructor, no flush, no cleanup), to prove that the next start
//! completes or undoes whatever was in flight.
//!
//! ```text
//!   QSD_CSI_FAULT_POINTS="snapshot:after-switch"  qsd-csi standalone …
//!   → the first time an operation reaches fail::fail_point!("snapshot:after-switch"),
//!     the process raises SIGKILL
//! ```
//! The points are the `fail` crate's: unarmed (the variable unset, as in production) each
//! costs a read lock and a lookup in an empty map. [`POINTS`] lists every one, so a test can
//! walk them all and a typo in a test is an error, not a point that never fires.

use nix::sys::signal::{raise, Signal};

/// The environment variable naming the points to arm, separated by commas.
pub const ENV: &str = "QSD_CSI_FAULT_POINTS";

/// Every fault point, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    "snapshot:after-intent",
    "snapshot:after-overlay-image",
    "snapshot:after-overlay-node",
    "snapshot:after-head-record",
    "snapshot:after-switch",
    "snapshot:after-snapshot-record",
    "create:after-image",
    "create:after-layer-record",
    "clone:after-target-image",
    "clone:after-job-start",
    "clone:after-copy",
    "expand:after-resize",
    "shorten:after-merge",
    "stage:after-attach",
    "stage:after-device",
    "stage:after-format-start",
    "stage:after-format",
    "stage:after-mount",
    "unstage:after-record",
    "undo-stage:after-devices",
];

/// Arms the points named in [`ENV`]: reaching one kills this process with SIGKILL. Unknown
/// names are reported and ignored. Idempotent.
pub fn arm_from_env() {
    let Ok(names) = std::env::var(ENV) else { return };
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !POINTS.contains(&name) {
            tracing::error!(point = name, "no such fault point; ignored");
            continue;
        }
        tracing::warn!(point = name, "fault point armed: this process kills itself there");
        let armed = fail::cfg_callback(name, || {
            let _ = raise(Signal::SIGKILL);
        });
        if let Err(e) = armed {
            tracing::error!(point = name, error = e, "arming a fault point failed");
        }
    }
}

/// Kills the process here if the point `name` is armed.
#[macro_export]
macro_rules! fault_point {
    ($name:literal) => {
        fail::fail_point!($name)
    };
}
