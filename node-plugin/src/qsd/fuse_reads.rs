//! Keeping qemu-storage-daemon's FUSE exports from stopping the whole daemon (QEMU before 10.1).
//!
//! Such a daemon serves every FUSE export from its main loop: once the loop sees an export's
//! `/dev/fuse` descriptor readable, it reads one request from it, and that read blocks. A request
//! can leave the queue in between: the kernel drops a request nobody has read yet when the
//! process that made it is killed (a `losetup` dying with a SIGKILLed plugin, a `stat` stopped
//! by SIGKILL). The read then waits for that export's *next* request, and the daemon with it:
//! no QMP answer, no I/O on any other volume, and a plugin started again meets a monitor that
//! never greets it. Seen here under the storm test (`driver/tests/storm.rs`): about once in 70
//! kills.
//!
//! O_NONBLOCK is a flag of the open file description, which a duplicate made with
//! `pidfd_getfd(2)` shares with the daemon. Set there, the daemon's read returns EAGAIN, which
//! its FUSE loop takes as "nothing to read". [`guard`] sets it on every FUSE descriptor of the
//! daemon after each export is added; [`free`] releases a daemon found stuck when the plugin
//! starts. Both need the daemon's pid and the right to inspect it (`CAP_SYS_PTRACE`, which a
//! privileged container has).

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

const FUSE_DEVICE: &str = "/dev/fuse";

/// How long [`free`] waits for the requests it sends to be answered.
const POKE_ANSWERED_WITHIN: Duration = Duration::from_secs(5);

/// Sets O_NONBLOCK on every `/dev/fuse` descriptor of process `pid`; how many it changed.
pub fn guard(pid: u32) -> io::Result<usize> {
    let pidfd = open_pidfd(pid)?;
    let device = fuse_device()?;
    let mut changed = 0;
    for fd in fuse_descriptors(pid)? {
        if set_nonblocking(&pidfd, fd, device)? {
            changed += 1;
        }
    }
    Ok(changed)
}

/// The `/dev/fuse` descriptor that process `pid`'s main thread is blocked reading, if it is.
pub fn stuck_on(pid: u32) -> Option<RawFd> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let (number, fd) = parse_syscall(&text)?;
    (number == libc::SYS_read && is_fuse(pid, fd)).then_some(fd)
}

/// The system call number and first argument in a `/proc/PID/syscall` line ("running" or
/// "-1 …" when the thread is not in a system call).
fn parse_syscall(text: &str) -> Option<(i64, RawFd)> {
    let mut fields = text.split_whitespace();
    let number = fields.next()?.parse().ok()?;
    let first = fields.next()?.strip_prefix("0x")?;
    let fd = RawFd::try_from(u64::from_str_radix(first, 16).ok()?).ok()?;
    Some((number, fd))
}

/// Frees a daemon whose main thread waits on an empty FUSE queue: that descriptor made
/// non-blocking, then a request sent to each FUSE file mounted here (a `statx` the kernel must
/// ask the daemon), one of which ends the read. Whether it was stuck.
pub fn free(pid: u32) -> io::Result<bool> {
    let Some(fd) = stuck_on(pid) else { return Ok(false) };
    set_nonblocking(&open_pidfd(pid)?, fd, fuse_device()?)?;
    poke(fuse_mounts()?);
    Ok(true)
}

pub(super) fn open_pidfd(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("pid {pid}")))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// `/dev/fuse`'s device number, to tell a duplicated descriptor is still it.
fn fuse_device() -> io::Result<u64> {
    Ok(std::fs::metadata(FUSE_DEVICE)?.rdev())
}

fn is_fuse(pid: u32, fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|t| t == Path::new(FUSE_DEVICE))
}

/// The daemon's descriptors open on `/dev/fuse`.
fn fuse_descriptors(pid: u32) -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else { continue };
        if is_fuse(pid, fd) {
            fds.push(fd);
        }
    }
    Ok(fds)
}

/// Sets O_NONBLOCK on the daemon's descriptor `fd` through a duplicate; whether it changed.
/// A descriptor closed (or reused for something else) since it was listed is left alone.
fn set_nonblocking(pidfd: &OwnedFd, fd: RawFd, device: u64) -> io::Result<bool> {
    let duplicate = match pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty()) {
        Ok(duplicate) => duplicate,
        Err(rustix::io::Errno::BADF) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let file = std::fs::File::from(duplicate);
    let metadata = file.metadata()?;
    if !metadata.file_type().is_char_device() || metadata.rdev() != device {
        return Ok(false);
    }
    let flags = fcntl_getfl(file.as_fd())?;
    if flags.contains(OFlags::NONBLOCK) {
        return Ok(false);
    }
    fcntl_setfl(file.as_fd(), flags | OFlags::NONBLOCK)?;
    Ok(true)
}

/// Where FUSE filesystems served through `/dev/fuse` are mounted, from this process's view.
fn fuse_mounts() -> io::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table.lines().filter_map(fuse_mount_point).collect())
}

/// The mount point of a `mountinfo` line of type `fuse` mounted from `/dev/fuse`.
fn fuse_mount_point(line: &str) -> Option<PathBuf> {
    let (before, after) = line.split_once(" - ")?;
    let mut tail = after.split_whitespace();
    if tail.next()? != "fuse" || tail.next()? != FUSE_DEVICE {
        return None;
    }
    before.split_whitespace().nth(4).map(|p| PathBuf::from(unescape(p)))
}

/// `mountinfo` writes space, tab, newline and backslash in paths as octal escapes.
fn unescape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Asks each mount's server for fresh attributes, each from a thread of its own (a request
/// waits until the stuck read is over), and waits a while for the answers. A thread still
/// waiting then (another FUSE server that does not answer) is left to finish on its own.
fn poke(mounts: Vec<PathBuf>) {
    let (answered, answers) = std::sync::mpsc::channel();
    let count = mounts.len();
    for mount in mounts {
        let answered = answered.clone();
        let spawned = std::thread::Builder::new().name("fuse-poke".into()).spawn(move || {
            let _ = crate::sys::fresh_size(&mount);
            let _ = answered.send(());
        });
        if spawned.is_err() {
            break;
        }
    }
    let deadline = std::time::Instant::now() + POKE_ANSWERED_WITHIN;
    for _ in 0..count {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if answers.recv_timeout(left).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syscall_line_gives_its_number_and_first_argument() {
        let line = "0 0x9d 0x7fae3e62c010 0x101000 0xd540fd283ed8a8e6 0x0 0x55bb4d233e50 \
                    0x7fffd7d673e0 0x7fae640e92ec\n";
        assert_eq!(parse_syscall(line), Some((0, 157)));
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7fff 0x4000\n"), Some((-1, 0x7fff)));
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn only_fuse_mounts_from_dev_fuse_are_poked_with_their_paths_unescaped() {
        let lines = [
            ("45 27 0:40 / /var/lib/qsd-csi/exports/a.img rw,nosuid - fuse /dev/fuse rw,user_id=0", Some("/var/lib/qsd-csi/exports/a.img")),
            ("46 27 0:41 / /tmp/with\\040space.img rw - fuse /dev/fuse rw", Some("/tmp/with space.img")),
            ("47 27 0:42 / /mnt/sshfs rw - fuse.sshfs host:/ rw", None),
            ("48 27 0:43 / /sys/fs/fuse/connections rw - fusectl fusectl rw", None),
            ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw", None),
        ];
        for (line, want) in lines {
            assert_eq!(fuse_mount_point(line), want.map(PathBuf::from), "{line}");
        }
        assert_eq!(unescape("a\\134b\\011c\\"), "a\\b\tc\\");
    }
}
