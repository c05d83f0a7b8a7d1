//! Prometheus metrics common to every mode: the latency of each gRPC call by method and code
//! (recorded where every call is answered, [`crate::failures`]), and the `/metrics` endpoint a
//! mode serves with `--metrics-listen`.
//!
//! ```text
//!   scrape ─► GET /metrics ─► Registry::gather (on a blocking thread) ─► text format 0.0.4
//!             (families registered by the mode: gRPC here, the node's volumes and pools,
//!              the controller's expansions; collectors read cached values, never a lock a
//!              volume operation holds)
//! ```
//! The text format (not OpenMetrics) is served because it is what `promtool check metrics`
//! reads and what every Prometheus scrapes.

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};
use tonic::Code;

use crate::transport::TransportError;

/// Buckets for calls that take from a millisecond (a probe) to minutes (a full clone's
/// create, a large mkfs).
pub const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// `qsd_csi_grpc_request_duration_seconds{service, method, code}`: every call answered by a
/// CSI service or the node agent, until its response headers (a stream's first message).
pub static GRPC_REQUESTS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new(
            "qsd_csi_grpc_request_duration_seconds",
            "Time to answer a gRPC call (CSI or node agent), by service, method and status code.",
        )
        .buckets(CALL_BUCKETS.to_vec()),
        &["service", "method", "code"],
    )
    .expect("a valid histogram")
});

/// Records one call to `path` (`/csi.v1.Node/NodeStageVolume`). Methods the service does not
/// have (answered UNIMPLEMENTED) are counted as `method="unknown"`, so no caller can grow the
/// label set.
pub fn observe_call(path: &str, code: Code, elapsed: Duration) {
    let (service, method) =
        path.trim_start_matches('/').split_once('/').unwrap_or(("unknown", "unknown"));
    let method = if code == Code::Unimplemented { "unknown" } else { method };
    let code = format!("{code:?}");
    GRPC_REQUESTS
        .with_label_values(&[service, method, code.as_str()])
        .observe(elapsed.as_secs_f64());
}

/// A registry with the families every mode has (gRPC calls).
pub fn registry() -> Registry {
    let registry = Registry::new();
    registry.register(Box::new(GRPC_REQUESTS.clone())).expect("registered once per registry");
    registry
}

/// The scrape's body: every family of `registry` in the text format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// Serves `GET /metrics` from `registry` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), TransportError> {
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    continue;
                }
            },
            () = &mut stop => return Ok(()),
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&request, registry).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a metrics connection ended with an error");
            }
        });
    }
}

async fn answer<B>(
    request: &http::Request<B>,
    registry: Registry,
) -> http::Response<Full<bytes::Bytes>> {
    let reply = |status: http::StatusCode, content_type: &str, body: Vec<u8>| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return reply(http::StatusCode::NOT_FOUND, "text/plain", b"see /metrics\n".to_vec());
    }
    if request.method() != http::Method::GET {
        return reply(http::StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"GET only\n".to_vec());
    }
    // Collectors read files (sysfs, statvfs): not on an async worker.
    match tokio::task::spawn_blocking(move || encode(&registry)).await {
        Ok(body) => reply(http::StatusCode::OK, TextEncoder::new().format_type(), body),
        Err(e) => reply(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("collecting failed: {e}\n").into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_service_method_and_code_and_unknown_methods_fold_into_one() {
        observe_call("/csi.v1.Node/NodeStageVolume", Code::Ok, Duration::from_millis(3));
        observe_call("/csi.v1.Node/NoSuchMethod", Code::Unimplemented, Duration::ZERO);
        observe_call("/csi.v1.Node/AnotherBogusOne", Code::Unimplemented, Duration::ZERO);
        let text = String::from_utf8(encode(&registry())).expect("utf-8");
        assert!(text.contains("# TYPE qsd_csi_grpc_request_duration_seconds histogram"), "{text}");
        assert!(text.contains(
            r#"qsd_csi_grpc_request_duration_seconds_count{code="Ok",method="NodeStageVolume",service="csi.v1.Node"}"#
        ));
        assert!(text.contains(
            r#"qsd_csi_grpc_request_duration_seconds_count{code="Unimplemented",method="unknown",service="csi.v1.Node"} 2"#
        ));
        assert!(!text.contains("Bogus"));
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_text_format_at_metrics_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry(), async {
            let _ = stopped.await;
        }));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        let _ = stop.send(());
        server.await.expect("joined").expect("served");
    }
}
