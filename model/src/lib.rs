//! The vocabulary qsd-csi's controller and node plugin share.
//!
//! ```text
//!   controller ──┐                        ┌── node plugin (engine, CSI Node, agent)
//!                ├── qsd-csi-model (this) ┤
//!   proto ───────┘   IDs, sizes, options, └── proto: agent.proto ⇄ these types
//!                    parameter parsers
//! ```
//! Everything here is pure: no I/O, no async runtime, no QMP. What a request means is decided
//! once, here, whichever side reads it: the controller validates a StorageClass parameter with
//! the same parser the node uses at stage time, and both name objects with the same IDs.
//! Errors are [`Error`]: a request that is malformed ([`Error::InvalidArgument`]) or asks for a
//! size outside what the driver supports ([`Error::OutOfRange`]).

pub mod grow;
pub mod health;
pub mod id;
pub mod params;
pub mod volume;

/// Why a request is refused before anything is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A field failed validation.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Which field was wrong.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An object ID that does not parse: it names nothing this driver holds (CSI's NOT_FOUND
    /// for an unknown ID, decided by this variant, not by the text).
    #[error("invalid {}: {reason}", kind.noun())]
    MalformedId {
        /// What kind of ID was expected.
        kind: id::IdKind,
        /// Why it does not parse.
        reason: String,
    },
    /// A size outside the supported range.
    #[error("size {requested} out of range: {reason}")]
    OutOfRange {
        /// The requested size in bytes.
        requested: i64,
        /// Why it is out of range.
        reason: String,
    },
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
