//! `qsd-csi`, composed: where the controller (`qsd-csi-controller`) and the node plugin
//! (`qsd-csi-node`) meet. Neither depends on the other; both speak the contract
//! (`qsd-csi-proto` over `qsd-csi-model`).
//!
//! ```text
//!   qsd-csi (this) ──► qsd-csi-controller ──┐
//!        │                                  ├──► qsd-csi-proto ──► qsd-csi-model
//!        └──────────► qsd-csi-node ─────────┘
//! ```
//! [`modes`] has an entry point per serving mode; [`client`] runs the client commands;
//! [`args`] is the command line ([`engine_args`] its settings for the node library) and
//! [`output`] how results print.

pub mod args;
pub mod calls;
pub mod client;
pub mod engine_args;
pub mod grow;
pub mod modes;
pub mod output;
pub mod pool_check;
