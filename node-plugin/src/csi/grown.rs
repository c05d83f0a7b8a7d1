//! What the engine asks of the staged volumes, through [`MountedFilesystems`]: a filesystem's
//! usage (for auto-expansion's decision) and, when a volume grew, its kernel device and
//! filesystem grown at once — not at the orchestrator's NodeExpandVolume, which the kubelet
//! sends only at its next sync of the pod (up to its `syncFrequency` later), by when a writer
//! may have filled the old size. The later NodeExpandVolume finds nothing left to do.

use std::path::Path;
use std::sync::{Arc, Weak};

use qsd_csi_model::grow::FsUsage;
use qsd_csi_model::id::ObjectId;

use super::staging::Journal;
use crate::claims::Claims;
use crate::device;
use crate::engine::{EngineCore, MountedFilesystems};
use crate::error::{Error, Result};
use crate::mount::Mounter;

/// The staged volumes of a Node service, as the engine sees them.
#[derive(Debug)]
pub(super) struct StagedVolumes {
    pub journal: Journal,
    pub mounter: Arc<dyn Mounter>,
    pub engine: Weak<EngineCore>,
    /// The Node service's per-volume guard: a volume being staged, published or expanded
    /// by the orchestrator is left to that call.
    pub busy: Claims,
}

/// Refreshes a staged volume's kernel device to the volume's size and grows its filesystem
/// (mounted at `mountpoint`, by default its staging mount); returns the device's size.
pub(super) async fn grow_staged(
    engine: &EngineCore,
    journal: &Journal,
    mounter: &dyn Mounter,
    id: &str,
    mountpoint: Option<&Path>,
) -> Result<u64> {
    let record = journal
        .get(id)?
        .ok_or_else(|| Error::NotFound { what: "staged volume", id: id.to_owned() })?;
    let volume = super::volume_id(id)?;
    let endpoint = engine
        .attachment(&volume)?
        .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not attached")))?
        .endpoint;
    let expected = engine.get_volume(&volume)?.size;
    device::refresh_size(record.backend, &record.device, &endpoint, id, expected).await?;
    if record.fs_type.is_some() {
        let at = mountpoint.unwrap_or(&record.staging_path);
        mounter.grow_fs(&record.device, at).await?;
    }
    mounter.device_size(&record.device).await
}

#[tonic::async_trait]
impl MountedFilesystems for StagedVolumes {
    fn filesystem_usage(&self, volume_id: &ObjectId) -> Option<FsUsage> {
        let staged = self.journal.get(&volume_id.to_string()).ok()??;
        let mounted = staged.complete
            && staged.fs_type.is_some()
            && self.mounter.is_mountpoint(&staged.staging_path);
        if !mounted {
            return None;
        }
        let usage = self.mounter.usage(&staged.staging_path).ok()?;
        Some(FsUsage { used: usage.bytes_used, total: usage.bytes_total })
    }

    async fn grown(&self, volume_id: &ObjectId) -> Result<()> {
        let volume_id = &volume_id.to_string();
        let Some(engine) = self.engine.upgrade() else { return Ok(()) };
        let staged = self.journal.get(volume_id)?.filter(|s| s.complete);
        if staged.is_none() {
            return Ok(());
        }
        let Ok(_claim) = self.busy.take(vec![volume_id.to_owned()]) else {
            return Ok(());
        };
        let size =
            grow_staged(&engine, &self.journal, self.mounter.as_ref(), volume_id, None).await?;
        tracing::info!(volume = volume_id, size, "grew the staged device and filesystem");
        Ok(())
    }
}
