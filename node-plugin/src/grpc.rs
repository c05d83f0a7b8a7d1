//! gRPC over unix sockets: one connector for every client in the project.

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
/// directory is created; a socket left by a killed process is removed first.
pub fn listen_unix(path: &Path) -> crate::Result<tokio::net::UnixListener> {
    use crate::Error;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io("create the socket directory", dir, e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove a stale socket", path, e)),
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| Error::io("listen on", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("restrict", path, e))?;
    Ok(listener)
}

/// How often the health service asks the readiness check.
pub const HEALTH_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the standard gRPC health service (`grpc.health.v1`, what Kubernetes' gRPC probes
/// call) on `listener` until `shutdown`: SERVING while `ready` answers true, asked every
/// [`HEALTH_PERIOD`].
pub async fn serve_health<F, Fut>(
    listener: tokio::net::TcpListener,
    ready: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> crate::Result<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_PERIOD);
        loop {
            tick.tick().await;
            let status =
                if ready().await { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
        }
    });
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|e| crate::Error::Transport(format!("health server: {e}")));
    watcher.abort();
    served
}
