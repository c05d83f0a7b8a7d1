//! The only module allowed to use `unsafe`: process and thread attributes, a generic netlink
//! socket, descriptor duplication, a file size asked of its filesystem, and filesystem
//! freeze / thaw.
#![allow(unsafe_code)]

use std::io;

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// FIFREEZE on the filesystem holding the open `file` (blocks until its writes drain).
pub fn freeze_fs(file: &std::fs::File) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let mut ignored: libc::c_int = 0;
    // SAFETY: FIFREEZE takes a pointer to an int it ignores; the descriptor is open.
    unsafe { fifreeze(file.as_raw_fd(), &mut ignored) }.map(drop)
}

/// FITHAW on the filesystem holding the open `file` (EINVAL: it was not frozen).
pub fn thaw_fs(file: &std::fs::File) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let mut ignored: libc::c_int = 0;
    // SAFETY: FITHAW takes a pointer to an int it ignores; the descriptor is open.
    unsafe { fithaw(file.as_raw_fd(), &mut ignored) }.map(drop)
}

/// Has the kernel SIGKILL the command's process when the thread that spawned it dies: a
/// helper (mkfs on a volume being staged, say) must not outlive a killed plugin and go on
/// writing to a device the restarted plugin tears down or formats again.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed; prctl is a plain system call.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Hands the command the open descriptor `fd` as its descriptor `target` (without
/// close-on-exec there): a listening socket made here, served by the child.
pub fn pass_fd(
    command: &mut tokio::process::Command,
    fd: std::os::fd::RawFd,
    target: std::os::fd::RawFd,
) {
    // SAFETY: runs in the child between fork and exec; dup2 and fcntl are plain system calls.
    // `fd` stays open in the parent until the child is spawned (the caller owns it).
    unsafe {
        command.pre_exec(move || {
            if fd == target {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags == -1 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `prctl` option that marks a task as part of the I/O path (Linux 5.6+).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// CAP_SYS_RESOURCE's bit in the capability sets.
const CAP_SYS_RESOURCE: u32 = 24;

/// True when this process holds CAP_SYS_RESOURCE, which both attributes below require.
/// (Privileged pods have it; some sandboxes withhold it.)
pub fn has_cap_sys_resource() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The size of `path` as its filesystem reports it now: `statx` with `AT_STATX_FORCE_SYNC`,
/// which makes FUSE ask the daemon instead of answering from its attribute cache (and updates
/// the cached size that the loop driver reads).
pub fn fresh_size(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statx only writes into `buf`, a zeroed statx owned by this frame; `path` is a
    // valid NUL-terminated string for the call's duration.
    unsafe {
        let mut buf: libc::statx = std::mem::zeroed();
        if libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_SIZE,
            &mut buf,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(buf.stx_size)
    }
}

/// Makes the command's process an I/O flusher and unkillable by the OOM killer, before it execs.
///
/// A userspace block server whose device is used on the same host can otherwise deadlock in
/// memory reclaim: reclaim waits on writeback that waits on the server, which waits on memory.
/// Both attributes are inherited across fork and exec, so the daemonized child keeps them.
pub fn mark_as_io_server(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (prctl, open, write, close) on stack data; it allocates nothing and takes no locks.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let path = c"/proc/self/oom_score_adj";
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let value = b"-1000";
            let written = libc::write(fd, value.as_ptr().cast(), value.len());
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written != value.len() as isize {
                return Err(error);
            }
            Ok(())
        });
    }
}

/// Raises the command's soft limit on open files to its hard limit, before it execs: the
/// daemon holds a descriptor or more per attached volume (image files, export sockets), and
/// the common soft default of 1,024 would stop it short of a thousand volumes. Raising the
/// soft limit up to the hard one needs no privilege.
pub fn raise_open_files_limit(command: &mut tokio::process::Command) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // SAFETY: the closure runs in the forked child before exec and only makes two raw syscalls
    // (getrlimit, setrlimit, through nix's thin wrappers) on stack data.
    unsafe {
        command.pre_exec(|| {
            let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
            if soft < hard {
                setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
            }
            Ok(())
        });
    }
}

/// A generic netlink socket (`NETLINK_GENERIC`), for the kernel NBD client's `nbd` family.
#[derive(Debug)]
pub struct GenericNetlink {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

/// `nlmsghdr` + `genlmsghdr`.
const HEADER: usize = 16 + 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

impl GenericNetlink {
    /// Opens a generic netlink socket bound to an address the kernel chooses.
    pub fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        Ok(GenericNetlink { fd, seq: 0 })
    }

    /// Sends one request (`attrs` already encoded) and returns the attributes of every data
    /// reply, after the kernel's acknowledgement. A negative acknowledgement is an error.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        use std::os::fd::AsRawFd;
        self.seq = self.seq.wrapping_add(1);
        let len = HEADER + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(attrs);
        // SAFETY: sends `msg.len()` initialized bytes from a live buffer on our own socket; the
        // zeroed sockaddr_nl addresses the kernel (pid 0).
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receives into a live buffer of `buf.len()` bytes owned by this frame.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if mlen < 16 || mlen > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                if kind == NLMSG_ERROR {
                    let code = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(replies);
                }
                if mlen > HEADER {
                    replies.push(rest[HEADER..mlen].to_vec());
                }
                rest = &rest[(mlen + 3) & !3..];
            }
        }
    }
}

/// Marks the calling thread as part of the I/O path (a ublk queue thread serving a device that
/// this host may write back to). Needs CAP_SYS_RESOURCE; without it this is a no-op.
pub fn mark_thread_as_io_flusher() -> io::Result<()> {
    if !has_cap_sys_resource() {
        return Ok(());
    }
    // SAFETY: prctl with integer arguments only; affects the calling thread's flags.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates a descriptor we do not own (for example an io_uring's, to poll it for readiness)
/// into one we do, close-on-exec.
pub fn duplicate_fd(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory; the result is checked before use.
    let raw = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}
