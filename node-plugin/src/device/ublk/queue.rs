//! A ublk queue thread: one task per tag forwards the kernel's requests to the daemon's NBD
//! export over a pipelined link, reconnecting (and replaying unflushed writes) when the link
//! breaks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError};
use smol::io::{AsyncReadExt, AsyncWriteExt};

use super::replay::{ReplayBuffer, Unflushed};
use super::{Target, NBD_ESHUTDOWN, RECONNECT_TIMEOUT, REPLAY_COOKIE, UNFLUSHED_CAP};
use crate::device::nbd_client::{self as nbd, Export};
use crate::error::Error;

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

/// A queue's connection to the export, re-made when it breaks.
struct Links {
    target: Arc<Target>,
    unflushed: RefCell<ReplayBuffer>,
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
        let pending = self.unflushed.borrow().to_replay();
        if !pending.is_empty() {
            tracing::info!(export = %self.target.export, requests = pending.len(), "replaying unflushed writes");
        }
        for Unflushed { kind, flags, offset, length, data, .. } in pending {
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

    fn next_seq(&self) -> u64 {
        self.unflushed.borrow().next_seq()
    }

    fn acknowledged(&self, kind: u16, flags: u16, offset: u64, length: u32, data: &[u8]) {
        self.unflushed.borrow_mut().acknowledged(kind, flags, offset, length, data);
    }

    fn flushed(&self, covers: u64) {
        self.unflushed.borrow_mut().flushed(covers);
    }

    fn unflushed_bytes(&self) -> usize {
        self.unflushed.borrow().bytes()
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
pub(super) fn serve_queue(qid: u16, dev: &UblkDev, target: &Arc<Target>) {
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
