//! The node plugin's error type.
//!
//! Every variant says in our words what failed; the underlying cause, when there is one, travels
//! as `#[source]` and is never repeated in the message. [`Error::kind`] is the one place that
//! classifies errors for callers (the CSI layer maps each [`ErrorKind`] to a gRPC code).

use std::path::PathBuf;

use crate::qmp::QmpError;

/// Result alias for the node plugin.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a caller should treat an error; one-to-one with the gRPC codes the CSI layer returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is malformed (bad ID, name or size).
    InvalidArgument,
    /// The named volume, snapshot or pool does not exist.
    NotFound,
    /// An object of that name exists with different properties.
    AlreadyExists,
    /// A size is outside what the driver supports.
    OutOfRange,
    /// Another operation on the same volume is running; retry later.
    Aborted,
    /// The object is in a state that forbids the operation (e.g. delete while attached).
    FailedPrecondition,
    /// The pool or the chain cannot take more.
    ResourceExhausted,
    /// The daemon is not reachable right now; retry later.
    Unavailable,
    /// Anything else: a bug, an I/O failure, an unexpected daemon reply.
    Internal,
}

/// Errors of the node plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field failed validation.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Which field was wrong.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An object ID that does not parse: it names nothing this node holds (NOT_FOUND).
    #[error("invalid {}: {reason}", kind.noun())]
    MalformedId {
        /// What kind of ID was expected.
        kind: qsd_csi_model::id::IdKind,
        /// Why it does not parse.
        reason: String,
    },
    /// No such object.
    #[error("{what} {id} not found")]
    NotFound {
        /// "volume", "snapshot", "pool", ...
        what: &'static str,
        /// The identifier that was looked up.
        id: String,
    },
    /// An object with this name exists and differs from the request.
    #[error("{what} {name} already exists with different properties: {difference}")]
    AlreadyExists {
        /// "volume" or "snapshot".
        what: &'static str,
        /// The clashing name.
        name: String,
        /// What differs.
        difference: String,
    },
    /// A size outside the supported range.
    #[error("size {requested} out of range: {reason}")]
    OutOfRange {
        /// The requested size in bytes.
        requested: i64,
        /// Why it is out of range.
        reason: String,
    },
    /// A concurrent operation holds the volume.
    #[error("an operation on {id} is already in progress")]
    Busy {
        /// The volume or snapshot being operated on.
        id: String,
    },
    /// The object's state forbids the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Capacity or chain-depth limit reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A QMP command failed or the daemon went away.
    #[error("qemu-storage-daemon command {command} failed")]
    Qmp {
        /// The QMP command name.
        command: &'static str,
        /// What the daemon said, or why no answer came.
        #[source]
        source: QmpError,
    },
    /// A block job ended with an error.
    #[error("block job {job} ({kind}) failed: {message}")]
    Job {
        /// The job id.
        job: String,
        /// The job type (create, backup, stream, commit).
        kind: String,
        /// The daemon's error text for the job.
        message: String,
    },
    /// Starting or adopting the daemon failed.
    #[error("qemu-storage-daemon could not be started: {reason}")]
    DaemonStart {
        /// What went wrong.
        reason: String,
        /// The underlying I/O error, if any.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A filesystem operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What we were doing ("write metadata", "remove layer", ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A metadata file could not be parsed.
    #[error("corrupt metadata in {}", path.display())]
    Metadata {
        /// The file that failed to parse.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// An external command failed.
    #[error("command {program} failed: {stderr}")]
    Command {
        /// The program that was run.
        program: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// An external command could not be started at all.
    #[error("command {program} could not be run")]
    Spawn {
        /// The program.
        program: String,
        /// Why (not installed, not executable, ...).
        #[source]
        source: std::io::Error,
    },
    /// The daemon's state contradicts ours in a way we cannot repair.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// A gRPC transport (a socket, a server, a connection) failed.
    #[error("gRPC transport")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A certificate or key is unusable, or obtaining one failed.
    #[error("{what}")]
    Tls {
        /// What was being done, and with which certificate.
        what: String,
        /// The cause, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl From<qsd_csi_model::Error> for Error {
    fn from(e: qsd_csi_model::Error) -> Self {
        match e {
            qsd_csi_model::Error::InvalidArgument { field, reason } => {
                Error::InvalidArgument { field, reason }
            }
            qsd_csi_model::Error::MalformedId { kind, reason } => {
                Error::MalformedId { kind, reason }
            }
            qsd_csi_model::Error::OutOfRange { requested, reason } => {
                Error::OutOfRange { requested, reason }
            }
        }
    }
}

impl From<qsd_csi_proto::tls::TlsError> for Error {
    fn from(e: qsd_csi_proto::tls::TlsError) -> Self {
        Error::Tls { what: "mutual TLS".into(), source: Some(Box::new(e)) }
    }
}

impl From<qsd_csi_proto::transport::TransportError> for Error {
    fn from(e: qsd_csi_proto::transport::TransportError) -> Self {
        Error::Transport(Box::new(e))
    }
}

impl Error {
    /// The message followed by each cause in turn, `: `-separated (for statuses and events,
    /// where the chain has to travel as one string).
    pub fn with_causes(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }

    /// Classifies the error for callers. Exhaustive on purpose: a new variant must pick a kind.
    pub fn kind(&self) -> ErrorKind {
        if self.is_no_space() {
            return ErrorKind::ResourceExhausted;
        }
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::NotFound { .. } | Error::MalformedId { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Busy { .. } => ErrorKind::Aborted,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            Error::Qmp { source, .. } => match source {
                QmpError::Disconnected | QmpError::Connect { .. } => ErrorKind::Unavailable,
                QmpError::Command { .. } | QmpError::Protocol(_) | QmpError::Decode { .. } => {
                    ErrorKind::Internal
                }
            },
            Error::DaemonStart { .. } | Error::Transport(_) | Error::Tls { .. } => {
                ErrorKind::Unavailable
            }
            Error::Job { .. }
            | Error::Io { .. }
            | Error::Metadata { .. }
            | Error::Command { .. }
            | Error::Spawn { .. }
            | Error::Inconsistent(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }

    /// Shorthand for [`Error::Tls`] with a cause.
    pub fn tls(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Tls { what: what.into(), source: Some(source.into()) }
    }

    /// True when the pool's filesystem is full (ENOSPC), however it reached us: our own I/O,
    /// a daemon command, a block job, or a helper's stderr. A full pool is a resource
    /// exhausted, not an internal error.
    pub fn is_no_space(&self) -> bool {
        const TEXT: &str = "No space left on device";
        match self {
            Error::Io { source, .. } | Error::Spawn { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            Error::Job { message, .. } => message.contains(TEXT),
            Error::Command { stderr, .. } => stderr.contains(TEXT),
            Error::Qmp { source: QmpError::Command { desc, .. }, .. } => desc.contains(TEXT),
            _ => false,
        }
    }

    /// True when the error is a QMP command error whose description contains `needle`.
    pub fn qmp_desc_contains(&self, needle: &str) -> bool {
        matches!(self, Error::Qmp { source: QmpError::Command { desc, .. }, .. } if desc.contains(needle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_kind_its_callers_expect() {
        let io = || std::io::Error::from(std::io::ErrorKind::Other);
        let table: Vec<(Error, ErrorKind)> = vec![
            (Error::invalid("name", "x"), ErrorKind::InvalidArgument),
            (Error::NotFound { what: "volume", id: "x".into() }, ErrorKind::NotFound),
            (
                Error::AlreadyExists { what: "volume", name: "x".into(), difference: "y".into() },
                ErrorKind::AlreadyExists,
            ),
            (Error::OutOfRange { requested: 0, reason: "x".into() }, ErrorKind::OutOfRange),
            (Error::Busy { id: "x".into() }, ErrorKind::Aborted),
            (Error::FailedPrecondition("x".into()), ErrorKind::FailedPrecondition),
            (Error::ResourceExhausted("x".into()), ErrorKind::ResourceExhausted),
            (Error::Qmp { command: "x", source: QmpError::Disconnected }, ErrorKind::Unavailable),
            (
                Error::Qmp {
                    command: "x",
                    source: QmpError::Command { class: "GenericError".into(), desc: "d".into() },
                },
                ErrorKind::Internal,
            ),
            (
                Error::Job { job: "j".into(), kind: "backup".into(), message: "m".into() },
                ErrorKind::Internal,
            ),
            (Error::DaemonStart { reason: "x".into(), source: None }, ErrorKind::Unavailable),
            (Error::io("read", "/x", io()), ErrorKind::Internal),
            (Error::Command { program: "p".into(), stderr: "e".into() }, ErrorKind::Internal),
            (Error::Spawn { program: "p".into(), source: io() }, ErrorKind::Internal),
            (Error::Inconsistent("x".into()), ErrorKind::Internal),
            (
                Error::from(
                    qsd_csi_model::id::ObjectId::parse(qsd_csi_model::id::IdKind::Volume, "v")
                        .expect_err("malformed"),
                ),
                ErrorKind::NotFound,
            ),
            (Error::Transport(io().into()), ErrorKind::Unavailable),
            (Error::tls("x", io()), ErrorKind::Unavailable),
        ];
        for (error, kind) in table {
            assert_eq!(error.kind(), kind, "{error}");
        }
    }

    #[test]
    fn a_full_pool_is_resource_exhausted_however_the_enospc_reached_us() {
        let enospc = "No space left on device";
        let table: Vec<Error> = vec![
            Error::io("write metadata", "/p/v.json", std::io::Error::from_raw_os_error(28)),
            Error::Job {
                job: "clone-x".into(),
                kind: "backup".into(),
                message: format!("Could not write to target: {enospc}"),
            },
            Error::Qmp {
                command: "block_resize",
                source: QmpError::Command { class: "GenericError".into(), desc: enospc.into() },
            },
            Error::Command { program: "mkfs.ext4".into(), stderr: format!("write: {enospc}") },
        ];
        for e in table {
            assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{}", e.with_causes());
        }
        let other = Error::io("read", "/x", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(other.kind(), ErrorKind::Internal, "only ENOSPC");
    }

    #[test]
    fn display_names_the_failure_without_repeating_the_cause() {
        let e = Error::io("write metadata", "/p/v.json", std::io::Error::from_raw_os_error(28));
        assert_eq!(e.to_string(), "write metadata /p/v.json");
        let src = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
        assert!(src.contains("No space left"), "{src}");
    }
}
