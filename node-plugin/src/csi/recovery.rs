//! Kernel devices taken over after a restart: ublk devices a previous run of this plugin
//! served (the kernel kept their I/O queued), and NBD devices whose daemon was restarted.

use std::sync::Arc;

use super::staging::{Journal, Staged};
use crate::device::{self, Backend};
use crate::engine::EngineCore;
use crate::error::{Error, Result};

/// Runs `action` on every staged volume of `backend` with its current export, logging each
/// outcome (`done`, or `failed` with the error).
async fn for_each_staged<F, Fut>(
    engine: &EngineCore,
    journal: &Journal,
    backend: Backend,
    (done, failed): (&str, &str),
    action: F,
) where
    F: Fn(Staged, crate::graph::ExportEndpoint) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let staged = journal.all();
    for record in staged.into_iter().filter(|r| r.backend == backend) {
        let (id, device) = (record.volume_id.clone(), record.device.clone());
        let result = match super::volume_id(&id).and_then(|v| engine.attachment(&v)) {
            Ok(Some(a)) => action(record, a.endpoint).await,
            Ok(None) => Err(Error::FailedPrecondition(format!("{id} is not exported"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => tracing::info!(volume = %id, device = %device.display(), "{done}"),
            Err(e) => tracing::error!(volume = %id, error = %e, "{failed}"),
        }
    }
}

const RECOVERED: (&str, &str) = ("recovered the ublk device", "recovering the ublk device failed");
const REATTACHED: (&str, &str) =
    ("re-attached the NBD device", "re-attaching the NBD device failed");

/// At start, takes over the ublk devices a previous run of this plugin served: the kernel has
/// kept their I/O queued since that process died (user recovery), so their writers see a pause.
pub(super) async fn recover_ublk_devices(engine: Arc<EngineCore>, journal: Journal) {
    for_each_staged(&engine, &journal, Backend::Ublk, RECOVERED, |r, endpoint| async move {
        device::ublk::recover(&endpoint, &r.device).await
    })
    .await;
}

/// After the engine rebuilt exports (the daemon restarted), gives every staged NBD device a new
/// socket: the kernel has kept its I/O queued meanwhile (dead-connection timeout), so the writer
/// sees a pause, not an error. FUSE-backed devices cannot survive a daemon restart.
pub(super) async fn reattach_after_rebuilds(engine: std::sync::Weak<EngineCore>, journal: Journal) {
    use crate::engine::EngineEvent;
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut events) = engine.upgrade().map(|e| e.subscribe()) else { return };
    loop {
        match events.recv().await {
            Ok(EngineEvent::Reconciled { rebuilt, .. }) if rebuilt > 0 => {}
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        }
        let Some(engine) = engine.upgrade() else { return };
        for_each_staged(&engine, &journal, Backend::Nbd, REATTACHED, |r, endpoint| async move {
            // (NBD: the export's size is read from the daemon; no size to wait for.)
            device::refresh_size(r.backend, &r.device, &endpoint, &r.volume_id, 0).await
        })
        .await;
    }
}
