//! Filesystem-consistent snapshots: FIFREEZE before the QMP transaction, FITHAW after.
//!
//! ```text
//!   marker <state>/frozen/<volume>.json ─► FIFREEZE (bounded wait) ─► snapshot ─► FITHAW ─► marker gone
//!                                     crash anywhere here ─► next start: FITHAW every marker
//! ```
//! A frozen ext4 or xfs has flushed its journal and marked itself clean, so a snapshot taken
//! while frozen mounts without journal recovery. Only volumes staged here with a filesystem,
//! and only while their staging path is still a mount point, are frozen: a freeze of a path
//! that is no longer mounted would freeze the filesystem under it (the host's). The volume is
//! claimed for the window, so no stage or unstage runs inside it. The marker is written before
//! the ioctl, so a plugin killed mid-window thaws the filesystem when it starts again.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::staging::{file_name, Journal};
use crate::claims::{Claim, Claims};
use crate::engine::Quiesce;
use crate::error::{Error, Result};
use crate::pool::id::ObjectId;
use crate::pool::store;

/// How long FIFREEZE may take (it waits for in-flight writes and flushes the journal).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a marker records: where the frozen filesystem is mounted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    volume_id: String,
    mount: PathBuf,
}

/// Freezes staged filesystems for the engine's snapshots.
#[derive(Debug, Clone)]
pub struct Freezer {
    staging: Journal,
    busy: Claims,
    markers: PathBuf,
}

impl Freezer {
    /// A freezer over the staging journal, claiming volumes in `busy`, keeping its markers in
    /// `markers` (created if missing).
    pub fn new(staging: Journal, busy: Claims, markers: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&markers).map_err(|e| Error::io("create", &markers, e))?;
        Ok(Freezer { staging, busy, markers })
    }

    /// Thaws what a killed plugin left frozen (every marker), then forgets the markers.
    /// Returns the mounts it thawed.
    pub fn thaw_leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut thawed = Vec::new();
        for marker in store::read_all::<Marker>(&self.markers, true)? {
            match thaw(&marker.mount) {
                Ok(true) => {
                    tracing::warn!(volume = %marker.volume_id, mount = %marker.mount.display(), "thawed a filesystem left frozen by a killed plugin");
                    thawed.push(marker.mount.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(volume = %marker.volume_id, error = %e, "thawing a left-over freeze failed")
                }
            }
            store::remove(&self.markers, &file_name(&marker.volume_id))?;
        }
        Ok(thawed)
    }
}

/// Frozen filesystems; dropping it thaws them and removes their markers.
struct Frozen {
    markers: PathBuf,
    frozen: Vec<Marker>,
    _claim: Claim,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for marker in self.frozen.drain(..).rev() {
            if let Err(e) = thaw(&marker.mount) {
                // Keep the marker: the next start tries again.
                tracing::error!(volume = %marker.volume_id, error = %e, "FITHAW failed");
                continue;
            }
            let _ = store::remove(&self.markers, &file_name(&marker.volume_id));
        }
    }
}

impl Quiesce for Freezer {
    fn holds(&self, volume_id: &ObjectId) -> Result<bool> {
        self.holds_staged(&volume_id.to_string())
    }

    fn freeze(&self, volume_ids: &[ObjectId]) -> Result<Box<dyn Send>> {
        // The staging journal and the claims go by the ID as the CO sent it.
        let volume_ids: Vec<String> = volume_ids.iter().map(ToString::to_string).collect();
        self.freeze_staged(&volume_ids)
    }
}

impl Freezer {
    fn holds_staged(&self, volume_id: &str) -> Result<bool> {
        Ok(self.staging.get(volume_id)?.is_some_and(|staged| {
            staged.fs_type.is_some() && crate::mount::is_mountpoint(&staged.staging_path)
        }))
    }

    fn freeze_staged(&self, volume_ids: &[String]) -> Result<Box<dyn Send>> {
        let claim = self.busy.take(volume_ids.to_vec()).map_err(|id| Error::Busy { id })?;
        let mut frozen =
            Frozen { markers: self.markers.clone(), frozen: Vec::new(), _claim: claim };
        for id in volume_ids {
            let Some(staged) = self.staging.get(id)? else { continue };
            if !self.holds_staged(id)? {
                continue;
            }
            let marker = Marker { volume_id: id.clone(), mount: staged.staging_path.clone() };
            store::write_json(&self.markers, &file_name(id), &marker)?;
            if let Err(e) = freeze(&marker.mount, FREEZE_TIMEOUT) {
                let _ = store::remove(&self.markers, &file_name(id));
                return Err(e); // `frozen` thaws the others
            }
            frozen.frozen.push(marker);
        }
        if !frozen.frozen.is_empty() {
            let mounts: Vec<_> =
                frozen.frozen.iter().map(|m| m.mount.display().to_string()).collect();
            tracing::info!(?mounts, "froze filesystems for a snapshot");
        }
        Ok(Box::new(frozen))
    }
}

fn open_dir(mount: &Path) -> Result<std::fs::File> {
    std::fs::File::open(mount).map_err(|e| Error::io("open for freeze", mount, e))
}

/// FITHAW; `Ok(false)` when the filesystem was not frozen.
fn thaw(mount: &Path) -> Result<bool> {
    match crate::sys::thaw_fs(&open_dir(mount)?) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(Error::io("FITHAW", mount, e.into())),
    }
}

/// FIFREEZE, waiting at most `timeout`. A freeze that completes after the wait was given up
/// is thawed at once by the thread that made it.
fn freeze(mount: &Path, timeout: Duration) -> Result<()> {
    let dir = open_dir(mount)?;
    let abandoned = Arc::new(Mutex::new(false));
    let (tx, rx) = mpsc::channel();
    let (flag, path) = (abandoned.clone(), mount.to_owned());
    std::thread::spawn(move || {
        let result = crate::sys::freeze_fs(&dir);
        let gave_up = flag.lock().unwrap_or_else(|p| p.into_inner());
        if *gave_up {
            if result.is_ok() {
                let _ = thaw(&path);
            }
            return;
        }
        let _ = tx.send(result);
    });
    let outcome = match rx.recv_timeout(timeout) {
        Ok(result) => Some(result),
        Err(_) => {
            let mut gave_up = abandoned.lock().unwrap_or_else(|p| p.into_inner());
            // The thread may have answered between the timeout and the lock.
            let late = rx.try_recv().ok();
            if late.is_none() {
                *gave_up = true;
            }
            late
        }
    };
    match outcome {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(Error::io("FIFREEZE", mount, e.into())),
        None => Err(Error::FailedPrecondition(format!(
            "the filesystem on {} did not freeze within {} s; snapshot not taken",
            mount.display(),
            timeout.as_secs()
        ))),
    }
}
