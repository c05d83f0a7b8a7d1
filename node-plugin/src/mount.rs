//! Filesystems on volumes: probe, format (the Node service formats only a device with no
//! filesystem), mount, bind, grow,
//! and usage statistics. Every tool runs through [`crate::command::run`].

use std::path::Path;

use crate::command::run;
use crate::error::{Error, Result};

/// Filesystems we format and grow.
pub use qsd_csi_model::params::SUPPORTED_FS;

/// Whether `path` is a mount point (from `/proc/self/mountinfo`).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let target = path.display().to_string();
    // Field 5 is the mount point; spaces are escaped as \040.
    mounts.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| m.replace("\\040", " ") == target)
}

/// Every mount point whose source is `device` (matched by its major:minor in mountinfo).
pub fn mounts_of(device: &Path) -> Result<Vec<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(device) else { return Ok(Vec::new()) };
    let rdev = meta.rdev();
    let id = format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/self/mountinfo", e))?;
    Ok(mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && f[2] == id)
        .map(|f| std::path::PathBuf::from(f[4].replace("\\040", " ")))
        .collect())
}

/// The filesystem type on a device, or `None` if it holds none that blkid recognizes.
pub async fn probe_fs(device: &Path) -> Result<Option<String>> {
    // blkid exits 2 when it finds nothing; that is an answer, not an error.
    match run(
        "blkid",
        &[
            "-p".as_ref(),
            "-s".as_ref(),
            "TYPE".as_ref(),
            "-o".as_ref(),
            "value".as_ref(),
            device.as_os_str(),
        ],
    )
    .await
    {
        Ok(out) => Ok(Some(out.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(Error::Command { stderr, .. }) if stderr.starts_with("exit status: 2") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes a `fs_type` filesystem on `device`, whatever it holds: callers decide
/// (`csi::decide::format_step`) that it holds nothing, or only what a killed mkfs of ours left.
pub async fn format(device: &Path, fs_type: &str) -> Result<()> {
    let mkfs = format!("mkfs.{fs_type}");
    let force = if fs_type == "xfs" { "-f" } else { "-F" };
    // Quiet, and no discard pass over a thin image (it would only waste time).
    let nodiscard = if fs_type == "xfs" { "-K" } else { "-E" };
    let mut args: Vec<&std::ffi::OsStr> = vec![force.as_ref(), nodiscard.as_ref()];
    if fs_type != "xfs" {
        args.push("nodiscard".as_ref());
        args.push("-q".as_ref());
    }
    args.push(device.as_os_str());
    run(&mkfs, &args).await.map(|_| ())
}

/// Erases every filesystem signature on `device` (`wipefs -a`): what undoes a mkfs that was
/// killed half-way, so the next stage sees an empty device and formats it whole.
pub async fn wipe(device: &Path) -> Result<()> {
    run("wipefs", &["-a".as_ref(), "-q".as_ref(), device.as_os_str()]).await.map(drop)
}

/// Mounts `source` on `target` (created if missing) with `fs_type` and `options`.
pub async fn mount(
    source: &Path,
    target: &Path,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|e| Error::io("create mount point", target, e))?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(t) = fs_type {
        args.extend(["-t".into(), t.into()]);
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.join(",").into()]);
    }
    args.extend([source.as_os_str().to_owned(), target.as_os_str().to_owned()]);
    run("mount", &args).await.map(|_| ())
}

/// Bind-mounts `source` onto `target`; read-only if asked (a second remount is needed for it).
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    run("mount", &["--bind".as_ref(), source.as_os_str(), target.as_os_str()]).await?;
    if read_only {
        run("mount", &["-o".as_ref(), "remount,bind,ro".as_ref(), target.as_os_str()]).await?;
    }
    Ok(())
}

/// Unmounts `target` if it is mounted.
pub async fn unmount(target: &Path) -> Result<()> {
    if is_mountpoint(target) {
        run("umount", &[target.as_os_str()]).await?;
    }
    Ok(())
}

/// resize2fs on a mounted ext filesystem needs CAP_SYS_RESOURCE (the online-resize ioctl).
/// Without it, the user learns that, not "Permission denied".
fn ext_growth_error(error: Error, has_cap_sys_resource: bool) -> Error {
    match &error {
        Error::Command { stderr, .. }
            if !has_cap_sys_resource && stderr.contains("Permission denied") =>
        {
            Error::FailedPrecondition(
                "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this node \
                 plugin does not hold (a privileged container has it): the volume and its device \
                 have grown, the filesystem has not"
                    .into(),
            )
        }
        _ => error,
    }
}

/// Grows the filesystem mounted at `mountpoint` (on `device`) to fill the device.
pub async fn grow_fs(device: &Path, mountpoint: &Path) -> Result<()> {
    match probe_fs(device).await?.as_deref() {
        Some("xfs") => run("xfs_growfs", &[mountpoint.as_os_str()]).await.map(|_| ()),
        Some(t) if t.starts_with("ext") => run("resize2fs", &[device.as_os_str()])
            .await
            .map(|_| ())
            .map_err(|e| ext_growth_error(e, crate::sys::has_cap_sys_resource())),
        Some(other) => Err(Error::FailedPrecondition(format!("cannot grow a {other} filesystem"))),
        None => Ok(()),
    }
}

/// Bytes an ext filesystem on `device` spans, from its superblock.
async fn ext_fs_bytes(device: &Path) -> Result<u64> {
    let header = run("dumpe2fs", &["-h".as_ref(), device.as_os_str()]).await?;
    let field = |name: &str| {
        header.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).ok_or_else(
            || Error::Command {
                program: "dumpe2fs".into(),
                stderr: format!("no {name:?} in its output for {}", device.display()),
            },
        )
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Before staging: an ext filesystem (`fs_type`, what `device` holds) smaller than its device
/// (a snapshot restored, or a volume cloned, into a larger volume) is grown to fill it while
/// unmounted, which needs no CAP_SYS_RESOURCE (e2fsck first, as resize2fs requires). Returns
/// whether it grew.
pub async fn grow_unmounted_ext(device: &Path, fs_type: &str) -> Result<bool> {
    if !fs_type.starts_with("ext") {
        return Ok(false);
    }
    if ext_fs_bytes(device).await? >= device_size(device).await? {
        return Ok(false);
    }
    // -p repairs only what is safe unattended; exit status 1 means "errors corrected".
    let checked = crate::command::run_for_status(
        "e2fsck",
        &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
    )
    .await?;
    if checked.status.code().is_none_or(|c| c > 1) {
        return Err(Error::FailedPrecondition(format!(
            "{} needs a filesystem check before it can grow (e2fsck -f -p: {}: {})",
            device.display(),
            checked.status,
            String::from_utf8_lossy(&checked.stderr).trim()
        )));
    }
    run("resize2fs", &[device.as_os_str()]).await?;
    Ok(true)
}

/// After staging: an xfs filesystem (`fs_type`; xfs grows only mounted) smaller than its device
/// is grown to fill it. Returns whether it grew.
pub async fn grow_mounted_xfs(device: &Path, mountpoint: &Path, fs_type: &str) -> Result<bool> {
    if fs_type != "xfs" {
        return Ok(false);
    }
    let info = run("xfs_info", &[mountpoint.as_os_str()]).await?;
    // "data     =                       bsize=4096   blocks=81920, imaxpct=25"
    let data = info.lines().find(|l| l.trim_start().starts_with("data")).unwrap_or_default();
    let number =
        |key: &str| data.split([' ', ',']).find_map(|w| w.strip_prefix(key)?.parse::<u64>().ok());
    let (Some(bsize), Some(blocks)) = (number("bsize="), number("blocks=")) else {
        return Err(Error::Command {
            program: "xfs_info".into(),
            stderr: format!("no data section size in: {info}"),
        });
    };
    if bsize * blocks >= device_size(device).await? {
        return Ok(false);
    }
    run("xfs_growfs", &[mountpoint.as_os_str()]).await?;
    Ok(true)
}

/// Bytes and inodes of the filesystem at `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    /// Total bytes.
    pub bytes_total: u64,
    /// Bytes available to unprivileged users.
    pub bytes_available: u64,
    /// Bytes used.
    pub bytes_used: u64,
    /// Total inodes.
    pub inodes_total: u64,
    /// Free inodes.
    pub inodes_free: u64,
}

/// Usage of the filesystem at `path`.
pub fn usage(path: &Path) -> Result<FsUsage> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::io("statvfs", path, e.into()))?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    Ok(FsUsage {
        bytes_total: total,
        bytes_available: st.blocks_available() as u64 * frag,
        bytes_used: total.saturating_sub(free),
        inodes_total: st.files() as u64,
        inodes_free: st.files_free() as u64,
    })
}

/// Size in bytes of a block device.
pub async fn device_size(device: &Path) -> Result<u64> {
    let out = run("blockdev", &["--getsize64".as_ref(), device.as_os_str()]).await?;
    out.trim().parse().map_err(|_| Error::Command {
        program: "blockdev".into(),
        stderr: format!("unexpected output {out:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_growth_refused_for_a_missing_capability_is_a_failed_precondition_that_names_it() {
        let denied = || Error::Command {
            program: "resize2fs".into(),
            stderr: "resize2fs: Permission denied to resize filesystem".into(),
        };
        let e = ext_growth_error(denied(), false);
        assert_eq!(e.kind(), crate::ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("CAP_SYS_RESOURCE"), "{e}");
        assert_eq!(ext_growth_error(denied(), true).kind(), crate::ErrorKind::Internal, "with it");
        let other = Error::Command { program: "resize2fs".into(), stderr: "bad superblock".into() };
        assert_eq!(ext_growth_error(other, false).kind(), crate::ErrorKind::Internal);
    }
}

/// What the CSI Node service does to filesystems and mounts, as one seam: the service is
/// handed a mounter when it is built ([`HostMounter`] runs the real commands), so its
/// decisions can be exercised without root.
#[tonic::async_trait]
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Whether `path` is a mount point.
    fn is_mountpoint(&self, path: &Path) -> bool;
    /// Where `device` is mounted.
    fn mounts_of(&self, device: &Path) -> Result<Vec<std::path::PathBuf>>;
    /// The filesystem on `device`, if blkid recognizes one.
    async fn probe_fs(&self, device: &Path) -> Result<Option<String>>;
    /// Makes a `fs_type` filesystem on `device`, whatever it holds.
    async fn format(&self, device: &Path, fs_type: &str) -> Result<()>;
    /// Erases every filesystem signature on `device`.
    async fn wipe(&self, device: &Path) -> Result<()>;
    /// Grows an unmounted ext filesystem to its device; whether it grew.
    async fn grow_unmounted_ext(&self, device: &Path, fs_type: &str) -> Result<bool>;
    /// Mounts `device` at `target`.
    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: Option<&str>,
        flags: &[String],
    ) -> Result<()>;
    /// Grows a mounted xfs to its device; whether it grew.
    async fn grow_mounted_xfs(&self, device: &Path, target: &Path, fs_type: &str) -> Result<bool>;
    /// Bind-mounts `source` on `target`.
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts `target` (nothing mounted there is fine).
    async fn unmount(&self, target: &Path) -> Result<()>;
    /// Grows the filesystem of `device` mounted at `mountpoint`.
    async fn grow_fs(&self, device: &Path, mountpoint: &Path) -> Result<()>;
    /// The size of a block device.
    async fn device_size(&self, device: &Path) -> Result<u64>;
    /// Space and inodes of the filesystem at `path`.
    fn usage(&self, path: &Path) -> Result<FsUsage>;
}

/// The host's mounts, through this module's functions.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMounter;

#[tonic::async_trait]
impl Mounter for HostMounter {
    fn is_mountpoint(&self, path: &Path) -> bool {
        is_mountpoint(path)
    }
    fn mounts_of(&self, device: &Path) -> Result<Vec<std::path::PathBuf>> {
        mounts_of(device)
    }
    async fn probe_fs(&self, device: &Path) -> Result<Option<String>> {
        probe_fs(device).await
    }
    async fn format(&self, device: &Path, fs_type: &str) -> Result<()> {
        format(device, fs_type).await
    }
    async fn wipe(&self, device: &Path) -> Result<()> {
        wipe(device).await
    }
    async fn grow_unmounted_ext(&self, device: &Path, fs_type: &str) -> Result<bool> {
        grow_unmounted_ext(device, fs_type).await
    }
    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: Option<&str>,
        flags: &[String],
    ) -> Result<()> {
        mount(device, target, fs_type, flags).await
    }
    async fn grow_mounted_xfs(&self, device: &Path, target: &Path, fs_type: &str) -> Result<bool> {
        grow_mounted_xfs(device, target, fs_type).await
    }
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        bind(source, target, read_only).await
    }
    async fn unmount(&self, target: &Path) -> Result<()> {
        unmount(target).await
    }
    async fn grow_fs(&self, device: &Path, mountpoint: &Path) -> Result<()> {
        grow_fs(device, mountpoint).await
    }
    async fn device_size(&self, device: &Path) -> Result<u64> {
        device_size(device).await
    }
    fn usage(&self, path: &Path) -> Result<FsUsage> {
        usage(path)
    }
}
