//! Serving a CSI router on its unix socket, with the gRPC health service beside it when asked,
//! both until one stop future resolves. Every mode (standalone, node, controller) serves this
//! way; readiness is Identity's.

use std::net::SocketAddr;
use std::path::Path;

use qsd_csi_proto::transport::{self, TransportError, HEALTH_PERIOD};
use tokio::sync::watch;

use crate::identity::IdentityService;

/// Serves `router` on the unix socket at `socket` (and, with `health`, the health service
/// there, SERVING while `identity` is ready) until `stop` resolves. The socket is removed
/// when serving ends.
pub async fn csi_and_health(
    socket: &Path,
    router: tonic::transport::server::Router,
    health: Option<SocketAddr>,
    identity: IdentityService,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::run::RunError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener = transport::listen_unix(socket)?;
    tracing::info!(endpoint = %socket.display(), "serving CSI");
    let csi = async {
        let served = router
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                stopped(stop_rx.clone()),
            )
            .await
            .map_err(|source| TransportError::Server { what: "CSI server", source });
        let _ = std::fs::remove_file(socket);
        served
    };
    let health = async {
        let Some(addr) = health else { return Ok(()) };
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| TransportError::Io {
                op: "listen for health checks on",
                path: addr.to_string().into(),
                source,
            })?;
        let ready = move || {
            let identity = identity.clone();
            async move { identity.ready_within(HEALTH_PERIOD).await }
        };
        transport::serve_health(listener, ready, stopped(stop_rx.clone())).await
    };
    let trigger = async {
        stop.await;
        let _ = stop_tx.send(true);
    };
    // A server that fails ends the others too.
    let (served, checked, ()) = tokio::join!(
        async {
            let r = csi.await;
            let _ = stop_tx.send(true);
            r
        },
        async {
            let r = health.await;
            if r.is_err() {
                let _ = stop_tx.send(true);
            }
            r
        },
        async {
            tokio::select! {
                () = trigger => {}
                () = stopped(stop_rx.clone()) => {}
            }
        }
    );
    served?;
    checked?;
    tracing::info!("stopped serving CSI");
    Ok(())
}
