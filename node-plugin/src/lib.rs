//! qsd-csi node plugin: the block-graph engine on qemu-storage-daemon.
//!
//! ```text
//!   engine ──► pool   (qcow2 layers + JSON records on disk: the source of truth)
//!     │
//!     └──────► graph  (QEMU nodes of each attached volume: file → qcow2 chain → throttle → export)
//!                 │
//!                 └──► qmp (one persistent connection) ──► qsd (the supervised daemon)
//! ```
//!
//! [`engine::Engine`] is the entry point: it owns the daemon connection, the pools and the
//! journal of attached volumes, and performs every volume operation in its online (attached)
//! or offline form.

pub mod agent;
pub mod claims;
pub mod command;
pub mod csi;
pub mod device;
pub mod engine;
pub mod error;
pub mod fault;
pub mod graph;
pub mod metrics;
pub mod mount;
pub mod pool;
pub mod qmp;
pub mod qsd;
mod sys;
pub mod tls;

pub use error::{Error, ErrorKind, Result};
pub use sys::has_cap_sys_resource;
