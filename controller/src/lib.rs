//! The qsd-csi controller: CSI Identity and Controller services.
//!
//! ```text
//!   CSI request ─► params (validate, map names, sizes) ─► agents (in-process or mTLS) ─► QMP
//! ```
//! Requests are parsed into typed engine commands before any side effect (`params`); engine
//! errors become gRPC statuses through the node plugin's single mapping. The controller never
//! opens an image itself: it asks node agents ([`agents`]), in-process in standalone mode.
//! In a cluster it also talks to Kubernetes: [`discovery`] finds the agents, [`events`] tells
//! claims about their volumes, [`lease`] elects the replica that [`relay`]s node events and
//! [`signer`] signs the node agents' certificates.

pub mod agents;
pub mod cli;
pub mod client;
pub mod controller;
pub mod discovery;
pub mod events;
pub mod identity;
pub mod lease;
pub mod params;
pub mod relay;
pub mod signer;

pub use controller::ControllerService;
pub use identity::{IdentityService, PLUGIN_NAME};
