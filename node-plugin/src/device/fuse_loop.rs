//! The fallback device: the daemon's FUSE export file under a loop device.
//!
//! The loop device stays *buffered* unless the daemon is QEMU ≥ 10.1: before that, the FUSE export
//! corrupts data under parallel O_DIRECT writes.

use std::path::{Path, PathBuf};

use crate::command::run;
use crate::error::{Error, Result};

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

/// The file a loop device reads (`/sys/block/loopN/loop/backing_file`); `None` when the
/// device is unbound or not a loop device.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?;
    let path = Path::new("/sys/block").join(name).join("loop/backing_file");
    let text = std::fs::read_to_string(path).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// The loop devices over `file` (`losetup --associated`).
pub async fn over_file(file: &Path) -> Result<Vec<PathBuf>> {
    if !file.exists() {
        return Ok(Vec::new());
    }
    let out = run(
        "losetup",
        &["--list", "--noheadings", "--output", "NAME", "--associated"]
            .map(std::ffi::OsStr::new)
            .into_iter()
            .chain([file.as_os_str()])
            .collect::<Vec<_>>(),
    )
    .await?;
    Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from).collect())
}

/// How long a grown export file may take to show its new size.
const RESIZE_VISIBLE: std::time::Duration = std::time::Duration::from_secs(10);

/// `losetup -c`: the loop device re-reads the size of `file`, the export, which has grown to
/// `expected` bytes. The kernel caches a FUSE file's attributes (the daemon grants them for a
/// second), and the loop driver takes the size from that cache: so the size is first asked of
/// the daemon (`sys::fresh_size`, which refreshes the cache; retried until the deadline in
/// case the daemon is not yet answering with it) before the device re-reads it, and the
/// device's new size is checked.
pub async fn refresh(device: &Path, file: &Path, expected: u64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + RESIZE_VISIBLE;
    loop {
        let size = crate::sys::fresh_size(file).map_err(|e| Error::io("statx", file, e))?;
        if size >= expected {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Command {
                program: "stat".into(),
                stderr: format!(
                    "the export {} still shows {size} bytes after {} s, not {expected}",
                    file.display(),
                    RESIZE_VISIBLE.as_secs()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // retry the daemon
    }
    run("losetup", &["-c".as_ref(), device.as_os_str()]).await?;
    let now = crate::mount::device_size(device).await?;
    if now < expected {
        return Err(Error::Command {
            program: "losetup".into(),
            stderr: format!("{} shows {now} bytes after -c, not {expected}", device.display()),
        });
    }
    Ok(())
}
