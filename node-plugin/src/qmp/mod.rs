//! An asynchronous QMP client for qemu-storage-daemon.
//!
//! ```text
//!   callers ──call(cmd)──► writer ──json line──► daemon
//!      ▲                                            │
//!      │ oneshot by id   ┌──────── reader task ◄────┘  (one per connection)
//!      └─────────────────┤  {"return"|"error", "id"} → the waiting caller
//!                        └  {"event"} → every subscriber's unbounded queue
//! ```
//!
//! A monitor serves one client at a time and does not buffer events, so the node plugin keeps one
//! persistent connection and gives operators a second monitor. Subscribers receive every event
//! that arrives after they subscribed, in order; subscribe *before* issuing a command whose
//! events you need (the job helper does). When the daemon goes away, pending calls fail with
//! [`QmpError::Disconnected`] and every subscription ends.

pub mod block_graph;
mod client;
pub mod commands;
mod job;

pub use client::{Event, QmpClient};
pub use job::{progress as job_progress, settle_jobs, Job, JobOptions};

/// Errors of the QMP connection.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The connection ended before the reply arrived.
    #[error("the daemon closed the QMP connection")]
    Disconnected,
    /// The daemon answered with an error.
    #[error("{class}: {desc}")]
    Command {
        /// QMP error class (GenericError, DeviceNotFound, ...).
        class: String,
        /// The daemon's description.
        desc: String,
    },
    /// The daemon sent something that is not QMP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A reply did not match the type we expected.
    #[error("unexpected reply shape")]
    Decode {
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}
