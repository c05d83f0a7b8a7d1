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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use smol::io::{AsyncReadExt, AsyncWriteExt};

use super::nbd_client::{self as nbd, Export};
use crate::error::{Error, Result};
use crate::graph::ExportEndpoint;

/// How long requests wait for the daemon's export to come back before they fail with EIO.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests in flight per device (one queue).
const DEPTH: u16 = 32;
/// Largest request, bytes.
const IO_BUF_BYTES: u32 = 256 << 10;
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

// ---------------------------------------------------------------------------------------------
// The queue thread.

/// What came of one forwarded request.
enum Outcome {
    /// Done; the data of a read.
    Done(Vec<u8>),
    /// The server refused it with this NBD error (a Linux errno).
    Failed(u32),
    /// The link broke before the reply: send it again on a new one.
    Lost,
}

/// One NBD connection of a queue. Requests are pipelined; the reader hands replies back by
/// cookie (the tag: a tag has at most one request out).
struct Link {
    stream: smol::Async<UnixStream>,
    export: Export,
    sending: smol::lock::Mutex<()>,
    /// cookie → (bytes of read data to expect, where the outcome goes)
    waiting: RefCell<HashMap<u64, (usize, smol::channel::Sender<Outcome>)>>,
    alive: Cell<bool>,
}

impl Link {
    fn fail(&self) {
        if self.alive.replace(false) {
            let _ = self.stream.get_ref().shutdown(std::net::Shutdown::Both);
        }
        // Dropping the senders tells every waiter that its request was lost.
        self.waiting.borrow_mut().clear();
    }

    async fn exchange(
        &self,
        cookie: u64,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Outcome {
        if !self.alive.get() {
            return Outcome::Lost;
        }
        let (tx, rx) = smol::channel::bounded(1);
        let expect = if kind == nbd::CMD_READ { length as usize } else { 0 };
        self.waiting.borrow_mut().insert(cookie, (expect, tx));
        let header = nbd::encode_request(kind, flags, cookie, offset, length);
        let sent = {
            let _one_at_a_time = self.sending.lock().await;
            let mut stream = &self.stream;
            match stream.write_all(&header).await {
                Ok(()) => stream.write_all(payload).await,
                Err(e) => Err(e),
            }
        };
        if sent.is_err() {
            self.fail();
        }
        rx.recv().await.unwrap_or(Outcome::Lost)
    }

    async fn read_replies(&self) -> std::io::Result<()> {
        let mut stream = &self.stream;
        loop {
            let mut h = [0u8; nbd::REPLY_LEN];
            stream.read_exact(&mut h).await?;
            let (error, cookie) = nbd::decode_reply(&h)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let Some((expect, tx)) = self.waiting.borrow_mut().remove(&cookie) else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "NBD reply for a request we did not send",
                ));
            };
            let outcome = if error != 0 {
                Outcome::Failed(error)
            } else {
                let mut data = vec![0u8; expect];
                stream.read_exact(&mut data).await?;
                Outcome::Done(data)
            };
            let _ = tx.try_send(outcome);
        }
    }
}

/// A request the daemon acknowledged that no flush has covered yet.
struct Unflushed {
    seq: u64,
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
    data: Vec<u8>,
}

/// Acknowledged, unflushed requests in acknowledgement order.
#[derive(Default)]
struct Pending {
    requests: std::collections::VecDeque<Unflushed>,
    /// The next sequence number.
    seq: u64,
    /// Bytes of data held.
    bytes: usize,
}

/// A queue's connection to the export, re-made when it breaks.
struct Links {
    target: Arc<Target>,
    unflushed: RefCell<Pending>,
    current: RefCell<Option<Rc<Link>>>,
    connecting: smol::lock::Mutex<()>,
    /// New links go to the queue's reader task.
    readers: smol::channel::Sender<Rc<Link>>,
}

impl Links {
    /// The live link, connecting first if there is none. `None`: the export did not come back
    /// within [`RECONNECT_TIMEOUT`], or the device is being stopped.
    async fn get(&self) -> Option<Rc<Link>> {
        loop {
            if let Some(link) = self.current.borrow().as_ref().filter(|l| l.alive.get()) {
                return Some(link.clone());
            }
            let _one_connector = self.connecting.lock().await;
            if self.current.borrow().as_ref().is_some_and(|l| l.alive.get()) {
                continue;
            }
            let link = self.connect().await?;
            if self.replay(&link).await {
                *self.current.borrow_mut() = Some(link);
            }
        }
    }

    /// Sends the unflushed writes again on a new link, in order; false if the link broke.
    async fn replay(&self, link: &Link) -> bool {
        let pending: Vec<_> = self
            .unflushed
            .borrow()
            .requests
            .iter()
            .map(|u| (u.kind, u.flags, u.offset, u.length, u.data.clone()))
            .collect();
        if !pending.is_empty() {
            tracing::info!(export = %self.target.export, requests = pending.len(), "replaying unflushed writes");
        }
        for (kind, flags, offset, length, data) in pending {
            match link.exchange(REPLAY_COOKIE, kind, flags, offset, length, &data).await {
                Outcome::Done(_) => {}
                Outcome::Lost => return false,
                Outcome::Failed(errno) => {
                    tracing::error!(export = %self.target.export, offset, length, errno, "the daemon refused a replayed write")
                }
            }
        }
        true
    }

    /// The sequence number the next acknowledged request will get: a flush sent now covers
    /// everything below it.
    fn next_seq(&self) -> u64 {
        self.unflushed.borrow().seq
    }

    fn acknowledged(&self, kind: u16, flags: u16, offset: u64, length: u32, data: &[u8]) {
        let mut u = self.unflushed.borrow_mut();
        let seq = u.seq;
        u.seq += 1;
        u.bytes += data.len();
        u.requests.push_back(Unflushed { seq, kind, flags, offset, length, data: data.to_vec() });
    }

    fn flushed(&self, covers: u64) {
        let mut u = self.unflushed.borrow_mut();
        while u.requests.front().is_some_and(|e| e.seq < covers) {
            if let Some(done) = u.requests.pop_front() {
                u.bytes -= done.data.len();
            }
        }
    }

    fn unflushed_bytes(&self) -> usize {
        self.unflushed.borrow().bytes
    }

    async fn connect(&self) -> Option<Rc<Link>> {
        let t = &self.target;
        let deadline = Instant::now() + RECONNECT_TIMEOUT;
        let mut waited = false;
        loop {
            if t.stopping.load(Ordering::SeqCst) {
                return None;
            }
            let attempt = nbd::connect_blocking(&t.socket, &t.export, Duration::from_secs(5))
                .and_then(|(stream, export)| {
                    smol::Async::new(stream)
                        .map(|stream| (stream, export))
                        .map_err(|e| Error::io("register NBD socket", &t.socket, e))
                });
            match attempt {
                Ok((stream, export)) => {
                    if waited {
                        tracing::info!(export = %t.export, "ublk server reconnected to the daemon");
                    }
                    let link = Rc::new(Link {
                        stream,
                        export,
                        sending: smol::lock::Mutex::new(()),
                        waiting: RefCell::default(),
                        alive: Cell::new(true),
                    });
                    let _ = self.readers.try_send(link.clone());
                    return Some(link);
                }
                Err(e) if Instant::now() >= deadline => {
                    tracing::error!(export = %t.export, error = %e, "the daemon's export did not come back; failing I/O");
                    return None;
                }
                Err(e) => {
                    if !waited {
                        tracing::warn!(export = %t.export, error = %e, "ublk server lost the daemon; reconnecting");
                        waited = true;
                    }
                    smol::Timer::after(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Forwards one ublk request; returns the ublk result (bytes done, or -errno).
async fn forward(links: &Links, tag: u16, iod: sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    let op = iod.op_flags & 0xff;
    let io_flags = iod.op_flags & !0xff;
    let offset = iod.start_sector << 9;
    let length = iod.nr_sectors << 9;
    let (kind, mut flags) = match op {
        sys::UBLK_IO_OP_READ => (nbd::CMD_READ, 0),
        sys::UBLK_IO_OP_WRITE if io_flags & sys::UBLK_IO_F_FUA != 0 => {
            (nbd::CMD_WRITE, nbd::CMD_FLAG_FUA)
        }
        sys::UBLK_IO_OP_WRITE => (nbd::CMD_WRITE, 0),
        sys::UBLK_IO_OP_FLUSH => (nbd::CMD_FLUSH, 0),
        sys::UBLK_IO_OP_DISCARD => (nbd::CMD_TRIM, 0),
        sys::UBLK_IO_OP_WRITE_ZEROES if io_flags & sys::UBLK_IO_F_NOUNMAP != 0 => {
            (nbd::CMD_WRITE_ZEROES, nbd::CMD_FLAG_NO_HOLE)
        }
        sys::UBLK_IO_OP_WRITE_ZEROES => (nbd::CMD_WRITE_ZEROES, 0),
        _ => return -libc::EOPNOTSUPP,
    };
    let moves_data = kind == nbd::CMD_READ || kind == nbd::CMD_WRITE;
    if moves_data && length as usize > buf.len() {
        return -libc::EINVAL;
    }
    // A flush covers the whole export: NBD wants offset and length zero.
    let (offset, length) = if kind == nbd::CMD_FLUSH { (0, 0) } else { (offset, length) };
    loop {
        let Some(link) = links.get().await else { return -libc::EIO };
        if link.export.flags & nbd::TFLAG_SEND_FUA == 0 {
            flags &= !nbd::CMD_FLAG_FUA;
        }
        let payload = if kind == nbd::CMD_WRITE { &buf[..length as usize] } else { &[][..] };
        let covers = links.next_seq();
        match link.exchange(u64::from(tag), kind, flags, offset, length, payload).await {
            Outcome::Done(data) => {
                match kind {
                    nbd::CMD_READ => buf[..data.len()].copy_from_slice(&data),
                    nbd::CMD_FLUSH => links.flushed(covers),
                    // Durable before it was acknowledged.
                    nbd::CMD_WRITE if flags & nbd::CMD_FLAG_FUA != 0 => {}
                    _ => links.acknowledged(kind, flags, offset, length, payload),
                }
                if links.unflushed_bytes() > UNFLUSHED_CAP {
                    let covers = links.next_seq();
                    let flush = link.exchange(u64::from(tag), nbd::CMD_FLUSH, 0, 0, 0, &[]).await;
                    if let Outcome::Done(_) = flush {
                        links.flushed(covers);
                    }
                }
                return length as i32;
            }
            Outcome::Failed(NBD_ESHUTDOWN) => link.fail(),
            Outcome::Failed(errno) => {
                tracing::warn!(export = %links.target.export, kind, offset, length, errno, "the daemon failed a ublk request");
                return -(errno as i32);
            }
            Outcome::Lost => {}
        }
    }
}

/// One tag: fetch a request, forward it, commit the result and fetch the next, until the queue
/// goes down.
async fn serve_tag(
    q: Rc<UblkQueue<'_>>,
    tag: u16,
    links: Rc<Links>,
    kick: smol::channel::Sender<()>,
) -> std::result::Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf)).await?;
    loop {
        let iod = *q.get_iod(tag);
        let result = forward(&links, tag, iod, buf.as_mut_slice()).await;
        // The commit below is queued on the ring when this task next runs; make the ring
        // loop submit it even if no completion is due to wake it.
        let _ = kick.try_send(());
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result).await?;
    }
}

/// Runs queue `qid` of a device on this (libublk-spawned) thread until the device stops.
fn serve_queue(qid: u16, dev: &UblkDev, target: &Arc<Target>) {
    if let Err(e) = crate::sys::mark_thread_as_io_flusher() {
        tracing::warn!(error = %e, "could not mark the ublk queue thread as an I/O flusher");
    }
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(error = %e, "could not set up the ublk queue");
            return;
        }
    };
    let exe = smol::LocalExecutor::new();
    let (kick_tx, kick_rx) = smol::channel::bounded::<()>(1);
    let (readers_tx, readers_rx) = smol::channel::unbounded::<Rc<Link>>();
    let links = Rc::new(Links {
        target: target.clone(),
        unflushed: RefCell::default(),
        current: RefCell::default(),
        connecting: smol::lock::Mutex::new(()),
        readers: readers_tx,
    });
    // Reads replies for each link in turn; a broken link fails its waiters.
    let _reader = exe.spawn(async move {
        while let Ok(link) = readers_rx.recv().await {
            let _ = link.read_replies().await;
            link.fail();
        }
    });
    let tasks: Vec<_> = (0..dev.dev_info.queue_depth)
        .map(|tag| exe.spawn(serve_tag(q.clone(), tag, links.clone(), kick_tx.clone())))
        .collect();
    drop(kick_tx);
    let result = smol::block_on(exe.run(drive_ring(&exe, &q, &tasks, kick_rx)));
    if let Err(e) = result {
        tracing::error!(error = %e, "the ublk queue stopped with an error");
    }
}

/// The queue thread's loop: submit queued commands, wait for completions or a kick, wake the
/// tasks they belong to, run what is ready; done when every tag task has ended.
async fn drive_ring<T>(
    exe: &smol::LocalExecutor<'_>,
    q: &UblkQueue<'_>,
    tasks: &[smol::Task<T>],
    kick: smol::channel::Receiver<()>,
) -> std::result::Result<(), UblkError> {
    use libublk::io::{with_task_io_ring, with_task_io_ring_mut};
    use libublk::uring_async::{
        run_uring_tasks, ublk_reap_io_events_with_update_queue, ublk_wake_task,
    };
    let ring_fd = with_task_io_ring(|ring| ring.as_raw_fd());
    let ring =
        crate::sys::duplicate_fd(ring_fd).and_then(smol::Async::new).map_err(UblkError::IOError)?;
    let poll = || async {
        with_task_io_ring_mut(|ring| ring.submit_and_wait(0))?;
        let completions = async { ring.readable().await.map_err(UblkError::IOError) };
        let kicked = async {
            match kick.recv().await {
                Ok(()) => Ok(()),
                Err(_) => std::future::pending().await,
            }
        };
        smol::future::race(completions, kicked).await?;
        Ok(false)
    };
    let reap = |timed_out| {
        ublk_reap_io_events_with_update_queue(q, timed_out, None, |cqe| {
            ublk_wake_task(cqe.user_data(), cqe)
        })
    };
    let run = || while exe.try_tick() {};
    let done = || tasks.iter().all(|t| t.is_finished());
    run_uring_tasks(poll, reap, run, done).await
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
