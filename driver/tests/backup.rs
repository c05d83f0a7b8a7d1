//! What backup tools ask of the driver, end to end through the built `qsd-csi standalone`:
//! changed-block tracking (SnapshotMetadata), group snapshots that are one instant, and
//! snapshots of mounted filesystems that restore clean. Data is written and read through the
//! real kernel devices (FUSE export + loop) and real ext4.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use qsd_csi_proto::csi;
use qsd_csi_proto::csi::group_controller_client::GroupControllerClient;
use qsd_csi_proto::csi::snapshot_metadata_client::SnapshotMetadataClient;
use tonic::Code;

/// qcow2's default cluster: the granularity of every reported range.
const CLUSTER: u64 = 64 << 10;
const SIZE: u64 = 64 << 20;

/// (offset, length) pairs.
type Ranges = Vec<(u64, u64)>;

/// A volume created with `parameters` added to the test's defaults.
async fn create(
    d: &mut Driver,
    name: &str,
    cap: &csi::VolumeCapability,
    parameters: &[(&str, &str)],
    source: Option<csi::volume_content_source::Type>,
) -> csi::Volume {
    let req = csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: SIZE as i64, limit_bytes: 0 }),
        volume_capabilities: vec![cap.clone()],
        parameters: parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    };
    d.controller.create_volume(req).await.expect("create").into_inner().volume.expect("volume")
}

fn restore_source(snapshot_id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: snapshot_id.into(),
    }))
}

/// A snapshot with class `parameters`.
async fn snapshot_with(
    d: &mut Driver,
    volume_id: &str,
    name: &str,
    parameters: &[(&str, &str)],
) -> Result<csi::Snapshot, tonic::Status> {
    let req = csi::CreateSnapshotRequest {
        source_volume_id: volume_id.into(),
        name: name.into(),
        parameters: parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    Ok(d.controller.create_snapshot(req).await?.into_inner().snapshot.expect("snapshot"))
}

async fn metadata(d: &Driver) -> SnapshotMetadataClient<tonic::transport::Channel> {
    SnapshotMetadataClient::new(Driver::connect(&d.path("csi.sock")).await)
}

/// The ranges GetMetadataAllocated (no base) or GetMetadataDelta streams, checked for the
/// spec's ordering rules and per-message limit on the way.
async fn changes(
    d: &Driver,
    base: Option<&str>,
    target: &str,
    start: i64,
    max_results: i32,
) -> Result<Ranges, tonic::Status> {
    let mut client = metadata(d).await;
    let mut messages: Vec<(i64, Vec<csi::BlockMetadata>)> = Vec::new();
    match base {
        None => {
            let req = csi::GetMetadataAllocatedRequest {
                snapshot_id: target.into(),
                starting_offset: start,
                max_results,
                ..Default::default()
            };
            let mut stream = client.get_metadata_allocated(req).await?.into_inner();
            while let Some(m) = stream.message().await? {
                assert_eq!(m.block_metadata_type, csi::BlockMetadataType::VariableLength as i32);
                messages.push((m.volume_capacity_bytes, m.block_metadata));
            }
        }
        Some(base) => {
            let req = csi::GetMetadataDeltaRequest {
                base_snapshot_id: base.into(),
                target_snapshot_id: target.into(),
                starting_offset: start,
                max_results,
                ..Default::default()
            };
            let mut stream = client.get_metadata_delta(req).await?.into_inner();
            while let Some(m) = stream.message().await? {
                assert_eq!(m.block_metadata_type, csi::BlockMetadataType::VariableLength as i32);
                messages.push((m.volume_capacity_bytes, m.block_metadata));
            }
        }
    }
    let mut ranges: Ranges = Vec::new();
    for (capacity, batch) in messages {
        assert_eq!(capacity, SIZE as i64);
        assert!(max_results == 0 || batch.len() <= max_results as usize, "max_results kept");
        for b in batch {
            let (offset, length) = (b.byte_offset as u64, b.size_bytes as u64);
            assert!(length > 0 && offset + length <= SIZE, "{offset}+{length} inside the volume");
            if let Some(&(o, l)) = ranges.last() {
                assert!(o + l <= offset, "ranges increase and never overlap: {o}+{l}, {offset}");
            } else {
                assert!(start < (offset + length) as i64, "the first range ends after the start");
            }
            ranges.push((offset, length));
        }
    }
    Ok(ranges)
}

/// Every byte of `written` lies in `reported` (nothing a backup needs is missed).
fn covers(reported: &[(u64, u64)], written: &[(u64, u64)]) -> bool {
    written.iter().all(|&(o, l)| {
        let mut at = o;
        for &(ro, rl) in reported {
            if ro <= at && at < ro + rl {
                at = ro + rl;
            }
        }
        at >= o + l
    })
}

/// Every reported byte lies within a written range rounded out to whole clusters: at most a
/// cluster of slack on either side of each write.
fn tight(reported: &[(u64, u64)], written: &[(u64, u64)]) -> bool {
    let rounded: Ranges = written
        .iter()
        .map(|&(o, l)| {
            let start = o / CLUSTER * CLUSTER;
            (start, (o + l).div_ceil(CLUSTER) * CLUSTER - start)
        })
        .collect();
    let mut sorted = rounded.clone();
    sorted.sort();
    covers(&sorted, reported)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn write_and_sync(dev: &Path, writes: &[(u64, u64)], seed: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).expect("open device");
    for &(o, l) in writes {
        f.write_all_at(&pattern(seed, l as usize), o).expect("write");
    }
    f.sync_all().expect("fsync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_blocks_name_every_written_range_attached_detached_and_after_shortening() {
    let mut d = Driver::start().await;
    let cap = block_cap();
    // Three layers at most: the third snapshot needs the chain shortened.
    let vol = create(&mut d, "cbt", &cap, &[("maxChainDepth", "3")], None).await;
    let dev = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let base_data = [(0, 8 << 20)];
    write_and_sync(&dev, &base_data, 1);
    let s1 = snapshot_with(&mut d, &vol.volume_id, "s1", &[]).await.expect("s1");

    // Scattered overwrites: the first block, a range across a cluster boundary, an unaligned
    // range in the middle, the last block.
    let writes: Ranges =
        vec![(0, 4096), (CLUSTER - 4096, 8192), ((20 << 20) + 1536, 9728), (SIZE - 4096, 4096)];
    write_and_sync(&dev, &writes, 2);
    let s2 = snapshot_with(&mut d, &vol.volume_id, "s2", &[]).await.expect("s2");

    let check = |what: &str, reported: &Ranges, written: &Ranges| {
        assert!(covers(reported, written), "{what}: {reported:?} misses some of {written:?}");
        assert!(tight(reported, written), "{what}: {reported:?} is more than {written:?} rounded");
    };
    let delta = changes(&d, Some(&s1.snapshot_id), &s2.snapshot_id, 0, 0).await.expect("delta");
    check("delta(s1, s2) attached", &delta, &writes);
    let everything: Ranges = base_data.iter().chain(&writes).copied().collect();
    let allocated = changes(&d, None, &s2.snapshot_id, 0, 0).await.expect("allocated");
    check("allocated(s2)", &allocated, &everything);
    // One range per message, and resuming from an offset, give the same answer.
    assert_eq!(changes(&d, Some(&s1.snapshot_id), &s2.snapshot_id, 0, 1).await.expect("1"), delta);
    let resumed = changes(&d, Some(&s1.snapshot_id), &s2.snapshot_id, 1 << 20, 0).await.expect("r");
    assert_eq!(resumed, delta.iter().filter(|(o, l)| o + l > 1 << 20).copied().collect::<Ranges>());

    // Detached: the same answer, and a snapshot taken while detached.
    d.unpublish_and_unstage(&vol.volume_id).await;
    let detached = changes(&d, Some(&s1.snapshot_id), &s2.snapshot_id, 0, 0).await.expect("delta");
    assert_eq!(detached, delta);
    // Deleting s2 frees its layer; s3 needs a fourth layer, so the chain is shortened (s2's
    // layer streamed into the head, which becomes s3's layer).
    let delete =
        csi::DeleteSnapshotRequest { snapshot_id: s2.snapshot_id.clone(), ..Default::default() };
    d.controller.delete_snapshot(delete).await.expect("delete s2");
    let s3 = snapshot_with(&mut d, &vol.volume_id, "s3", &[]).await.expect("s3 after shortening");
    let log = std::fs::read_to_string(d.path("driver.log")).expect("log");
    assert!(log.contains("shortened chain"), "s3 needed a shortening");
    let shortened = changes(&d, Some(&s1.snapshot_id), &s3.snapshot_id, 0, 0).await.expect("delta");
    check("delta(s1, s3) after shortening", &shortened, &writes);

    // A volume restored from s1 is an overlay on s1's layer: what it writes is its delta from
    // s1.
    let restored = create(&mut d, "restored", &cap, &[], restore_source(&s1.snapshot_id)).await;
    let dev = d.stage_and_publish(&restored, &cap, false).await.expect("publish restored");
    let after_restore: Ranges = vec![(3 << 20, 4096), (SIZE - 8192, 8192)];
    write_and_sync(&dev, &after_restore, 3);
    let r1 = snapshot_with(&mut d, &restored.volume_id, "r1", &[]).await.expect("r1");
    let from_s1 = changes(&d, Some(&s1.snapshot_id), &r1.snapshot_id, 0, 0).await.expect("delta");
    check("delta(s1, r1) across a restore", &from_s1, &after_restore);
    d.unpublish_and_unstage(&restored.volume_id).await;

    // No answer rather than a wrong one: a base after the target, another volume's snapshot,
    // the target itself; an unknown snapshot; an offset past the end.
    let other = create(&mut d, "other", &cap, &[], None).await;
    let other_snap = snapshot_with(&mut d, &other.volume_id, "o1", &[]).await.expect("o1");
    let code = |r: Result<Ranges, tonic::Status>| r.err().map(|s| s.code());
    for (base, target, expected) in [
        (&s3.snapshot_id, &s1.snapshot_id, Code::FailedPrecondition),
        (&other_snap.snapshot_id, &s3.snapshot_id, Code::FailedPrecondition),
        (&s3.snapshot_id, &s3.snapshot_id, Code::InvalidArgument),
    ] {
        assert_eq!(code(changes(&d, Some(base), target, 0, 0).await), Some(expected));
    }
    let unknown = s3.snapshot_id.replace(":s3", ":nope");
    assert_eq!(code(changes(&d, None, &unknown, 0, 0).await), Some(Code::NotFound));
    assert_eq!(
        code(changes(&d, None, &s3.snapshot_id, SIZE as i64 + 1, 0).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(code(changes(&d, None, &s3.snapshot_id, -1, 0).await), Some(Code::OutOfRange));

    // The command line prints the same ranges, as lines and as JSON.
    let (ok, out, err) = cli(&d, &["snapshot", "changes", &s1.snapshot_id, &s3.snapshot_id]);
    assert!(ok, "{err}");
    let lines: Ranges = out
        .lines()
        .map(|l| {
            let (o, n) = l.split_once(' ').expect("OFFSET LENGTH");
            (o.parse().expect("offset"), n.parse().expect("length"))
        })
        .collect();
    assert_eq!(lines, shortened);
    let (ok, out, err) = cli(&d, &["snapshot", "changes", "--json", &s3.snapshot_id]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(json["volume_size_bytes"], SIZE);
    let from_json: Ranges = json["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| (r["offset"].as_u64().expect("offset"), r["length"].as_u64().expect("length")))
        .collect();
    assert_eq!(from_json, changes(&d, None, &s3.snapshot_id, 0, 0).await.expect("allocated"));
}

/// A 4 KiB buffer aligned for O_DIRECT, inside `storage`.
fn aligned(storage: &mut [u8]) -> &mut [u8] {
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + 4096]
}

fn open_direct(dev: &Path, write: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open with O_DIRECT")
}

/// The counter at the start of a device.
fn counter(dev: &Path) -> u64 {
    let mut storage = vec![0u8; 8192];
    let buf = aligned(&mut storage);
    open_direct(dev, false).read_exact_at(buf, 0).expect("read");
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_are_one_instant_under_a_writer() {
    let mut d = Driver::start().await;
    let cap = block_cap();
    let a = create(&mut d, "a", &cap, &[], None).await;
    let b = create(&mut d, "b", &cap, &[], None).await;
    let dev_a = d.stage_and_publish(&a, &cap, false).await.expect("publish a");
    let dev_b = d.stage_and_publish(&b, &cap, false).await.expect("publish b");

    // The writer: counter n to a, then n to b, each write finished (O_DIRECT) before the next.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        let (fa, fb) = (open_direct(&dev_a, true), open_direct(&dev_b, true));
        std::thread::spawn(move || {
            let mut storage = vec![0u8; 8192];
            let buf = aligned(&mut storage);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                buf[..8].copy_from_slice(&n.to_le_bytes());
                fa.write_all_at(buf, 0).expect("write a");
                fb.write_all_at(buf, 0).expect("write b");
                written.store(n, Ordering::SeqCst);
            }
        })
    };
    let mut groups = GroupControllerClient::new(Driver::connect(&d.path("csi.sock")).await);
    let mut taken = Vec::new();
    for i in 0..8 {
        // Each group while the writer is running and has moved on since the last one.
        let floor = written.load(Ordering::SeqCst) + 20;
        wait_until("the writer to move on", || written.load(Ordering::SeqCst) >= floor);
        let req = csi::CreateVolumeGroupSnapshotRequest {
            name: format!("group-{i}"),
            source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
            ..Default::default()
        };
        let group = groups.create_volume_group_snapshot(req).await.expect("group snapshot");
        taken.push(group.into_inner().group_snapshot.expect("group"));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");

    let mut last = 0;
    for (i, group) in taken.iter().enumerate() {
        let mut seen = HashMap::new();
        for s in &group.snapshots {
            let restored = create(
                &mut d,
                &format!("r{i}-{}", seen.len()),
                &cap,
                &[],
                restore_source(&s.snapshot_id),
            )
            .await;
            let dev = d.stage_and_publish(&restored, &cap, false).await.expect("publish restored");
            seen.insert(s.source_volume_id.clone(), counter(&dev));
            d.unpublish_and_unstage(&restored.volume_id).await;
        }
        let (ca, cb) = (seen[&a.volume_id], seen[&b.volume_id]);
        // One instant: b is written after a, so b holds a's counter or the one before.
        assert!(ca == cb || ca == cb + 1, "group {i}: a holds {ca}, b holds {cb}");
        assert!(ca > last, "group {i} was taken under the writer ({ca} after {last})");
        last = ca;
    }
}

/// Whether `dumpe2fs -h` shows the journal needing recovery.
fn needs_recovery(dev: &Path) -> bool {
    let out = Command::new("dumpe2fs").arg("-h").arg(dev).output().expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text.lines().find(|l| l.starts_with("Filesystem features:")).expect("features");
    features.contains("needs_recovery")
}

/// `fsfreeze --unfreeze`: it succeeds only on a frozen filesystem.
fn was_frozen(mount: &Path) -> bool {
    Command::new("fsfreeze").arg("--unfreeze").arg(mount).status().expect("fsfreeze").success()
}

/// Appends to files under `dir` until told to stop (no fsync: the journal stays busy).
fn busy_writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let chunk = pattern(7, 16 << 10);
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let path = dir.join(format!("f{}", i % 32));
            let mut f =
                std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open");
            std::io::Write::write_all(&mut f, &chunk).expect("write");
            if i % 32 == 31 {
                for j in 0..32 {
                    let _ = std::fs::remove_file(dir.join(format!("f{j}")));
                }
            }
            i += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_ext4_snapshot_restores_clean_and_no_failure_or_crash_leaves_it_frozen() {
    let pool = Tmpfs::new("256m");
    let mut d =
        Driver::start_with(vec!["--pool".into(), format!("small={}", pool.0.display())]).await;
    let cap = mount_cap("ext4");
    let vol = create(&mut d, "fs", &cap, &[], None).await;
    let mnt = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let staging = d.path(&format!("staging-{}", short(&vol.volume_id)));

    // Under a writer: frozen (the default) and, for contrast, not frozen.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = busy_writer(mnt.clone(), stop.clone());
    let frozen =
        snapshot_with(&mut d, &vol.volume_id, "frozen", &[]).await.expect("frozen snapshot");
    let raw = snapshot_with(&mut d, &vol.volume_id, "raw", &[("freezeFilesystem", "false")])
        .await
        .expect("crash-consistent snapshot");
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let bad = snapshot_with(&mut d, &vol.volume_id, "bad", &[("freezeFilesystem", "maybe")]).await;
    assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));

    let block = block_cap();
    for (snap, dirty) in [(&frozen, false), (&raw, true)] {
        let r = create(
            &mut d,
            &format!("r-{}", short(&snap.snapshot_id)),
            &block,
            &[],
            restore_source(&snap.snapshot_id),
        )
        .await;
        let dev = d.stage_and_publish(&r, &block, false).await.expect("publish restored");
        assert_eq!(needs_recovery(&dev), dirty, "{}: journal recovery needed", snap.snapshot_id);
        d.unpublish_and_unstage(&r.volume_id).await;
    }

    // A failure inside the freeze window (the pool fills up, so the new overlay cannot be
    // made) leaves the filesystem thawed and the volume writable.
    assert!(Command::new("sync").arg("-f").arg(&mnt).status().expect("sync").success());
    let froze_before =
        std::fs::read_to_string(d.path("driver.log")).expect("log").matches("froze").count();
    let filler = pool.fill();
    let failed = snapshot_with(&mut d, &vol.volume_id, "full", &[]).await;
    assert!(failed.is_err(), "no room for the overlay: {failed:?}");
    let froze_after =
        std::fs::read_to_string(d.path("driver.log")).expect("log").matches("froze").count();
    assert_eq!(froze_after, froze_before + 1, "the failure came inside the freeze window");
    assert!(!was_frozen(&staging), "thawed after the failure");
    std::fs::remove_file(filler).expect("remove filler");
    std::fs::write(mnt.join("after-failure"), b"writable").expect("write after the failure");

    // The plugin killed while it waits for the freeze (the daemon stopped, so the flush
    // cannot finish): the next start thaws what the dead plugin froze.
    std::fs::write(mnt.join("dirty"), pattern(3, 1 << 20)).expect("dirty data");
    let daemon = d.daemon_pid();
    assert!(Command::new("kill").args(["-STOP", &daemon]).status().expect("kill").success());
    let mut controller = d.controller.clone();
    let volume_id = vol.volume_id.clone();
    let hung = tokio::spawn(async move {
        let req = csi::CreateSnapshotRequest {
            source_volume_id: volume_id,
            name: "crash".into(),
            ..Default::default()
        };
        controller.create_snapshot(req).await
    });
    let markers = d.path("state/frozen");
    wait_until("the freeze to begin", || {
        std::fs::read_dir(&markers).is_ok_and(|mut m| {
            m.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json")))
        })
    });
    d.kill_and_restart_after(|| {
        assert!(Command::new("kill").args(["-CONT", &daemon]).status().expect("kill").success());
    })
    .await;
    let _ = hung.await;
    let log = std::fs::read_to_string(d.path("driver.log")).expect("log");
    assert!(log.contains("thawed a filesystem left frozen by a killed plugin"), "it was frozen");
    assert!(!was_frozen(&staging), "the restarted plugin thawed it");
    assert_eq!(std::fs::read_dir(&markers).expect("markers").count(), 0, "no marker left");
    std::fs::write(mnt.join("after-crash"), b"writable").expect("write after the crash");
    d.unpublish_and_unstage(&vol.volume_id).await;
}
