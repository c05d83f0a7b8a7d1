//! Kernel block devices for attached volumes, behind one seam.
//!
//! ```text
//!   qemu-storage-daemon export ──► kernel device ──► mkfs / mount / bind into the pod
//!     fuse file  ─────────────────► loop (buffered)          always available here
//!     nbd socket ─────────────────► /dev/nbdN (netlink)      needs nbd.ko
//!     nbd socket ◄─ ublk server ──► /dev/ublkbN (io_uring)   needs ublk_drv.ko
//! ```
//! The set is closed, so it is an enum. `Auto` picks ublk > nbd > fuse by cheap probes, except
//! that it prefers nbd over a ublk driver that cannot resize a started device (before Linux
//! 6.16): online expansion is something users of a CSI driver count on.

mod fuse_loop;
pub mod nbd;
pub mod nbd_client;
pub mod ublk;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::graph::{ExportEndpoint, ExportKind};

/// Which kernel device backs a staged volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The daemon's FUSE export under a buffered loop device.
    Fuse,
    /// The kernel NBD client.
    Nbd,
    /// A ublk device served by this plugin.
    Ublk,
}

/// A backend request: a fixed backend or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Best available.
    Auto,
    /// This one.
    Fixed(Backend),
}

impl std::str::FromStr for Choice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" | "" => Ok(Choice::Auto),
            "fuse" => Ok(Choice::Fixed(Backend::Fuse)),
            "nbd" => Ok(Choice::Fixed(Backend::Nbd)),
            "ublk" => Ok(Choice::Fixed(Backend::Ublk)),
            other => {
                Err(Error::invalid("device", format!("{other:?} is not auto, ublk, nbd or fuse")))
            }
        }
    }
}

/// What the kernel offers on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probes {
    /// `/dev/ublk-control` exists.
    pub ublk: bool,
    /// The ublk driver can resize a started device (`UBLK_F_UPDATE_SIZE`).
    pub ublk_resize: bool,
    /// The generic netlink family `nbd` resolves (the module is loaded).
    pub nbd: bool,
    /// How many devices each backend's kernel driver has (its module parameter).
    pub limits: DeviceLimits,
}

/// How many volumes each backend can hold at once on this host: its kernel driver's device
/// count (`None`: no fixed count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLimits {
    /// `nbd`'s `nbds_max` (16 unless the module was loaded with more).
    pub nbd: Option<u64>,
    /// `ublk_drv`'s `ublks_max`.
    pub ublk: Option<u64>,
    /// `loop`'s `max_loop` when set (0: devices are made on demand, no fixed count).
    pub fuse: Option<u64>,
}

impl DeviceLimits {
    /// Reads the module parameters of this host.
    pub fn host() -> Self {
        let read = |module: &str, parameter: &str| {
            let path = format!("/sys/module/{module}/parameters/{parameter}");
            std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok().filter(|n| *n > 0)
        };
        DeviceLimits {
            nbd: read("nbd", "nbds_max"),
            ublk: read("ublk_drv", "ublks_max"),
            fuse: read("loop", "max_loop"),
        }
    }

    /// The volumes a node using `backend` can hold: `configured` (`--max-volumes`), or fewer
    /// when the backend has fewer devices.
    pub fn volumes(&self, backend: Backend, configured: i64) -> i64 {
        let devices = match backend {
            Backend::Nbd => self.nbd,
            Backend::Ublk => self.ublk,
            Backend::Fuse => self.fuse,
        };
        devices.map_or(configured, |n| configured.min(i64::try_from(n).unwrap_or(i64::MAX)))
    }
}

impl Probes {
    /// Reads the probes from this host.
    pub fn host() -> Self {
        let ublk = Path::new("/dev/ublk-control").exists();
        Probes {
            ublk,
            ublk_resize: ublk && ublk::can_resize(),
            nbd: nbd::family().is_some(),
            limits: DeviceLimits::host(),
        }
    }
}

impl Choice {
    /// Resolves to a backend this build can drive on a host with `probes`.
    pub fn resolve(self, probes: Probes) -> Result<Backend> {
        match self {
            Choice::Auto if probes.ublk && (probes.ublk_resize || !probes.nbd) => Ok(Backend::Ublk),
            Choice::Auto if probes.nbd => Ok(Backend::Nbd),
            Choice::Auto => Ok(Backend::Fuse),
            Choice::Fixed(Backend::Fuse) => Ok(Backend::Fuse),
            Choice::Fixed(Backend::Nbd) if probes.nbd => Ok(Backend::Nbd),
            Choice::Fixed(Backend::Nbd) => Err(Error::FailedPrecondition(
                "the nbd device backend needs the nbd kernel module".into(),
            )),
            Choice::Fixed(Backend::Ublk) if probes.ublk => Ok(Backend::Ublk),
            Choice::Fixed(Backend::Ublk) => Err(Error::FailedPrecondition(
                "the ublk device backend needs the ublk_drv kernel module (/dev/ublk-control)"
                    .into(),
            )),
        }
    }

    /// Whether a backend's export must acknowledge only flushed writes. The kernel NBD client
    /// re-sends a flush interrupted by the daemon's death to its successor, which never saw the
    /// writes the dead one acknowledged without flushing; the ublk server replays those itself.
    pub fn writethrough(backend: Backend) -> bool {
        backend == Backend::Nbd
    }

    /// The export a backend needs from the daemon.
    pub fn export_kind(backend: Backend) -> ExportKind {
        match backend {
            Backend::Fuse => ExportKind::Fuse,
            Backend::Nbd | Backend::Ublk => ExportKind::Nbd,
        }
    }
}

/// The number in a device node's name after `prefix` (`/dev/nbd3` → 3 for "nbd"); `kind` names
/// the device in the error.
fn device_number(device: &Path, prefix: &str, kind: &str) -> Result<u32> {
    device
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(prefix))
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| {
            Error::invalid("device", format!("{} is not {kind} device", device.display()))
        })
}

/// Attaches a kernel device to an export; returns the device node. `id` names the volume to
/// the kernel (the NBD backend identifier).
pub async fn attach(
    backend: Backend,
    endpoint: &ExportEndpoint,
    direct_io_safe: bool,
    id: &str,
) -> Result<PathBuf> {
    match backend {
        Backend::Fuse => fuse_loop::attach(&endpoint.path, direct_io_safe).await,
        Backend::Nbd => nbd::attach(endpoint, id).await,
        Backend::Ublk => ublk::attach(endpoint).await,
    }
}

/// Detaches a kernel device (idempotent).
pub async fn detach(backend: Backend, device: &Path) -> Result<()> {
    match backend {
        Backend::Fuse => fuse_loop::detach(device).await,
        Backend::Nbd => nbd::detach(device).await,
        Backend::Ublk => ublk::detach(device).await,
    }
}

/// Every device of `backend` connected to the volume `id`'s export: after a kill between
/// creating a device and recording it, the record does not name it. FUSE: the loop devices
/// over the export file; NBD: the devices whose backend identifier is `id`. A ublk device is
/// served by this process and ends with it (`ublk` recovery re-adopts recorded ones only).
pub async fn over_export(
    backend: Backend,
    endpoint: &ExportEndpoint,
    id: &str,
) -> Result<Vec<PathBuf>> {
    match backend {
        Backend::Fuse => fuse_loop::over_file(&endpoint.path).await,
        Backend::Nbd => Ok(nbd::with_backend(id)),
        Backend::Ublk => Ok(Vec::new()),
    }
}

/// Whether the recorded `device` still serves the volume `id` over its export (`endpoint`, if
/// still attached). A device number is the kernel's to reuse once it is detached: a plugin
/// killed between detaching a device and forgetting its record leaves a record naming a
/// device that another volume may hold by the time the record is read again. FUSE: the loop
/// device reads the export file; NBD: its backend identifier is `id`; ublk devices are
/// created and deleted by this plugin alone.
pub fn serves(
    backend: Backend,
    device: &Path,
    endpoint: Option<&ExportEndpoint>,
    id: &str,
) -> bool {
    match backend {
        // The kernel names the backing file by its resolved path.
        Backend::Fuse => endpoint.is_some_and(|e| {
            fuse_loop::backing_file(device).is_some_and(|file| {
                file == e.path || std::fs::canonicalize(&e.path).is_ok_and(|p| p == file)
            })
        }),
        Backend::Nbd => nbd::backend_of(device).is_some_and(|b| b == id),
        Backend::Ublk => true,
    }
}

/// Makes the kernel see the export's current size after a resize (NBD: reconnect to the
/// re-created export with RECONFIGURE; ublk: UPDATE_SIZE where the driver has it).
pub async fn refresh_size(
    backend: Backend,
    device: &Path,
    endpoint: &ExportEndpoint,
    id: &str,
    expected: u64,
) -> Result<()> {
    match backend {
        Backend::Fuse => fuse_loop::refresh(device, &endpoint.path, expected).await,
        Backend::Nbd => nbd::reconnect(endpoint, device, id).await,
        Backend::Ublk => ublk::refresh_size(device, endpoint).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_a_backend_this_build_drives_and_missing_ones_are_refused() {
        let limits = DeviceLimits { nbd: Some(16), ublk: Some(64), fuse: None };
        assert_eq!(limits.volumes(Backend::Nbd, 256), 16, "the kernel has 16 NBD devices");
        assert_eq!(limits.volumes(Backend::Ublk, 32), 32, "fewer configured than devices");
        assert_eq!(limits.volumes(Backend::Fuse, 256), 256, "loop devices are made on demand");
        let none =
            Probes { ublk: false, ublk_resize: false, nbd: false, limits: Default::default() };
        let all = Probes { ublk: true, ublk_resize: true, nbd: true, limits: Default::default() };
        let old_ublk = Probes { ublk_resize: false, ..all };
        assert_eq!(Choice::Auto.resolve(none).ok(), Some(Backend::Fuse));
        assert_eq!(Choice::Auto.resolve(all).ok(), Some(Backend::Ublk));
        assert_eq!(Choice::Auto.resolve(old_ublk).ok(), Some(Backend::Nbd));
        assert_eq!(
            Choice::Auto.resolve(Probes { nbd: false, ..old_ublk }).ok(),
            Some(Backend::Ublk)
        );
        assert_eq!(Choice::Fixed(Backend::Nbd).resolve(all).ok(), Some(Backend::Nbd));
        assert!(Choice::Fixed(Backend::Nbd).resolve(none).is_err());
        assert_eq!(Choice::Fixed(Backend::Ublk).resolve(old_ublk).ok(), Some(Backend::Ublk));
        assert!(Choice::Fixed(Backend::Ublk).resolve(none).is_err());
        assert_eq!("fuse".parse::<Choice>().ok(), Some(Choice::Fixed(Backend::Fuse)));
        assert!("iscsi".parse::<Choice>().is_err());
    }
}
