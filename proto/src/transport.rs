//! How the contract travels: gRPC over unix sockets (one connector and one listener for every
//! client and server in the project), and the standard health service.

use std::path::Path;

use tonic::transport::Channel;

/// Connects an HTTP/2 channel to a unix socket.
pub async fn connect_unix(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Listens on a unix socket at `path`, readable and writable by its owner only (0600). The
/// directory is created; a socket left by a killed process is removed first. The socket file
/// appears only once it accepts connections.
pub fn listen_unix(path: &Path) -> Result<tokio::net::UnixListener, TransportError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |op: &'static str, at: &Path| {
        let path = at.to_owned();
        move |source| TransportError::Io { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the socket directory", dir))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove a stale socket", path)(e)),
    }
    // Bound and listening under a temporary name, then renamed into place: whoever sees the
    // socket file can connect (between bind and listen a client would be refused).
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}.tmp", std::process::id()));
    let staged = std::path::PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    let listener = tokio::net::UnixListener::bind(&staged).map_err(io("listen on", &staged))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict", &staged))?;
    std::fs::rename(&staged, path).map_err(io("put in place the socket", path))?;
    Ok(listener)
}

/// A listener or server that could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A filesystem step of setting up a socket.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A gRPC server ended with an error.
    #[error("{what}")]
    Server {
        /// Which server.
        what: &'static str,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The socket path of an endpoint written `unix:///path`, `unix:/path` or `/path`.
pub fn socket_path(endpoint: &str) -> Result<std::path::PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!("endpoint {endpoint:?} is not an absolute unix socket path"));
    }
    Ok(std::path::PathBuf::from(path))
}

/// How often the health service asks the readiness check.
pub const HEALTH_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the standard gRPC health service (`grpc.health.v1`, what Kubernetes' gRPC probes
/// call) on `listener` until `shutdown`: NOT_SERVING until `ready` first answers true, then
/// SERVING while it does, asked every [`HEALTH_PERIOD`]; a `Watch` stream carries changes only.
pub async fn serve_health<F, Fut>(
    listener: tokio::net::TcpListener,
    ready: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), TransportError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    serve_health_every(HEALTH_PERIOD, listener, ready, shutdown).await
}

async fn serve_health_every<F, Fut>(
    period: std::time::Duration,
    listener: tokio::net::TcpListener,
    ready: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), TransportError>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    // tonic-health starts the server's status at SERVING and tells watchers of every report,
    // changed or not. Not ready until the first check says so, and a watcher hears only changes.
    let mut reported = ServingStatus::NotServing;
    reporter.set_service_status("", reported).await;
    let mut ending = reporter.clone();
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let status =
                if ready().await { ServingStatus::Serving } else { ServingStatus::NotServing };
            if status != reported {
                reporter.set_service_status("", status).await;
                reported = status;
            }
        }
    });
    let checks = watcher.abort_handle();
    // A graceful stop waits for every open stream, and a Watch stays open for as long as its
    // service's status exists: at the stop, watchers hear NOT_SERVING and their streams end.
    let shutdown = async move {
        shutdown.await;
        checks.abort();
        ending.set_service_status("", ServingStatus::NotServing).await;
        ending.clear_service_status("").await;
    };
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|source| TransportError::Server { what: "health server", source });
    watcher.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_name_absolute_unix_sockets() {
        let path = |p: &str| Some(std::path::PathBuf::from(p));
        assert_eq!(socket_path("unix:///run/csi.sock").ok(), path("/run/csi.sock"));
        assert_eq!(socket_path("unix:/run/csi.sock").ok(), path("/run/csi.sock"));
        assert_eq!(socket_path("/run/csi.sock").ok(), path("/run/csi.sock"));
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }

    #[tokio::test]
    async fn health_watchers_hear_not_serving_until_ready_and_then_only_changes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio_stream::StreamExt;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        use tonic_health::ServingStatus;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        // `asked` counts the readiness checks, so the test can wait for them.
        let (ready, asked) = (Arc::new(AtomicBool::new(false)), tokio::sync::watch::channel(0));
        let (r, a) = (ready.clone(), Arc::new(asked.0));
        let mut checks = asked.1;
        let check = move || {
            let (r, a) = (r.clone(), a.clone());
            async move {
                a.send_modify(|n| *n += 1);
                r.load(Ordering::SeqCst)
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let period = std::time::Duration::from_millis(20);
        let server = tokio::spawn(serve_health_every(period, listener, check, async {
            stopped.await.ok();
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect_lazy();
        let mut probe = HealthClient::new(channel);
        let request = || HealthCheckRequest { service: String::new() };
        // The listener is bound already: the connection waits in its backlog for the server.
        let mut watch = probe.watch(request()).await.expect("watch").into_inner();
        async fn next(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
            let wait = std::time::Duration::from_secs(10);
            let item = tokio::time::timeout(wait, watch.next()).await.expect("a status in time");
            item.expect("open").expect("status").status
        }
        assert_eq!(
            next(&mut watch).await,
            ServingStatus::NotServing as i32,
            "unready before any check"
        );
        ready.store(true, Ordering::SeqCst);
        assert_eq!(next(&mut watch).await, ServingStatus::Serving as i32);
        // Several more checks answer the same: no watcher hears them.
        let seen = *checks.borrow_and_update();
        checks.wait_for(|n| *n >= seen + 3).await.expect("checks go on");
        ready.store(false, Ordering::SeqCst);
        assert_eq!(
            next(&mut watch).await,
            ServingStatus::NotServing as i32,
            "the next message is the change"
        );
        drop((watch, probe));
        stop.send(()).ok();
        server.await.expect("join").expect("served");
    }

    #[tokio::test]
    async fn a_graceful_stop_ends_the_health_watches_still_open() {
        use tokio_stream::StreamExt;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        use tonic_health::ServingStatus;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let period = std::time::Duration::from_millis(20);
        let server = tokio::spawn(serve_health_every(period, listener, || async { true }, async {
            stopped.await.ok();
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect_lazy();
        let mut probe = HealthClient::new(channel);
        let request = HealthCheckRequest { service: String::new() };
        let mut watch = probe.watch(request).await.expect("watch").into_inner();
        let wait = std::time::Duration::from_secs(10);
        let mut heard = Vec::new();
        while heard.last() != Some(&(ServingStatus::Serving as i32)) {
            let item = tokio::time::timeout(wait, watch.next()).await.expect("a status in time");
            heard.push(item.expect("open").expect("status").status);
        }
        // The watcher stays: the stop must not wait for it to leave.
        stop.send(()).ok();
        let stopped = tokio::time::timeout(wait, server).await;
        stopped.expect("the server stopped with a watch open").expect("join").expect("served");
        let mut after = Vec::new();
        while let Some(Ok(item)) = tokio::time::timeout(wait, watch.next()).await.expect("ended") {
            after.push(item.status);
        }
        assert_eq!(after, [ServingStatus::NotServing as i32], "told, then the stream ended");
    }

    #[tokio::test]
    async fn a_listener_replaces_a_stale_socket_and_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/csi.sock");
        let first = listen_unix(&path).expect("listen");
        drop(first); // a killed server leaves its socket file behind
        assert!(path.exists());
        let _second = listen_unix(&path).expect("listen again");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["csi.sock"], "no temporary name left behind");
        connect_unix(&path).await.expect("connect");
    }
}
