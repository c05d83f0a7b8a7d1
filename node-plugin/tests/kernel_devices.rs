//! Kernel block devices for real: a volume's export behind `/dev/nbdN` (the kernel NBD client,
//! configured over netlink) and behind `/dev/ublkbN` (served by this process), bytes written
//! through the device with O_DIRECT and read back both through the device and through the
//! daemon, discard, resize and detach.
//!
//! This host has neither nbd.ko nor ublk_drv.ko, so these are ignored here; e2e/vm/run.sh runs
//! them inside a guest booted with Debian's kernel, where both modules load.
mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use common::*;
use qsd_node::device::{self, Backend};
use qsd_node::engine::CreateVolume;
use qsd_node::graph::ExportKind;

const BLOCK: usize = 4096;

/// A 4 KiB-aligned buffer holding `data` (O_DIRECT needs aligned memory).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let storage = vec![0u8; len + BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        Aligned { storage, start, len }
    }
    fn from(data: &[u8]) -> Aligned {
        let mut a = Aligned::zeroed(data.len());
        a.as_mut().copy_from_slice(data);
        a
    }
    fn as_ref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn open_direct(device: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", device.display()))
}

fn device_size(device: &Path) -> u64 {
    let out = std::process::Command::new("blockdev")
        .arg("--getsize64")
        .arg(device)
        .output()
        .expect("blockdev runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("a size")
}

fn sysfs_dir(device: &Path) -> PathBuf {
    Path::new("/sys/block").join(device.file_name().expect("device name"))
}

async fn round_trip(backend: Backend) {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "dev", 64 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let endpoint = core.attach(&vol.id, ExportKind::Nbd).await.expect("attach").endpoint;
    let dev = device::attach(backend, &endpoint, false, &vol.id.to_string())
        .await
        .expect("device attaches");
    assert_eq!(device_size(&dev), 64 * MIB, "{} size", dev.display());

    // O_DIRECT writes at the start, in the middle and in the last block; flushed; read back
    // through the device and through the daemon's export by another NBD client.
    let f = open_direct(&dev);
    let offsets = [0, 33 * MIB - BLOCK as u64, 64 * MIB - BLOCK as u64];
    for (i, off) in offsets.iter().enumerate() {
        let data = Aligned::from(&pattern(i as u8 + 1, BLOCK));
        f.write_all_at(data.as_ref(), *off).expect("direct write");
    }
    f.sync_all().expect("flush the device");
    for (i, off) in offsets.iter().enumerate() {
        let mut back = Aligned::zeroed(BLOCK);
        f.read_exact_at(back.as_mut(), *off).expect("direct read");
        assert!(back.as_ref() == pattern(i as u8 + 1, BLOCK).as_slice(), "bytes at {off}");
    }
    nbd_io(&endpoint, &format!("read -P {} {} 1", pattern(1, 1)[0], offsets[0]));
    // One 1 MiB write, larger than a page, spanning many requests' worth of segments.
    let big = Aligned::from(&pattern(9, MIB as usize));
    f.write_all_at(big.as_ref(), 8 * MIB).expect("1 MiB direct write");
    let mut back = Aligned::zeroed(MIB as usize);
    f.read_exact_at(back.as_mut(), 8 * MIB).expect("1 MiB direct read");
    assert!(back.as_ref() == big.as_ref(), "1 MiB read back");

    // Discard passes through: the range reads back as zeroes.
    let out = std::process::Command::new("blkdiscard")
        .args(["-o", &(8 * MIB).to_string(), "-l", &MIB.to_string()])
        .arg(&dev)
        .output()
        .expect("blkdiscard runs");
    assert!(out.status.success(), "blkdiscard: {}", String::from_utf8_lossy(&out.stderr));
    f.read_exact_at(back.as_mut(), 8 * MIB).expect("read discarded range");
    assert!(back.as_ref().iter().all(|b| *b == 0), "a discarded range reads as zeroes");
    drop(f);

    // Resize: the engine grows the volume, the device follows where the kernel can.
    assert_eq!(core.expand_volume(&vol.id, 96 * MIB as i64).await.expect("expand"), 96 * MIB);
    let endpoint = core.attachment(&vol.id).expect("lookup").expect("attached").endpoint;
    let refreshed =
        device::refresh_size(backend, &dev, &endpoint, &vol.id.to_string(), 96 * MIB).await;
    if backend == Backend::Ublk && !device::ublk::can_resize() {
        let e = refreshed.expect_err("an old ublk driver cannot resize");
        assert!(e.to_string().contains("UBLK_F_UPDATE_SIZE"), "{e}");
        assert_eq!(device_size(&dev), 64 * MIB);
    } else {
        refreshed.expect("device size refreshed");
        assert_eq!(device_size(&dev), 96 * MIB);
    }
    let f = open_direct(&dev);
    let mut back = Aligned::zeroed(BLOCK);
    f.read_exact_at(back.as_mut(), offsets[2]).expect("read after resize");
    assert!(back.as_ref() == pattern(3, BLOCK).as_slice(), "data kept across the resize");
    drop(f);

    // Detach leaves nothing behind, and is idempotent.
    device::detach(backend, &dev).await.expect("detach");
    device::detach(backend, &dev).await.expect("detach again");
    match backend {
        // nbd devices exist from module load; a connected one has a pid file.
        Backend::Nbd => assert!(!sysfs_dir(&dev).join("pid").exists(), "nbd still connected"),
        _ => assert!(!sysfs_dir(&dev).exists(), "{} still exists", dev.display()),
    }
    core.detach(&vol.id).await.expect("engine detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbd.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn nbd_device_moves_bytes_both_ways_resizes_and_detaches() {
    round_trip(Backend::Nbd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ublk_drv.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn ublk_device_moves_bytes_both_ways_resizes_and_detaches() {
    round_trip(Backend::Ublk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ublk_drv.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn ublk_requests_wait_for_a_restarted_daemon_instead_of_failing() {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "dev", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let endpoint = core.attach(&vol.id, ExportKind::Nbd).await.expect("attach").endpoint;
    let dev =
        device::attach(Backend::Ublk, &endpoint, false, &vol.id.to_string()).await.expect("attach");
    let data = pattern(5, BLOCK);
    let f = open_direct(&dev);
    f.write_all_at(Aligned::from(&data).as_ref(), 0).expect("write");
    f.sync_all().expect("flush");
    // The daemon dies; the engine starts a new one and rebuilds the export. A read issued
    // meanwhile waits and then returns the flushed data.
    let mut events = core.subscribe();
    env.kill_daemon();
    let reader = tokio::task::spawn_blocking(move || {
        let mut back = Aligned::zeroed(BLOCK);
        f.read_exact_at(back.as_mut(), 0).map(|_| back.as_ref().to_vec())
    });
    wait_event(
        &mut events,
        |e| matches!(e, qsd_node::engine::EngineEvent::Reconciled { rebuilt, .. } if *rebuilt > 0),
    )
    .await;
    let back = reader.await.expect("reader joins").expect("the read succeeds");
    assert!(back == data, "flushed data survives the daemon's restart");
    device::detach(Backend::Ublk, &dev).await.expect("detach");
    assert!(!sysfs_dir(&dev).exists());
}

/// A 16 MiB volume on a `backend` device, its export set up as the node service would.
async fn staged_device(
    core: &std::sync::Arc<qsd_node::engine::EngineCore>,
    backend: Backend,
) -> (qsd_node::engine::VolumeInfo, PathBuf) {
    let vol = core
        .create_volume(&CreateVolume::named("local", "dev", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let writethrough = device::Choice::writethrough(backend);
    let endpoint =
        core.attach_with(&vol.id, ExportKind::Nbd, writethrough).await.expect("attach").endpoint;
    let dev = device::attach(backend, &endpoint, false, &vol.id.to_string())
        .await
        .expect("device attaches");
    (vol, dev)
}

/// A write acknowledged, then the daemon killed and restarted by the engine, then a flush that
/// succeeds: the write must read back. (The dead daemon kept the write's qcow2 metadata in its
/// cache; the new daemon's flush cannot cover it unless the device made it durable first.)
async fn flush_after_the_daemons_death(backend: Backend) {
    let env = Env::new().await;
    let core = env.core();
    let mut events = core.subscribe();
    let (vol, dev) = staged_device(&core, backend).await;
    let data = pattern(8, 65536);
    let f = open_direct(&dev);
    // A fresh cluster: the daemon records its allocation in cached qcow2 metadata.
    f.write_all_at(Aligned::from(&data).as_ref(), MIB).expect("write, acknowledged");

    // The daemon dies before a flush covered the write; the flush comes after its successor
    // took over (in flight at the death or issued later: the same to the daemon).
    env.kill_daemon();
    wait_event(&mut events, is_rebuilt).await;
    if backend == Backend::Nbd {
        // What the node service does on a rebuild: a fresh socket for the kernel.
        let endpoint = core.attachment(&vol.id).expect("lookup").expect("attached").endpoint;
        device::refresh_size(backend, &dev, &endpoint, &vol.id.to_string(), 0)
            .await
            .expect("reconnect");
    }
    f.sync_all().expect("the flush succeeds on the new daemon");
    let mut back = Aligned::zeroed(data.len());
    f.read_exact_at(back.as_mut(), MIB).expect("read back");
    assert!(back.as_ref() == data.as_slice(), "the flushed write survived the daemon's death");
    drop(f);
    device::detach(backend, &dev).await.expect("detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbd.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn nbd_a_flush_after_the_daemons_death_covers_writes_it_acknowledged() {
    flush_after_the_daemons_death(Backend::Nbd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ublk_drv.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn ublk_a_flush_after_the_daemons_death_covers_writes_it_acknowledged() {
    flush_after_the_daemons_death(Backend::Ublk).await;
}

/// Requests in flight on a block device (reads + writes), from sysfs.
fn inflight(device: &Path) -> u64 {
    std::fs::read_to_string(sysfs_dir(device).join("inflight"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// The kernel's per-request timeout is 30 s. A daemon that answers later than that (SIGSTOPped
/// here; in life, storage that stalls) must not cost the device its link: the request waits and
/// completes once the daemon answers. (With an NBD I/O timeout, the kernel declares the link
/// dead at 30 s, nothing reconnects a live daemon, and the request fails at the dead-connection
/// timeout.)
async fn a_daemon_slower_than_the_request_timeout(backend: Backend) {
    let env = Env::new().await;
    let core = env.core();
    let (_vol, dev) = staged_device(&core, backend).await;
    let data = pattern(6, BLOCK);
    let f = open_direct(&dev);
    f.write_all_at(Aligned::from(&data).as_ref(), 0).expect("write");
    f.sync_all().expect("flush");

    let pid = env.daemon_pid().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill").args([sig, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {sig} {pid}");
    };
    signal("-STOP");
    let reader = tokio::task::spawn_blocking(move || {
        let mut back = Aligned::zeroed(BLOCK);
        f.read_exact_at(back.as_mut(), 0).map(|_| back.as_ref().to_vec())
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while inflight(&dev) == 0 {
        assert!(std::time::Instant::now() < deadline, "the read never reached the device");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The stall itself is what is tested: longer than the kernel's 30 s request timeout.
    tokio::time::sleep(std::time::Duration::from_secs(40)).await;
    assert!(!reader.is_finished(), "the read waited for the stalled daemon");
    signal("-CONT");
    let back = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
        .await
        .expect("the read completes once the daemon answers")
        .expect("reader joins")
        .expect("the read succeeds");
    assert!(back == data, "the read returns the data");
    device::detach(backend, &dev).await.expect("detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbd.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn nbd_a_daemon_slower_than_the_request_timeout_delays_io_without_failing_it() {
    a_daemon_slower_than_the_request_timeout(Backend::Nbd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ublk_drv.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn ublk_a_daemon_slower_than_the_request_timeout_delays_io_without_failing_it() {
    a_daemon_slower_than_the_request_timeout(Backend::Ublk).await;
}

/// Whether a thread of this process is in uninterruptible sleep (a request it submitted is
/// waiting on the device).
fn a_thread_waits_on_io() -> bool {
    std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('D')))
            .unwrap_or(false)
    })
}

/// Kernel log records from now on (`/dev/kmsg`).
struct KernelLog(std::fs::File);

impl KernelLog {
    fn from_now() -> KernelLog {
        use std::io::Seek;
        let mut f = std::fs::File::open("/dev/kmsg").expect("open /dev/kmsg");
        f.seek(std::io::SeekFrom::End(0)).expect("seek to the log's end");
        KernelLog(f)
    }

    /// Waits until the kernel logs a record containing `text`: a blocking read of `/dev/kmsg`
    /// returns each record as it is logged.
    async fn wait_for(self, text: &str) {
        let text = text.to_owned();
        let mut file = self.0;
        let reader = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut record = vec![0u8; 8192];
            loop {
                match file.read(&mut record) {
                    Ok(n) if String::from_utf8_lossy(&record[..n]).contains(&text) => return,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {} // records overwritten
                    Err(e) => panic!("read /dev/kmsg: {e}"),
                }
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("the kernel logged the dead connection")
            .expect("the log reader");
    }
}

/// An expand re-creates the NBD export, which closes the kernel's connection: a write issued
/// once the kernel knows the connection is dead waits for a new socket, and the reconnect
/// (socket, then the larger size) must let it through. Since Linux 6.9 a size change freezes
/// the queue, so a reconnect that set the size first waited for that write, which waited for
/// the socket: both held until the dead-connection timeout (120 s) failed the write with EIO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nbd.ko: runs inside the guest (e2e/vm/run.sh)"]
async fn nbd_a_write_waiting_across_an_expand_completes_once_reconnected() {
    let env = Env::new().await;
    let core = env.core();
    let (vol, dev) = staged_device(&core, Backend::Nbd).await;
    // Opened while connected: the first open's partition scan reads the device.
    let f = open_direct(&dev);
    let name = dev.file_name().expect("name").to_string_lossy().into_owned();
    let log = KernelLog::from_now();
    assert_eq!(core.expand_volume(&vol.id, 32 * MIB as i64).await.expect("expand"), 32 * MIB);
    log.wait_for(&format!("{name}: Receive control failed")).await;
    let data = pattern(4, BLOCK);
    let written = data.clone();
    let writer = tokio::task::spawn_blocking(move || {
        f.write_all_at(Aligned::from(&written).as_ref(), MIB).map(|_| f)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !a_thread_waits_on_io() {
        if writer.is_finished() {
            let done = writer.await.expect("writer joins").map(drop);
            panic!("the write completed with the connection closed: {done:?}");
        }
        assert!(std::time::Instant::now() < deadline, "the write never waited on the device");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // poll the task states
    }
    let endpoint = core.attachment(&vol.id).expect("lookup").expect("attached").endpoint;
    // Well inside the 120 s the kernel would keep the write before failing it.
    let within = std::time::Duration::from_secs(60);
    tokio::time::timeout(
        within,
        device::refresh_size(Backend::Nbd, &dev, &endpoint, &vol.id.to_string(), 0),
    )
    .await
    .expect("the reconnect does not wait for the write it must carry")
    .expect("reconnect");
    let f = tokio::time::timeout(within, writer)
        .await
        .expect("the write completes once reconnected")
        .expect("writer joins")
        .expect("the write succeeds");
    assert_eq!(device_size(&dev), 32 * MIB, "the device shows the larger size");
    let mut back = Aligned::zeroed(BLOCK);
    f.read_exact_at(back.as_mut(), MIB).expect("read back");
    assert!(back.as_ref() == data.as_slice(), "the write reached the volume");
    drop(f);
    device::detach(Backend::Nbd, &dev).await.expect("detach");
}
