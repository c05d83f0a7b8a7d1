//! The controller's errors, and the one place they become gRPC codes.
//!
//! A node agent answers with statuses that already carry the right code (the node plugin
//! maps its own errors); those pass through unchanged. Everything the controller decides
//! itself is a [`ControllerError`], whose [`ControllerError::code`] is exhaustive: a new
//! variant must choose its code, and the table test below holds every variant to it.

use tonic::{Code, Status};

/// Why the controller refuses or fails a request.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A required field is empty.
    #[error("{0} is required")]
    Required(&'static str),
    /// A parameter, name, ID or size failed the shared model's checks.
    #[error(transparent)]
    Model(#[from] qsd_csi_model::Error),
    /// The request asks for something the driver does not do (a parameter, a capability).
    #[error("{0}")]
    Unsupported(String),
    /// No size fits the capacity range.
    #[error("{0}")]
    OutOfRange(String),
    /// A paging token that this controller did not hand out.
    #[error("starting_token {0:?} is not valid")]
    BadToken(String),
    /// No node satisfies the requisite topology.
    #[error("no requisite topology includes node {0}")]
    Unplaceable(String),
    /// Volumes that cannot be snapshotted at one instant together.
    #[error("{0}")]
    Ungroupable(String),
    /// No node agent is known (discovery has found none yet).
    #[error("no node agent is known yet")]
    NoAgents,
    /// The node exists but its node plugin is not running now: retry.
    #[error("node {0:?} has no running node agent now (its node plugin pod is not ready); retry")]
    AgentDown(String),
    /// A node this controller neither knows nor the cluster has.
    #[error("node {0:?} is not one this controller serves")]
    UnknownNode(String),
    /// An object is attached on a node whose agent is not known.
    #[error("{id} is held on node {node:?}, which has no known agent")]
    HolderUnknown {
        /// The volume or snapshot.
        id: String,
        /// Where it is held.
        node: String,
    },
    /// The call reached no agent (a refused handshake, a connection closed under it).
    #[error("node agent unreachable")]
    Unreachable(#[source] Status),
    /// A method this driver does not offer (its capability is not advertised).
    #[error("{0}")]
    Unimplemented(&'static str),
    /// An agent's answer breaks the contract.
    #[error("{0}")]
    Internal(String),
    /// A node agent's channel cannot be set up (certificate files, address).
    #[error("the channel to node {node:?}")]
    Channel {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: qsd_csi_proto::tls::TlsError,
    },
    /// The Kubernetes API failed.
    #[error("Kubernetes API: {what}")]
    Kubernetes {
        /// What was asked.
        what: &'static str,
        /// Its error.
        #[source]
        source: kube::Error,
    },
}

impl ControllerError {
    /// The gRPC code for this error. A malformed ID names nothing this driver holds: NOT_FOUND,
    /// as the CSI spec asks of unknown IDs.
    pub fn code(&self) -> Code {
        use ControllerError as E;
        match self {
            E::Required(_) | E::Unsupported(_) => Code::InvalidArgument,
            E::Ungroupable(_) => Code::FailedPrecondition,
            E::Model(qsd_csi_model::Error::MalformedId { .. }) => Code::NotFound,
            E::Model(qsd_csi_model::Error::InvalidArgument { .. }) => Code::InvalidArgument,
            E::Model(qsd_csi_model::Error::OutOfRange { .. }) | E::OutOfRange(_) => {
                Code::OutOfRange
            }
            E::BadToken(_) => Code::Aborted,
            E::Unplaceable(_) => Code::ResourceExhausted,
            E::NoAgents
            | E::AgentDown(_)
            | E::HolderUnknown { .. }
            | E::Unreachable(_)
            | E::Channel { .. }
            | E::Kubernetes { .. } => Code::Unavailable,
            E::UnknownNode(_) => Code::NotFound,
            E::Unimplemented(_) => Code::Unimplemented,
            E::Internal(_) => Code::Internal,
        }
    }

    /// The message followed by each cause in turn, `: `-separated.
    pub fn with_causes(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = match cause.downcast_ref::<Status>() {
                Some(status) => format!("{:?}: {}", status.code(), status.message()),
                None => cause.to_string(),
            };
            message.push_str(": ");
            message.push_str(&text);
            source = cause.source();
        }
        message
    }
}

impl From<ControllerError> for Status {
    fn from(e: ControllerError) -> Status {
        Status::new(e.code(), e.with_causes())
    }
}

/// A required request field.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, ControllerError> {
    if value.is_empty() {
        return Err(ControllerError::Required(field));
    }
    Ok(value)
}

/// What the API server said (its message alone), or the client's error.
pub fn said(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qsd_csi_model::id::{IdKind, ObjectId};

    #[test]
    fn every_variant_has_its_grpc_code() {
        use ControllerError as E;
        let malformed = ObjectId::parse(IdKind::Volume, "not-an-id").expect_err("malformed");
        let kube = kube::Error::LinesCodecMaxLineLengthExceeded;
        let tls = qsd_csi_proto::tls::TlsError::Read {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let table: Vec<(ControllerError, Code)> = vec![
            (E::Required("name"), Code::InvalidArgument),
            (E::Model(qsd_csi_model::Error::invalid("pool", "x")), Code::InvalidArgument),
            (E::Model(malformed), Code::NotFound),
            (
                E::Model(qsd_csi_model::Error::OutOfRange { requested: 1, reason: "x".into() }),
                Code::OutOfRange,
            ),
            (E::Unsupported("x".into()), Code::InvalidArgument),
            (E::OutOfRange("x".into()), Code::OutOfRange),
            (E::BadToken("7".into()), Code::Aborted),
            (E::Unplaceable("n".into()), Code::ResourceExhausted),
            (E::Ungroupable("n".into()), Code::FailedPrecondition),
            (E::NoAgents, Code::Unavailable),
            (E::AgentDown("n".into()), Code::Unavailable),
            (E::UnknownNode("n".into()), Code::NotFound),
            (E::HolderUnknown { id: "v".into(), node: "n".into() }, Code::Unavailable),
            (E::Unreachable(Status::unknown("h2 protocol error")), Code::Unavailable),
            (E::Unimplemented("x"), Code::Unimplemented),
            (E::Internal("x".into()), Code::Internal),
            (E::Channel { node: "n".into(), source: tls }, Code::Unavailable),
            (E::Kubernetes { what: "list pods", source: kube }, Code::Unavailable),
        ];
        for (error, code) in table {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{}", status.message());
        }
    }

    #[test]
    fn a_status_keeps_the_whole_cause_chain() {
        let e = ControllerError::Unreachable(Status::unknown("connection reset"));
        assert_eq!(Status::from(e).message(), "node agent unreachable: Unknown: connection reset");
        let tls = qsd_csi_proto::tls::TlsError::Read {
            path: "/etc/qsd/ca.crt".into(),
            source: std::io::Error::from_raw_os_error(2),
        };
        let e = ControllerError::Channel { node: "w1".into(), source: tls };
        let message = Status::from(e).message().to_owned();
        assert!(
            message.starts_with(
                "the channel to node \"w1\": read TLS file /etc/qsd/ca.crt: No such file"
            ),
            "{message}"
        );
    }
}
