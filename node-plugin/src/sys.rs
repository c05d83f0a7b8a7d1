//! The only module allowed to use `unsafe`: process attributes set between fork and exec.
#![allow(unsafe_code)]

use std::io;

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
