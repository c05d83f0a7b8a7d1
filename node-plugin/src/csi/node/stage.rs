//! NodeStage, all or nothing: a stage that fails undoes what it did, and one killed half-way
//! is undone before the volume is staged again (or unstaged, or when the plugin starts).
//!
//! ```text
//!   record (incomplete) ─► engine.attach ─► device ─► record(device) ─► [record(formatting) ─► mkfs]
//!         ─► mount ─► record(complete)
//!   undo: unmount staging ─► detach every device over the export ─► engine.detach ─► forget record
//! ```
//! Every step writes the staging record first, so whatever a kill leaves is named by it: the
//! device it made, or (killed between creating the device and recording it) the devices found
//! over the volume's export. A stage killed during mkfs is undone by wiping the device's
//! signatures (it was empty when mkfs started), so the retry formats it whole; helper commands
//! die with the plugin (`sys::die_with_parent`), so no orphaned mkfs goes on writing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{decide, volume_id, NodeService, StageStep, Staged, WRITE_THRESHOLD_PERCENT};
use crate::csi::csi;
use crate::device::{self, Choice};
use crate::error::Result;

impl NodeService {
    pub(super) async fn stage(
        &self,
        id: &str,
        staging: &Path,
        capability: &csi::VolumeCapability,
        context: &HashMap<String, String>,
    ) -> Result<()> {
        let size = self.engine.get_volume(&volume_id(id)?)?.size;
        let fs_type = decide::fs_type(capability, context)?;
        if let Some(fs) = &fs_type {
            decide::fs_fits(fs, size)?;
        }
        if let Some(percent) = context.get(WRITE_THRESHOLD_PERCENT) {
            super::parse_threshold_percent(percent)?;
        }
        let existing = self.staged(id)?;
        // Only a staged volume's mount matters: a first stage reads no mount table.
        let mounted = existing.is_some() && self.mounter.is_mountpoint(staging);
        match decide::stage_step(id, existing.as_ref(), staging, mounted)? {
            StageStep::Done => return Ok(()),
            StageStep::Stage => {}
            StageStep::Redo => {
                if let Some(half) = &existing {
                    tracing::warn!(volume = id, "undoing what is left of an earlier stage");
                    self.undo_stage(half).await?;
                }
            }
        }
        let backend = self.config.device.resolve(self.probes)?;
        let mut record = Staged {
            volume_id: id.to_owned(),
            staging_path: staging.to_owned(),
            backend,
            device: PathBuf::new(),
            fs_type,
            access_mode: capability.access_mode.as_ref().map(|m| m.mode).unwrap_or_default(),
            targets: Default::default(),
            complete: false,
            formatting: false,
            selinux_context: decide::selinux_context(capability),
        };
        self.journal.put(&record)?;
        let staged = self.stage_steps(&mut record, capability, context).await;
        if let Err(e) = staged {
            if let Err(undo) = self.undo_stage(&record).await {
                tracing::error!(volume = id, error = %undo.with_causes(), "undoing a failed stage failed");
            }
            return Err(e);
        }
        // A head that filled past its threshold while nobody watched is reported now that the
        // volume is staged (its filesystem's usage known, a growth able to reach it).
        if context.contains_key(WRITE_THRESHOLD_PERCENT) {
            if let Ok(volume) = volume_id(id) {
                self.engine.report_past_threshold(&volume).await;
            }
        }
        Ok(())
    }

    async fn stage_steps(
        &self,
        record: &mut Staged,
        capability: &csi::VolumeCapability,
        context: &HashMap<String, String>,
    ) -> Result<()> {
        let id = record.volume_id.clone();
        let backend = record.backend;
        let (kind, writethrough) = (Choice::export_kind(backend), Choice::writethrough(backend));
        let endpoint =
            self.engine.attach_with(&volume_id(&id)?, kind, writethrough).await?.endpoint;
        crate::fault_point!("stage:after-attach");
        if let Some(percent) = context.get(WRITE_THRESHOLD_PERCENT) {
            self.arm_write_threshold(&id, percent).await?;
        }
        // A buffered loop on every QEMU: where a direct-I/O loop is safe (10.1 and later) it
        // measured no faster on any job and slower on sequential writes (docs/benchmarks.md).
        let device = device::attach(backend, &endpoint, false, &id).await?;
        record.device = device.clone();
        self.journal.put(record)?;
        crate::fault_point!("stage:after-device");
        let m = &self.mounter;
        if let Some(fs) = record.fs_type.clone() {
            let found = m.probe_fs(&device).await?;
            if decide::format_step(&device, found.as_deref(), &fs)? {
                record.formatting = true;
                self.journal.put(record)?;
                crate::fault_point!("stage:after-format-start");
                m.format(&device, &fs).await?;
                crate::fault_point!("stage:after-format");
            }
            if m.grow_unmounted_ext(&device, &fs).await? {
                tracing::info!(volume = %id, "grew the filesystem to its larger volume");
            }
            let flags = decide::mount_flags(capability, &fs);
            m.mount(&device, &record.staging_path, Some(&fs), &flags).await?;
            crate::fault_point!("stage:after-mount");
            if !flags.iter().any(|f| f == "ro")
                && m.grow_mounted_xfs(&device, &record.staging_path, &fs).await?
            {
                tracing::info!(volume = %id, "grew the filesystem to its larger volume");
            }
        }
        record.complete = true;
        record.formatting = false;
        self.journal.put(record)
    }

    /// Undoes a stage: unmounts its staging path, detaches its device (and any other device
    /// over the volume's export: one created just before a kill was never recorded), detaches
    /// the volume from the daemon and forgets the record. Each step tolerates what is gone.
    pub(super) async fn undo_stage(&self, record: &Staged) -> Result<()> {
        let id = &record.volume_id;
        self.mounter.unmount(&record.staging_path).await?;
        // The recorded device only while it still serves this volume: a kill after detaching
        // it leaves the record naming a number the kernel may have given to another volume.
        let recorded = self.serves(record);
        let mut devices = Vec::new();
        if recorded {
            devices.push(record.device.clone());
        }
        let attachment = volume_id(id).ok().and_then(|v| self.engine.attachment(&v).ok().flatten());
        if let Some(attachment) = attachment {
            for found in device::over_export(record.backend, &attachment.endpoint, id).await? {
                if !devices.contains(&found) {
                    devices.push(found);
                }
            }
        }
        if record.formatting && recorded {
            // Our mkfs started on this device when it held nothing: leave it holding nothing,
            // not a half-made filesystem the next stage would take for a whole one.
            self.mounter.wipe(&record.device).await?;
        }
        for dev in &devices {
            device::detach(record.backend, dev).await?;
        }
        crate::fault_point!("undo-stage:after-devices");
        match self.engine.detach(&volume_id(id)?).await {
            Ok(()) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.journal.remove(id)?;
        tracing::info!(volume = %id, ?devices, "took the stage apart");
        Ok(())
    }

    /// Undoes every stage a killed plugin left unfinished; called at start, before the CSI
    /// socket serves (the CO's retry then stages afresh). A volume busy with a call is left to it.
    pub async fn undo_unfinished_stages(&self) {
        for record in self.journal.all().into_iter().filter(|r| !r.complete) {
            let Ok(_busy) = self.claim(&record.volume_id) else { continue };
            if let Err(e) = self.undo_stage(&record).await {
                tracing::error!(volume = %record.volume_id, error = %e.with_causes(), "undoing an unfinished stage failed; the next stage or unstage retries");
            }
        }
    }
}
