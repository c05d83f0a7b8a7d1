//! The CSI Node service, and the one mapping from our errors to gRPC status codes.

mod decide;
mod freeze;
mod grown;
mod node;
mod recovery;
pub(crate) mod staging;

pub use node::{
    parse_threshold_percent, NodeConfig, NodeService, Seams, TOPOLOGY_KEY, WRITE_THRESHOLD_PERCENT,
};
pub use qsd_csi_proto::csi;

use crate::error::{Error, ErrorKind};

/// The gRPC code for each kind of error. Exhaustive: a new kind must choose its code.
pub fn code(kind: ErrorKind) -> tonic::Code {
    match kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::OutOfRange => tonic::Code::OutOfRange,
        ErrorKind::Aborted => tonic::Code::Aborted,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Internal => tonic::Code::Internal,
    }
}

/// Turns an error into a status whose message is the whole cause chain; its code is its kind's
/// (an ID that cannot be ours is of kind NOT_FOUND: it names nothing held here).
pub fn status(error: Error) -> tonic::Status {
    tonic::Status::new(code(error.kind()), error.with_causes())
}

/// A volume ID as the CO sent it, typed for the engine: one that does not parse names
/// nothing held here (NOT_FOUND). The staging journal and the claims keep the CO's text.
pub fn volume_id(id: &str) -> Result<crate::pool::id::ObjectId, Error> {
    let kind = crate::pool::id::IdKind::Volume;
    crate::pool::id::ObjectId::parse(kind, id).map_err(Error::from)
}

/// A required request field.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        return Err(tonic::Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_kind_has_the_grpc_code_the_spec_expects() {
        let table = [
            (ErrorKind::InvalidArgument, tonic::Code::InvalidArgument),
            (ErrorKind::NotFound, tonic::Code::NotFound),
            (ErrorKind::AlreadyExists, tonic::Code::AlreadyExists),
            (ErrorKind::OutOfRange, tonic::Code::OutOfRange),
            (ErrorKind::Aborted, tonic::Code::Aborted),
            (ErrorKind::FailedPrecondition, tonic::Code::FailedPrecondition),
            (ErrorKind::ResourceExhausted, tonic::Code::ResourceExhausted),
            (ErrorKind::Unavailable, tonic::Code::Unavailable),
            (ErrorKind::Internal, tonic::Code::Internal),
        ];
        for (kind, expected) in table {
            assert_eq!(code(kind), expected, "{kind:?}");
        }
    }

    #[test]
    fn an_id_that_cannot_be_ours_is_not_found_at_the_csi_boundary() {
        let e =
            crate::pool::id::ObjectId::parse(crate::pool::id::IdKind::Volume, "not-an-id").err();
        assert_eq!(e.map(|e| status(e.into()).code()), Some(tonic::Code::NotFound));
        assert_eq!(status(Error::invalid("size", "x")).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_status_message_carries_the_cause_chain() {
        let e = Error::io("write metadata", "/p/v.json", std::io::Error::from_raw_os_error(28));
        let s = status(e);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "a full pool");
        assert!(
            s.message().starts_with("write metadata /p/v.json: No space left"),
            "{}",
            s.message()
        );
    }
}
