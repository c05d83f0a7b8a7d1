//! The fallback device: the daemon's FUSE export file under a loop device.
//!
//! The loop device stays *buffered* unless the daemon is QEMU ≥ 10.1: before that, the FUSE export
//! corrupts data under parallel O_DIRECT writes.

use std::path::{Path, PathBuf};

use crate::command::run;
use crate::error::Result;

/// `losetup --find --show` over the export file.
pub async fn attach(file: &Path, direct_io_safe: bool) -> Result<PathBuf> {
    let direct = if direct_io_safe { "--direct-io=on" } else { "--direct-io=off" };
    let out =
        run("losetup", &["--find".as_ref(), "--show".as_ref(), direct.as_ref(), file.as_os_str()])
            .await?;
    Ok(PathBuf::from(out.trim()))
}

/// `losetup -d`; a device that is already gone is fine.
pub async fn detach(device: &Path) -> Result<()> {
    if !device.exists() {
        return Ok(());
    }
    match run("losetup", &["-d".as_ref(), device.as_os_str()]).await {
        Ok(_) => Ok(()),
        Err(crate::Error::Command { stderr, .. }) if stderr.contains("No such device") => Ok(()),
        Err(e) => Err(e),
    }
}

/// `losetup -c`: re-read the backing file's size.
pub async fn refresh(device: &Path) -> Result<()> {
    run("losetup", &["-c".as_ref(), device.as_os_str()]).await.map(|_| ())
}
