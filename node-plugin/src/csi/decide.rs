//! What NodeStage, NodePublish, NodeUnstage and NodeGetVolumeHealth decide before (or instead
//! of) touching the host: pure functions of the request, the staging record and what the
//! mounter reports, so every branch is tested without root, a daemon or a kernel device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::csi;
use super::staging::Staged;
use crate::error::{Error, Result};
use qsd_csi_model::health::{Finding, Severity};
use qsd_csi_model::params::{self, FS_TYPE};

/// The filesystem a capability asks for: the capability's, else the volume context's (the
/// class's `fsType`), else ext4; `None` for a block volume.
pub fn fs_type(
    capability: &csi::VolumeCapability,
    context: &HashMap<String, String>,
) -> Result<Option<String>> {
    use csi::volume_capability::AccessType;
    match &capability.access_type {
        Some(AccessType::Mount(m)) => {
            let from_context = context.get(FS_TYPE).map(String::as_str).unwrap_or("");
            let fs = [m.fs_type.as_str(), from_context].into_iter().find(|f| !f.is_empty());
            let fs = fs.unwrap_or("ext4");
            params::fs_type("fs_type", fs)?;
            Ok(Some(fs.to_owned()))
        }
        Some(AccessType::Block(_)) => Ok(None),
        None => Err(Error::invalid("volume_capability", "access type is required")),
    }
}

/// What staging has left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStep {
    /// Already staged there: nothing.
    Done,
    /// Attach, format if empty, mount.
    Stage,
    /// Undo what is left of an earlier stage (killed half-way, or its mount gone), then stage.
    Redo,
}

/// Whether staging formats the device: only when it holds nothing. A device that holds another
/// filesystem is never reformatted. (A stage killed during mkfs is undone by wiping the device,
/// so its retry finds nothing and formats.)
pub fn format_step(device: &Path, found: Option<&str>, wanted: &str) -> Result<bool> {
    match found {
        None => Ok(true),
        Some(fs) if fs == wanted => Ok(false),
        Some(fs) => Err(Error::FailedPrecondition(format!(
            "{} already holds {fs}, not {wanted}; refusing to reformat",
            device.display()
        ))),
    }
}

/// Refuses a filesystem its volume is too small for, naming the minimum (mkfs.xfs would fail
/// with its usage text).
pub fn fs_fits(fs: &str, size: u64) -> Result<()> {
    let minimum = params::XFS_MIN_SIZE as u64;
    if fs == "xfs" && size < minimum {
        return Err(Error::OutOfRange {
            requested: size as i64,
            reason: format!(
                "an xfs filesystem needs a volume of at least {} MiB; this one has {} MiB",
                minimum >> 20,
                size >> 20
            ),
        });
    }
    Ok(())
}

/// Whether a volume already `staged` (per its record) at `staging` needs staging; staging it
/// at another path is ALREADY_EXISTS. A mount volume whose staging mount is gone (a reboot)
/// is staged again.
pub fn stage_step(
    id: &str,
    staged: Option<&Staged>,
    staging: &Path,
    staging_mounted: bool,
) -> Result<StageStep> {
    let Some(existing) = staged else { return Ok(StageStep::Stage) };
    if existing.staging_path != staging {
        return Err(Error::AlreadyExists {
            what: "staged volume",
            name: id.to_owned(),
            difference: format!("staged at {}", existing.staging_path.display()),
        });
    }
    if !existing.complete {
        return Ok(StageStep::Redo);
    }
    if existing.fs_type.is_none() || staging_mounted {
        return Ok(StageStep::Done);
    }
    // Its mount gone (a reboot, or unmounted behind the plugin's back): take apart whatever of
    // it is left before staging again, not leave its device attached beside a new one.
    Ok(StageStep::Redo)
}

/// The options a staging mount gets: the capability's, plus `nouuid` for xfs (a restored
/// snapshot or a clone carries its source's XFS UUID and could not be mounted beside it).
pub fn mount_flags(capability: &csi::VolumeCapability, fs: &str) -> Vec<String> {
    use csi::volume_capability::AccessType;
    let mut flags = match &capability.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    };
    if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
        flags.push("nouuid".into());
    }
    flags
}

/// The SELinux label a mount capability asks for (`context="…"` among its mount flags: what
/// the kubelet passes with SELinuxMount), without its quotes.
pub fn selinux_context(capability: &csi::VolumeCapability) -> Option<String> {
    use csi::volume_capability::AccessType;
    let Some(AccessType::Mount(m)) = &capability.access_type else { return None };
    m.mount_flags
        .iter()
        .find_map(|f| f.strip_prefix("context="))
        .map(|c| c.trim_matches(|q| q == '"' || q == '\'').to_owned())
}

/// A publish's label against its staging mount's: a bind carries the label the filesystem was
/// mounted with, so a publish asking for another one (or for one when the stage set none) is
/// refused rather than handed a differently labelled mount.
pub fn context_conflict(id: &str, staged: Option<&str>, wanted: Option<&str>) -> Result<()> {
    match (staged, wanted) {
        (_, None) => Ok(()),
        (Some(s), Some(w)) if s == w => Ok(()),
        (staged, Some(wanted)) => Err(Error::FailedPrecondition(format!(
            "volume {id} is mounted with SELinux context {}; a publish asks for {wanted:?} (a volume's pods on one node share its label)",
            staged.map_or("none".to_owned(), |s| format!("{s:?}"))
        ))),
    }
}

/// What publishing has left to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishStep {
    /// Already published at the target: nothing.
    Done,
    /// Bind `source` (the staging mount, or a block volume's device node) onto the target,
    /// which is a directory for a filesystem and a file for a device.
    Bind {
        /// What to bind.
        source: PathBuf,
        /// A block volume: the target is a file.
        block: bool,
    },
}

/// Whether and how `target` gets the volume: it must be staged, at the staging path the
/// request names; a single-writer volume is published at one target only.
pub fn publish_step(
    id: &str,
    staged: Option<&Staged>,
    staging: &Path,
    target: &Path,
    target_mounted: bool,
) -> Result<PublishStep> {
    use csi::volume_capability::access_mode::Mode;
    let record = staged.filter(|r| r.complete).ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
    })?;
    if record.staging_path != staging {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is staged at {}, not {}",
            record.staging_path.display(),
            staging.display()
        )));
    }
    if target_mounted && record.targets.contains(target) {
        return Ok(PublishStep::Done);
    }
    let single_writer = record.access_mode == Mode::SingleNodeSingleWriter as i32;
    if let Some(other) = record.targets.iter().find(|t| *t != target).filter(|_| single_writer) {
        return Err(Error::FailedPrecondition(format!(
            "volume {id} is single-writer and already published at {}",
            other.display()
        )));
    }
    Ok(match record.fs_type {
        Some(_) => PublishStep::Bind { source: record.staging_path.clone(), block: false },
        None => PublishStep::Bind { source: record.device.clone(), block: true },
    })
}

/// After `target` is unmounted: the staging record without it, to write back, if it listed it
/// (an unpublish of a target never published, or repeated, changes no record).
pub fn unpublished(staged: Option<Staged>, target: &Path) -> Option<Staged> {
    let mut record = staged?;
    record.targets.remove(target).then_some(record)
}

/// Refuses to unstage while the volume is used anywhere but its staging path: `users` are the
/// mounts of its device, and the published targets still mounted (a block volume's bind-mounted
/// device node shows up as devtmpfs, so the record names those).
pub fn unstage_blocker(id: &str, record: &Staged, users: &[PathBuf]) -> Result<()> {
    match users.iter().find(|m| **m != record.staging_path) {
        Some(user) => Err(Error::FailedPrecondition(format!(
            "volume {id} is still mounted at {}; unpublish it first",
            user.display()
        ))),
        None => Ok(()),
    }
}

/// What the node can see of a volume's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The daemon exports it.
    pub attached: bool,
    /// Its kernel device exists.
    pub device_exists: bool,
    /// It is a ublk device with no server in this plugin.
    pub ublk_unserved: bool,
}

/// What the node sees wrong with a volume (NodeGetVolumeHealth adds the engine's findings):
/// a staged volume needs its export, its kernel device and, for ublk, a server in this plugin.
/// A volume not staged here is not in use here: nothing to report from this node.
pub fn node_findings(staged: bool, seen: Seen) -> Vec<Finding> {
    let finding =
        |reason: &str, message: &str| vec![Finding::new(Severity::Inaccessible, reason, message)];
    match (staged, seen.attached) {
        (false, _) => Vec::new(),
        (true, false) => {
            finding("ExportGone", "the volume is staged but the daemon does not export it")
        }
        (true, true) if seen.ublk_unserved => {
            finding("UblkUnserved", "the ublk device has no server in this plugin")
        }
        (true, true) if !seen.device_exists => finding("DeviceGone", "the kernel device is gone"),
        (true, true) => Vec::new(),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
