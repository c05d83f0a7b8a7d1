//! Every failed call logged once, and every call timed ([`crate::metrics`]), where it is
//! answered: a tower service around each gRPC service of a server.
//!
//! ```text
//!   request ─► read the method (path) and the object it names (decoded request) ─► service
//!   response with a non-OK grpc-status ─► one log line: method, object, code, message
//! ```
//! The message of our statuses is the whole cause chain (`Error::with_causes`), so the line
//! says why. Codes the caller causes or expects (a bad argument, a missing object, a busy one)
//! are warnings; the driver's own failures (internal, unavailable, a full pool) are errors.
//! Only statuses sent without a body (trailers-only, what tonic sends for a unary or
//! streaming call that fails before its first message) are read; a stream that fails
//! midway is logged by its handler.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use prost::Message;
use tonic::body::Body;
use tonic::Code;

/// Logs each call that fails (see the module documentation).
#[derive(Debug, Clone)]
pub struct FailureLog<S> {
    inner: S,
}

/// Wraps one gRPC service (`add_service(failures::logged(NodeServer::new(…)))`).
pub fn logged<S>(service: S) -> FailureLog<S> {
    FailureLog { inner: service }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for FailureLog<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for FailureLog<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is ready only after poll_ready: call the one that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let method = request.uri().path().to_owned();
            let (parts, body) = request.into_parts();
            // Requests are small (one message); read it to name the object, then pass it on.
            let bytes = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let status =
                        tonic::Status::invalid_argument(format!("reading the request: {e}"));
                    log_failure(&method, None, &status);
                    return Ok(status.into_http());
                }
            };
            let object = object_of(&method, &bytes);
            let body = Body::new(http_body_util::Full::new(bytes));
            let response = inner.call(http::Request::from_parts(parts, body)).await?;
            let status = tonic::Status::from_header_map(response.headers());
            if let Some(status) = &status {
                log_failure(&method, object.as_deref(), status);
            }
            let code = status.map_or(Code::Ok, |s| s.code());
            crate::metrics::observe_call(&method, code, started.elapsed());
            Ok(response)
        })
    }
}

/// Whether a code is the driver's failure (logged as an error) rather than the caller's.
pub fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Internal
            | Code::Unknown
            | Code::Unavailable
            | Code::DataLoss
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
    )
}

fn log_failure(method: &str, object: Option<&str>, status: &tonic::Status) {
    let code = status.code();
    if code == Code::Ok {
        return;
    }
    let object = object.unwrap_or("");
    let cause = status.message();
    if is_server_fault(code) {
        tracing::error!(method, object, ?code, cause, "call failed");
    } else {
        tracing::warn!(method, object, ?code, cause, "call failed");
    }
}

/// The object a CSI request names (volume, snapshot, group, or a new one's name), from the
/// request's one gRPC frame; `None` for calls about no single object or that do not decode.
pub fn object_of(method: &str, frame: &[u8]) -> Option<String> {
    use crate::csi;
    // A gRPC frame: a compression flag, a 4-byte length, the message.
    let message = frame.get(5..)?;
    fn decode<M: Message + Default>(bytes: &[u8]) -> Option<M> {
        M::decode(bytes).ok()
    }
    let name = method.rsplit('/').next()?;
    let object = match name {
        "CreateVolume" => decode::<csi::CreateVolumeRequest>(message)?.name,
        "DeleteVolume" => decode::<csi::DeleteVolumeRequest>(message)?.volume_id,
        "ControllerPublishVolume" => {
            decode::<csi::ControllerPublishVolumeRequest>(message)?.volume_id
        }
        "ControllerUnpublishVolume" => {
            decode::<csi::ControllerUnpublishVolumeRequest>(message)?.volume_id
        }
        "ValidateVolumeCapabilities" => {
            decode::<csi::ValidateVolumeCapabilitiesRequest>(message)?.volume_id
        }
        "ControllerGetVolume" => decode::<csi::ControllerGetVolumeRequest>(message)?.volume_id,
        "ControllerModifyVolume" => {
            decode::<csi::ControllerModifyVolumeRequest>(message)?.volume_id
        }
        "ControllerExpandVolume" => {
            decode::<csi::ControllerExpandVolumeRequest>(message)?.volume_id
        }
        "ControllerGetVolumeHealth" => {
            decode::<csi::ControllerGetVolumeHealthRequest>(message)?.volume_id
        }
        "CreateSnapshot" => {
            let r = decode::<csi::CreateSnapshotRequest>(message)?;
            format!("{} (snapshot {})", r.source_volume_id, r.name)
        }
        "DeleteSnapshot" => decode::<csi::DeleteSnapshotRequest>(message)?.snapshot_id,
        "GetSnapshot" => decode::<csi::GetSnapshotRequest>(message)?.snapshot_id,
        "NodeStageVolume" => decode::<csi::NodeStageVolumeRequest>(message)?.volume_id,
        "NodeUnstageVolume" => decode::<csi::NodeUnstageVolumeRequest>(message)?.volume_id,
        "NodePublishVolume" => decode::<csi::NodePublishVolumeRequest>(message)?.volume_id,
        "NodeUnpublishVolume" => decode::<csi::NodeUnpublishVolumeRequest>(message)?.volume_id,
        "NodeGetVolumeStats" => decode::<csi::NodeGetVolumeStatsRequest>(message)?.volume_id,
        "NodeExpandVolume" => decode::<csi::NodeExpandVolumeRequest>(message)?.volume_id,
        "NodeGetVolumeHealth" => decode::<csi::NodeGetVolumeHealthRequest>(message)?.volume_id,
        "CreateVolumeGroupSnapshot" => {
            decode::<csi::CreateVolumeGroupSnapshotRequest>(message)?.name
        }
        "DeleteVolumeGroupSnapshot" => {
            decode::<csi::DeleteVolumeGroupSnapshotRequest>(message)?.group_snapshot_id
        }
        "GetVolumeGroupSnapshot" => {
            decode::<csi::GetVolumeGroupSnapshotRequest>(message)?.group_snapshot_id
        }
        "GetMetadataAllocated" => decode::<csi::GetMetadataAllocatedRequest>(message)?.snapshot_id,
        "GetMetadataDelta" => {
            let r = decode::<csi::GetMetadataDeltaRequest>(message)?;
            format!("{} (since {})", r.target_snapshot_id, r.base_snapshot_id)
        }
        _ => return None,
    };
    Some(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi;

    fn frame(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend(body);
        frame
    }

    #[test]
    fn the_object_of_a_call_is_read_from_its_request() {
        let stage =
            csi::NodeStageVolumeRequest { volume_id: "vol:p@n:v".into(), ..Default::default() };
        assert_eq!(
            object_of("/csi.v1.Node/NodeStageVolume", &frame(&stage)).as_deref(),
            Some("vol:p@n:v")
        );
        let snap = csi::CreateSnapshotRequest {
            source_volume_id: "vol:p@n:v".into(),
            name: "s1".into(),
            ..Default::default()
        };
        assert_eq!(
            object_of("/csi.v1.Controller/CreateSnapshot", &frame(&snap)).as_deref(),
            Some("vol:p@n:v (snapshot s1)")
        );
        assert_eq!(object_of("/csi.v1.Identity/Probe", &frame(&csi::ProbeRequest {})), None);
        assert_eq!(object_of("/csi.v1.Node/NodeStageVolume", b"\0\0\0\0\x09garbage!!"), None);
        assert_eq!(object_of("/csi.v1.Node/NodeStageVolume", b"\0"), None);
    }

    #[tokio::test]
    async fn a_failed_call_passes_through_unchanged_with_its_request_intact() {
        use tower::{Service, ServiceExt};
        let request =
            csi::DeleteVolumeRequest { volume_id: "vol:p@n:gone".into(), ..Default::default() };
        let sent = frame(&request);
        let echo = tower::service_fn(|req: http::Request<Body>| async move {
            let bytes = req.into_body().collect().await.expect("body").to_bytes();
            let status = tonic::Status::not_found(format!("{} bytes", bytes.len()));
            Ok::<_, Infallible>(status.into_http())
        });
        let mut service = logged(echo);
        let req = http::Request::builder()
            .uri("/csi.v1.Controller/DeleteVolume")
            .body(Body::new(http_body_util::Full::new(bytes::Bytes::from(sent.clone()))))
            .expect("request");
        let response = service.ready().await.expect("ready").call(req).await.expect("answered");
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            status.message(),
            format!("{} bytes", sent.len()),
            "the body reached the service whole"
        );
        assert!(!is_server_fault(Code::NotFound) && is_server_fault(Code::ResourceExhausted));
    }
}
