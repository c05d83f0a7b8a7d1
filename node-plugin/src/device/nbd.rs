//! The kernel NBD client, configured over generic netlink (family `nbd`).
//!
//! ```text
//!   nbd_client::negotiate (userspace, NBD_OPT_GO) ──► socket fd + size + flags
//!   NBD_CMD_CONNECT {size, block size, server flags, timeouts, backend id, sockets:[fd]} ──► /dev/nbdN
//!   daemon restarted / export re-created ──► negotiate again ──► NBD_CMD_RECONFIGURE {index, size, sockets}
//!   NBD_CMD_DISCONNECT {index}
//! ```
//! The dead-connection timeout keeps I/O queued (not failed) while the socket is being replaced;
//! there is no I/O timeout, so a slow daemon delays requests rather than breaking the link.
//! The family resolves only when `nbd.ko` is loaded: that is the cheap probe.

use std::path::{Path, PathBuf};

use super::nbd_client::Connection;
use crate::error::{Error, Result};
use crate::graph::ExportEndpoint;
use crate::sys::GenericNetlink;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

/// The I/O timeout we give the kernel: none. With one, a request the daemon takes longer than
/// that to answer (slow or stalled storage) makes the kernel declare the link dead and wait
/// for a RECONFIGURE that nothing sends while the daemon lives: the request then fails at the
/// dead-connection timeout. Without one, the kernel logs a possibly stuck request and keeps
/// waiting, like a slow disk (and like the ublk backend). A daemon that dies closes the socket,
/// which the kernel notices without a timeout; the node re-attaches after the restart.
const IO_TIMEOUT_S: u64 = 0;
/// Seconds the kernel keeps queued I/O while the connection is being replaced.
const DEAD_CONN_TIMEOUT_S: u64 = 120;

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize((out.len() + 3) & !3, 0);
}

fn attrs(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some((kind, value))
    })
}

fn netlink_error(op: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(op, "/dev/nbd (netlink)", e)
}

/// Resolves the `nbd` generic netlink family; `None` when the module is not loaded.
pub fn family() -> Option<u16> {
    let mut nl = GenericNetlink::open().ok()?;
    let mut request = Vec::new();
    attr(&mut request, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
    let replies = nl.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &request).ok()?;
    let id = replies.iter().flat_map(|r| attrs(r)).find_map(|(kind, value)| {
        (kind == CTRL_ATTR_FAMILY_ID && value.len() >= 2)
            .then(|| u16::from_ne_bytes([value[0], value[1]]))
    });
    id
}

fn size_attrs(request: &mut Vec<u8>, conn: &Connection) {
    let export = conn.export();
    attr(request, NBD_ATTR_SIZE_BYTES, &export.size.to_ne_bytes());
    attr(request, NBD_ATTR_SERVER_FLAGS, &u64::from(export.flags).to_ne_bytes());
}

fn socket_attrs(request: &mut Vec<u8>, conn: &Connection) {
    attr(request, NBD_ATTR_TIMEOUT, &IO_TIMEOUT_S.to_ne_bytes());
    attr(request, NBD_ATTR_DEAD_CONN_TIMEOUT, &DEAD_CONN_TIMEOUT_S.to_ne_bytes());
    let mut fd = Vec::new();
    attr(&mut fd, NBD_SOCK_FD, &(conn.raw_fd() as u32).to_ne_bytes());
    let mut item = Vec::new();
    attr(&mut item, NBD_SOCK_ITEM | NLA_F_NESTED, &fd);
    attr(request, NBD_ATTR_SOCKETS | NLA_F_NESTED, &item);
}

/// The backend identifier ties a device to its volume; connect and reconfigure must agree.
fn backend_attr(request: &mut Vec<u8>, backend_id: &str) {
    let mut id = backend_id.as_bytes().to_vec();
    id.push(0);
    attr(request, NBD_ATTR_BACKEND_IDENTIFIER, &id);
}

fn index_of(device: &Path) -> Result<u32> {
    super::device_number(device, "nbd", "an NBD")
}

/// Negotiates the export and hands the socket to a free kernel NBD device; returns `/dev/nbdN`.
pub async fn attach(endpoint: &ExportEndpoint, backend_id: &str) -> Result<PathBuf> {
    let family = family()
        .ok_or_else(|| Error::FailedPrecondition("the nbd kernel module is not loaded".into()))?;
    let conn = Connection::open(&endpoint.path, &endpoint.name).await?;
    let mut request = Vec::new();
    size_attrs(&mut request, &conn);
    socket_attrs(&mut request, &conn);
    attr(&mut request, NBD_ATTR_BLOCK_SIZE_BYTES, &4096u64.to_ne_bytes());
    backend_attr(&mut request, backend_id);
    let replies = GenericNetlink::open()
        .and_then(|mut nl| nl.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &request))
        .map_err(netlink_error("NBD_CMD_CONNECT"))?;
    // The kernel took its own reference to the socket; ours closes with `conn`.
    drop(conn);
    let index = replies
        .iter()
        .flat_map(|r| attrs(r))
        .find_map(|(kind, v)| {
            (kind == NBD_ATTR_INDEX && v.len() >= 4)
                .then(|| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
        })
        .ok_or_else(|| {
            Error::Inconsistent("NBD_CMD_CONNECT answered without a device index".into())
        })?;
    Ok(PathBuf::from(format!("/dev/nbd{index}")))
}

/// Gives a connected device a fresh socket (after the daemon restarted or the export was
/// re-created) and the export's current size.
/// `backend_id` must be the identifier the device was connected with (the kernel insists).
///
/// Two requests, the socket first: since Linux 6.9 a size change freezes the device's queue,
/// which waits for every request in flight, and requests queued while the old connection was
/// dead complete only over the new one. Both in one RECONFIGURE (the kernel applies the size
/// first) held the device until the dead-connection timeout failed those requests.
pub async fn reconnect(endpoint: &ExportEndpoint, device: &Path, backend_id: &str) -> Result<()> {
    let family = family()
        .ok_or_else(|| Error::FailedPrecondition("the nbd kernel module is not loaded".into()))?;
    let conn = Connection::open(&endpoint.path, &endpoint.name).await?;
    let index = index_of(device)?;
    let reconfigure = |fill: &dyn Fn(&mut Vec<u8>)| {
        let mut request = Vec::new();
        attr(&mut request, NBD_ATTR_INDEX, &index.to_ne_bytes());
        fill(&mut request);
        backend_attr(&mut request, backend_id);
        GenericNetlink::open()
            .and_then(|mut nl| nl.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &request))
            .map_err(netlink_error("NBD_CMD_RECONFIGURE"))
    };
    reconfigure(&|r| socket_attrs(r, &conn))?;
    reconfigure(&|r| size_attrs(r, &conn))?;
    Ok(())
}

/// A connected NBD device's backend identifier (`/sys/block/nbdN/backend`).
pub fn backend_of(device: &Path) -> Option<String> {
    let name = device.file_name()?;
    let text = std::fs::read_to_string(Path::new("/sys/block").join(name).join("backend")).ok()?;
    Some(text.trim().to_owned())
}

/// The NBD devices whose backend identifier (`/sys/block/nbdN/backend`) is `backend_id`.
pub fn with_backend(backend_id: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("nbd"))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .filter(|dev| backend_of(dev).is_some_and(|b| b == backend_id))
        .collect()
}

/// Disconnects a device (idempotent).
pub async fn detach(device: &Path) -> Result<()> {
    let Some(family) = family() else { return Ok(()) };
    let mut request = Vec::new();
    attr(&mut request, NBD_ATTR_INDEX, &index_of(device)?.to_ne_bytes());
    match GenericNetlink::open()
        .and_then(|mut nl| nl.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &request))
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()), // not connected
        Err(e) => Err(netlink_error("NBD_CMD_DISCONNECT")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut buf = Vec::new();
        attr(&mut buf, 7, b"abc");
        attr(&mut buf, 2 | NLA_F_NESTED, &5u64.to_ne_bytes());
        assert_eq!(buf.len() % 4, 0);
        let parsed: Vec<_> = attrs(&buf).collect();
        assert_eq!(parsed, vec![(7, &b"abc"[..]), (2, &5u64.to_ne_bytes()[..])]);
    }

    #[test]
    fn the_family_probe_agrees_with_the_loaded_modules() {
        // A real GETFAMILY round trip: resolves exactly when nbd.ko is loaded.
        assert_eq!(family().is_some(), Path::new("/sys/module/nbd").exists());
    }

    #[test]
    fn device_indexes_come_from_the_device_name() {
        assert_eq!(index_of(Path::new("/dev/nbd12")).ok(), Some(12));
        assert!(index_of(Path::new("/dev/loop0")).is_err());
    }
}
