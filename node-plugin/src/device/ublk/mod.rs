//! ublk devices served by this process. The kernel hands each block request to a queue thread
//! over io_uring; the thread forwards it to the daemon's NBD export (QEMU has no ublk export).
//!
//! ```text
//!   /dev/ublkbN ─ io_uring ─► queue thread: one task per tag ─► NBD on nbd.sock ─► daemon
//!                              (smol executor)       pipelined, cookie = tag
//! ```
//! How a device rides out failures:
//! - The daemon dies, or the export is re-created (expand): the NBD link breaks. Requests in
//!   flight wait while the thread reconnects (for up to [`RECONNECT_TIMEOUT`]), then go out
//!   again. NBD requests are idempotent, and one is re-sent only while the kernel still holds it.
//! - A dead daemon also takes the writes it acknowledged but had not flushed (their qcow2
//!   metadata lived in its cache), yet a flush re-sent to its successor would succeed. So the
//!   queue keeps every acknowledged write until a flush covers it (at most [`UNFLUSHED_CAP`]
//!   bytes, then it flushes on its own) and replays them on a new link before anything else.
//! - This process dies: devices are created with `UBLK_F_USER_RECOVERY` and
//!   `UBLK_F_USER_RECOVERY_REISSUE`, so the kernel quiesces the device and keeps its I/O queued.
//!   The restarted plugin calls [`recover`], and the kernel re-issues the requests to it.
//! - Resize: `UBLK_U_CMD_UPDATE_SIZE` needs a driver that advertises `UBLK_F_UPDATE_SIZE`
//!   (Linux 6.16). Older drivers cannot change a started device's size; [`refresh_size`] says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

mod queue;
mod replay;

use super::nbd_client::{self as nbd, Export};
use crate::error::{Error, Result};
use crate::graph::ExportEndpoint;
use queue::serve_queue;

/// How long requests wait for the daemon's export to come back before they fail with EIO.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests in flight per device (one queue).
const DEPTH: u16 = 32;
/// Largest request, bytes. 1 MiB requests gave 1 MiB sequential writes +32–48 % over 256 KiB
/// in the guest benchmark (docs/benchmarks.md); each tag's buffer is touched only as far as
/// requests fill it, so a device doing small I/O keeps little of the depth × 1 MiB resident.
const IO_BUF_BYTES: u32 = 1 << 20;
/// Largest discard or write-zeroes request, sectors (1 GiB; NBD lengths are 32-bit).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Bytes of acknowledged, unflushed writes a queue keeps for replay before it flushes itself.
pub const UNFLUSHED_CAP: usize = 32 << 20;
/// The cookie of replayed requests (tags are below the queue depth).
const REPLAY_COOKIE: u64 = u64::MAX;
/// NBD's "server shutting down": the request was not done; send it again after reconnecting.
const NBD_ESHUTDOWN: u32 = 108;

/// A device this process serves.
struct Server {
    stopping: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Devices served by this process, by device id.
static SERVERS: Mutex<BTreeMap<u32, Server>> = Mutex::new(BTreeMap::new());

fn servers() -> std::sync::MutexGuard<'static, BTreeMap<u32, Server>> {
    SERVERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a device's I/O goes.
#[derive(Debug)]
struct Target {
    socket: PathBuf,
    export: String,
    /// Set by [`detach`]: waiting requests fail instead of waiting for a reconnect.
    stopping: Arc<AtomicBool>,
}

fn ublk_error(op: &'static str, device: impl Into<PathBuf>) -> impl Fn(UblkError) -> Error {
    let device = device.into();
    move |e| {
        let io = match e {
            UblkError::IOError(io) => io,
            UblkError::OtherError(errno) => std::io::Error::from_raw_os_error(-errno),
            other => std::io::Error::other(other.to_string()),
        };
        Error::io(op, &device, io)
    }
}

/// The device id of `/dev/ublkbN`.
fn dev_id(device: &Path) -> Result<u32> {
    super::device_number(device, "ublkb", "a ublk")
}

fn bdev(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// The driver's feature bits (`UBLK_U_CMD_GET_FEATURES`, Linux 6.5+; older drivers report none).
fn driver_features() -> u64 {
    UblkCtrl::get_features().unwrap_or(0)
}

/// True when this kernel's ublk driver can resize a started device.
pub fn can_resize() -> bool {
    driver_features() & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Inconsistent(format!("ublk control task: {e}")))?
}

/// True when this process serves `device`.
pub fn serves(device: &Path) -> bool {
    dev_id(device).is_ok_and(|id| servers().get(&id).is_some_and(|s| !s.thread.is_finished()))
}

/// Creates a ublk device serving the export; returns `/dev/ublkbN`.
pub async fn attach(endpoint: &ExportEndpoint) -> Result<PathBuf> {
    start(endpoint, None).await
}

/// Takes over a device whose server died (this plugin, before a restart): the kernel has kept
/// its I/O queued and re-issues it to us. A device already served here is left alone.
pub async fn recover(endpoint: &ExportEndpoint, device: &Path) -> Result<()> {
    let id = dev_id(device)?;
    if servers().contains_key(&id) {
        return Ok(());
    }
    start(endpoint, Some(id)).await.map(drop)
}

async fn start(endpoint: &ExportEndpoint, recover: Option<u32>) -> Result<PathBuf> {
    let stopping = Arc::new(AtomicBool::new(false));
    let target = Arc::new(Target {
        socket: endpoint.path.clone(),
        export: endpoint.name.clone(),
        stopping: stopping.clone(),
    });
    // A new device takes its size and flags from the export; a recovered one keeps the ones
    // the kernel has.
    let export = match recover {
        None => {
            let t = target.clone();
            let (_, export) = blocking(move || {
                nbd::connect_blocking(&t.socket, &t.export, Duration::from_secs(10))
            })
            .await?;
            Some(export)
        }
        Some(_) => None,
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<u32>>();
    let thread = std::thread::Builder::new()
        .name("ublk-server".into())
        .spawn(move || serve(target, export, recover, ready_tx))
        .map_err(|e| Error::io("start ublk server thread", "/dev/ublk-control", e))?;
    let id = match ready_rx.await {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(Error::Inconsistent(
                "the ublk server ended before its device started".into(),
            ))
        }
    };
    servers().insert(id, Server { stopping, thread });
    Ok(bdev(id))
}

/// The server thread: creates (or recovers) the device, runs its queue and returns when the
/// device is stopped.
fn serve(
    target: Arc<Target>,
    export: Option<Export>,
    recover: Option<u32>,
    ready: tokio::sync::oneshot::Sender<Result<u32>>,
) {
    let ready = Arc::new(Mutex::new(Some(ready)));
    let report = {
        let ready = ready.clone();
        move |r: Result<u32>| {
            if let Some(tx) = ready.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(r);
            }
        }
    };
    let control = "/dev/ublk-control";
    let built = (|| {
        let mut flags = u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
        if driver_features() & u64::from(sys::UBLK_F_UPDATE_SIZE) != 0 {
            flags |= u64::from(sys::UBLK_F_UPDATE_SIZE);
        }
        let (id, dev_flags) = match recover {
            Some(id) => {
                let old = UblkCtrl::new_simple(id as i32)
                    .map_err(ublk_error("open ublk device for recovery", bdev(id)))?;
                old.start_user_recover().map_err(ublk_error("START_USER_RECOVERY", bdev(id)))?;
                (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            }
            None => (-1, UblkFlags::UBLK_DEV_F_ADD_DEV),
        };
        let ctrl = UblkCtrlBuilder::default()
            .name("qsd-csi")
            .id(id)
            .nr_queues(1)
            .depth(DEPTH)
            .io_buf_bytes(IO_BUF_BYTES)
            .ctrl_flags(flags)
            .dev_flags(dev_flags)
            .build()
            .map_err(ublk_error("add ublk device", control))?;
        // The device outlives this thread on purpose: only `detach` deletes it.
        ctrl.disown();
        Ok::<_, Error>(ctrl)
    })();
    let ctrl = match built {
        Ok(ctrl) => ctrl,
        Err(e) => return report(Err(e)),
    };
    let id = ctrl.dev_info().dev_id;
    // A recovered device's size: from the description libublk keeps under /run.
    let size =
        export.map(|e| e.size).or_else(|| ctrl.get_target_from_json().ok().map(|t| t.dev_size));
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size.unwrap_or(0), export.map_or(0, |e| e.flags));
        Ok(())
    };
    let queue_target = target.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &queue_target);
    let started = {
        let report = report.clone();
        move |_: &UblkCtrl| report(Ok(id))
    };
    if let Err(e) = ctrl.run_target(tgt_init, q_fn, started) {
        tracing::error!(device = id, error = %e, "the ublk server failed");
        if recover.is_none() && ready.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            // It never started: take the half-made device away again.
            let _ = ctrl.kill_dev();
            let _ = ctrl.del_dev();
        }
        report(Err(ublk_error("start ublk device", bdev(id))(e)));
    }
}

/// Block-device parameters from the export's size and NBD transmission flags.
fn set_params(dev: &mut UblkDev, size: u64, flags: u16) {
    dev.set_default_params(size);
    let p = &mut dev.tgt.params;
    p.basic.io_min_shift = 9;
    if flags & nbd::TFLAG_READ_ONLY != 0 {
        p.basic.attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if flags & nbd::TFLAG_SEND_FUA != 0 {
        p.basic.attrs |= sys::UBLK_ATTR_FUA;
    }
    if flags & nbd::TFLAG_SEND_TRIM != 0 {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard.discard_granularity = 4096;
        p.discard.max_discard_sectors = MAX_DISCARD_SECTORS;
        p.discard.max_discard_segments = 1;
        if flags & nbd::TFLAG_SEND_WRITE_ZEROES != 0 {
            p.discard.max_write_zeroes_sectors = MAX_DISCARD_SECTORS;
        }
    }
}

/// Stops and deletes a device (idempotent). Waiting requests fail with EIO.
pub async fn detach(device: &Path) -> Result<()> {
    let id = dev_id(device)?;
    let server = servers().remove(&id);
    if let Some(s) = &server {
        s.stopping.store(true, Ordering::SeqCst);
    }
    let device = device.to_owned();
    blocking(move || {
        let Ok(ctrl) = UblkCtrl::new_simple(id as i32) else {
            return Ok(()); // no such device
        };
        ctrl.kill_dev().map_err(ublk_error("stop ublk device", &device))?;
        if let Some(s) = server {
            let _ = s.thread.join();
        }
        match ctrl.del_dev() {
            Ok(_) => Ok(()),
            Err(UblkError::OtherError(errno)) if errno == -libc::ENOENT => Ok(()),
            Err(e) => Err(ublk_error("delete ublk device", &device)(e)),
        }
    })
    .await
}

/// Makes the device show the export's current size (after the engine grew the volume).
pub async fn refresh_size(device: &Path, endpoint: &ExportEndpoint) -> Result<()> {
    let id = dev_id(device)?;
    let (socket, name, device) = (endpoint.path.clone(), endpoint.name.clone(), device.to_owned());
    blocking(move || {
        let (_, export) = nbd::connect_blocking(&socket, &name, Duration::from_secs(10))?;
        let sysfs = format!("/sys/block/ublkb{id}/size");
        let sectors = std::fs::read_to_string(&sysfs).map_err(|e| Error::io("read", &sysfs, e))?;
        if sectors.trim().parse::<u64>().ok() == Some(export.size >> 9) {
            return Ok(()); // already the export's size (staged after the volume grew)
        }
        if !can_resize() {
            return Err(Error::FailedPrecondition(format!(
                "this kernel's ublk driver cannot resize a started device (that needs \
                 UBLK_F_UPDATE_SIZE, Linux 6.16 or later); the volume has grown, and {} shows \
                 the new size once the volume is unstaged and staged again",
                device.display()
            )));
        }
        let ctrl =
            UblkCtrl::new_simple(id as i32).map_err(ublk_error("open ublk device", &device))?;
        ctrl.update_size(export.size).map_err(ublk_error("UPDATE_SIZE", &device))?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_come_from_the_block_device_name() {
        assert_eq!(dev_id(Path::new("/dev/ublkb7")).ok(), Some(7));
        assert!(dev_id(Path::new("/dev/ublkc7")).is_err());
        assert!(dev_id(Path::new("/dev/nbd0")).is_err());
        assert_eq!(bdev(3), PathBuf::from("/dev/ublkb3"));
    }
}
