//! The qsd-csi controller: CSI Identity and Controller services.
//!
//! ```text
//!   CSI request ─► params (validate, map names, sizes) ─► agents (in-process or mTLS) ─► QMP
//! ```
//! Requests are parsed into the shared model's typed requests before any side effect
//! (`params`, over `qsd-csi-model`); the controller's own refusals are [`ControllerError`]s
//! with one mapping to gRPC codes, and the agents' statuses pass through. The controller never
//! opens an image itself and does not link the engine: it asks node agents ([`agents`]) over
//! `agent.proto` — in standalone mode an agent the composition hands it in-process.
//! In a cluster it also talks to Kubernetes: [`discovery`] finds the agents, [`events`] tells
//! claims about their volumes, [`lease`] elects the replica that [`relay`]s node events and
//! [`signer`] signs the node agents' certificates; the leader also moves volumes that
//! [`follow`] their pods off cordoned nodes.

pub mod agents;
pub mod controller;
pub mod discovery;
pub mod error;
pub mod events;
pub mod follow;
pub mod groups;
pub mod grow;
pub mod identity;
pub mod lease;
pub mod metadata;
pub mod moves;
pub mod params;
pub mod relay;
pub mod run;
pub mod serve;
pub mod shapes;
pub mod signer;

pub use controller::ControllerService;
pub use error::ControllerError;
pub use identity::{IdentityService, Probe, PLUGIN_NAME};
