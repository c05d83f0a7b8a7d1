//! Kernel block devices for attached volumes, behind one seam.
//!
//! ```text
//!   qemu-storage-daemon export ──► kernel device ──► mkfs / mount / bind into the pod
//!     fuse file  ─────────────────► loop (buffered)          always available here
//!     nbd socket ─────────────────► /dev/nbdN (netlink)      needs nbd.ko
//!     nbd socket ◄─ ublk server ──► /dev/ublkbN (io_uring)   needs ublk_drv.ko
//! ```
//! The set is closed, so it is an enum. `Auto` picks ublk > nbd > fuse by cheap probes; the
//! nbd and ublk backends are not built yet, so `auto` resolves to fuse and asking for them
//! explicitly is refused with a clear error.

mod fuse_loop;
pub mod nbd_client;

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
    /// The nbd module is loaded (`/sys/module/nbd`).
    pub nbd: bool,
}

impl Probes {
    /// Reads the probes from this host.
    pub fn host() -> Self {
        Probes {
            ublk: Path::new("/dev/ublk-control").exists(),
            nbd: Path::new("/sys/module/nbd").exists(),
        }
    }
}

impl Choice {
    /// Resolves to a backend this build can drive on a host with `probes`.
    pub fn resolve(self, probes: Probes) -> Result<Backend> {
        match self {
            // ublk and nbd are preferred once implemented; today fuse is the one we drive.
            Choice::Auto => Ok(Backend::Fuse),
            Choice::Fixed(Backend::Fuse) => Ok(Backend::Fuse),
            Choice::Fixed(b @ (Backend::Nbd | Backend::Ublk)) => {
                let present = if b == Backend::Nbd { probes.nbd } else { probes.ublk };
                Err(Error::FailedPrecondition(format!(
                    "the {b:?} device backend is not available in this build (kernel module {})",
                    if present { "present" } else { "absent" }
                )))
            }
        }
    }

    /// The export a backend needs from the daemon.
    pub fn export_kind(backend: Backend) -> ExportKind {
        match backend {
            Backend::Fuse => ExportKind::Fuse,
            Backend::Nbd | Backend::Ublk => ExportKind::Nbd,
        }
    }
}

/// Attaches a kernel device to an export; returns the device node.
pub async fn attach(
    backend: Backend,
    endpoint: &ExportEndpoint,
    direct_io_safe: bool,
) -> Result<PathBuf> {
    match backend {
        Backend::Fuse => fuse_loop::attach(&endpoint.path, direct_io_safe).await,
        Backend::Nbd | Backend::Ublk => {
            Err(Error::FailedPrecondition(format!("{backend:?} devices are not built yet")))
        }
    }
}

/// Detaches a kernel device (idempotent).
pub async fn detach(backend: Backend, device: &Path) -> Result<()> {
    match backend {
        Backend::Fuse => fuse_loop::detach(device).await,
        Backend::Nbd | Backend::Ublk => Ok(()),
    }
}

/// Makes the kernel re-read the export's size after a resize.
pub async fn refresh_size(backend: Backend, device: &Path) -> Result<()> {
    match backend {
        Backend::Fuse => fuse_loop::refresh(device).await,
        Backend::Nbd | Backend::Ublk => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_a_backend_this_build_drives_and_missing_ones_are_refused() {
        let none = Probes { ublk: false, nbd: false };
        let all = Probes { ublk: true, nbd: true };
        assert_eq!(Choice::Auto.resolve(none).ok(), Some(Backend::Fuse));
        assert_eq!(Choice::Auto.resolve(all).ok(), Some(Backend::Fuse));
        assert!(Choice::Fixed(Backend::Nbd).resolve(all).is_err());
        assert_eq!("fuse".parse::<Choice>().ok(), Some(Choice::Fixed(Backend::Fuse)));
        assert!("iscsi".parse::<Choice>().is_err());
    }
}
