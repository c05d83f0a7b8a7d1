//! The block-graph engine against a real qemu-storage-daemon: snapshots, restore, clone, expand.

mod common;

use common::*;
use qsd_node::engine::{CreateVolume, VolumeSource};
use qsd_node::graph::ExportKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_keeps_data_written_before_it_and_hides_later_writes() {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v1", 64 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    let before = pattern(1, MIB as usize);
    write_at(&export, 0, &before);
    write_at(&export, 40 * MIB, &before);

    let snap = core.create_snapshot(&vol.id, &name("s1")).await.expect("snapshot while attached");
    let after = pattern(2, MIB as usize);
    write_at(&export, 0, &after);

    let mut restore = restore_request("r1", &snap.id);
    let restored = core.create_volume(&restore).await.expect("restore");
    assert_eq!(restored.size, 64 * MIB);
    let rexport =
        core.attach(&restored.id, ExportKind::Fuse).await.expect("attach restored").endpoint.path;
    assert_eq!(
        read_at(&rexport, 0, MIB as usize),
        before,
        "restored volume shows pre-snapshot data"
    );
    assert_eq!(read_at(&rexport, 40 * MIB, MIB as usize), before);
    assert_eq!(read_at(&export, 0, MIB as usize), after, "source keeps its later writes");

    // The same holds for a snapshot taken while the volume is detached.
    core.detach(&vol.id).await.expect("detach");
    let snap2 = core.create_snapshot(&vol.id, &name("s2")).await.expect("offline snapshot");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("reattach").endpoint.path;
    write_at(&export, 0, &before);
    restore.name = name("r2");
    restore.source = Some(VolumeSource::Snapshot(snap2.id));
    let r2 = core.create_volume(&restore).await.expect("restore 2");
    let r2export = core.attach(&r2.id, ExportKind::Fuse).await.expect("attach r2").endpoint.path;
    assert_eq!(read_at(&r2export, 0, MIB as usize), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_create_are_idempotent_by_name_and_refuse_a_different_size() {
    let env = Env::new().await;
    let core = env.core();
    let a = core
        .create_volume(&CreateVolume::named("local", "v", 10 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let b = core
        .create_volume(&CreateVolume::named("local", "v", 10 * MIB as i64).expect("request"))
        .await
        .expect("again");
    assert_eq!(a, b);
    let files = env.layer_files();
    let err = core
        .create_volume(&CreateVolume::named("local", "v", 20 * MIB as i64).expect("request"))
        .await
        .expect_err("size differs");
    assert_eq!(err.kind(), qsd_node::ErrorKind::AlreadyExists);
    assert_eq!(env.layer_files(), files, "nothing changed on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_matches_its_source_at_the_start_while_the_source_keeps_being_written() {
    let env = Env::new().await;
    let core = env.core();
    let size = 32 * MIB;
    let vol = core
        .create_volume(&CreateVolume::named("local", "src", size as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    for i in 0..8 {
        write_at(&export, i * 4 * MIB, &pattern(i as u8, MIB as usize));
    }
    let expected = env.dir.path().join("expected.raw");
    std::fs::write(&expected, read_at(&export, 0, size as usize)).expect("expected image");

    let request = clone_request("copy", &vol.id);
    // Start the copy at one byte per second so that it is certainly still running while we write.
    let mut task = core.start_clone_with_speed(&request, Some(1)).await.expect("start clone");
    let job = task.job().expect("copy job");
    job.running().await.expect("job runs");
    for i in 0..8 {
        write_at(&export, i * 4 * MIB, &pattern(100 + i as u8, MIB as usize));
    }
    let progress = job.progress().await.expect("progress").expect("job known");
    assert!(progress.0 < progress.1, "the copy was still running during the writes: {progress:?}");
    job.set_speed(0).await.expect("unthrottle");
    let clone = task.finish().await.expect("clone");

    let (pool, chain) = core.volume_chain(&clone.id).expect("clone chain");
    assert_eq!(chain.len(), 1, "a clone is a standalone image");
    let out = qemu_img(&[
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "qcow2",
        expected.to_str().unwrap_or_default(),
        pool.layer_path(chain[0]).to_str().unwrap_or_default(),
    ]);
    assert!(
        out.status.success(),
        "clone equals the source at the clone's start: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        read_at(&export, 0, MIB as usize),
        pattern(100, MIB as usize),
        "source took the writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_grows_the_virtual_size_online_and_offline_and_keeps_every_byte() {
    let env = Env::new().await;
    let core = env.core();
    let data = pattern(7, MIB as usize);
    // Online through a FUSE export and through an NBD export (which must be re-created).
    for (name, kind) in [("fuse", ExportKind::Fuse), ("nbd", ExportKind::Nbd)] {
        let vol = core
            .create_volume(&CreateVolume::named("local", name, 16 * MIB as i64).expect("request"))
            .await
            .expect("create");
        let attached = core.attach(&vol.id, kind).await.expect("attach").endpoint;
        match kind {
            ExportKind::Fuse => write_at(&attached.path, 15 * MIB, &data),
            _ => nbd_io(&attached, &format!("write -P 0x5a {} 1M", 15 * MIB)),
        }
        assert_eq!(core.expand_volume(&vol.id, 48 * MIB as i64).await.expect("expand"), 48 * MIB);
        match kind {
            ExportKind::Fuse => {
                assert_eq!(std::fs::metadata(&attached.path).expect("stat").len(), 48 * MIB);
                assert_eq!(read_at(&attached.path, 15 * MIB, MIB as usize), data);
                write_at(&attached.path, 47 * MIB, &data);
                assert_eq!(read_at(&attached.path, 47 * MIB, MIB as usize), data);
            }
            _ => {
                assert_eq!(nbd_size(&attached), 48 * MIB);
                nbd_io(&attached, &format!("read -P 0x5a {} 1M", 15 * MIB));
            }
        }
        assert_eq!(core.get_volume(&vol.id).expect("get").size, 48 * MIB);
    }
    // Offline, on a volume with a snapshot in its chain.
    let vol = core
        .create_volume(&CreateVolume::named("local", "off", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&export, 15 * MIB, &data);
    core.detach(&vol.id).await.expect("detach");
    core.create_snapshot(&vol.id, &name("before-expand")).await.expect("snapshot");
    core.expand_volume(&vol.id, 32 * MIB as i64).await.expect("offline expand");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    assert_eq!(std::fs::metadata(&export).expect("stat").len(), 32 * MIB);
    assert_eq!(read_at(&export, 15 * MIB, MIB as usize), data);
    assert_eq!(
        read_at(&export, 20 * MIB, MIB as usize),
        vec![0u8; MIB as usize],
        "new space reads zero"
    );
    let err = core.expand_volume(&vol.id, 8 * MIB as i64).await.expect_err("shrink");
    assert_eq!(err.kind(), qsd_node::ErrorKind::OutOfRange);
}

fn nbd_size(e: &qsd_node::graph::ExportEndpoint) -> u64 {
    let out = qemu_img(&["info", "--output=json", "-f", "raw", &nbd_uri(e)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info json");
    v["virtual-size"].as_u64().expect("size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_user_blk_export_listens_on_a_private_socket_until_detached() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "vm", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let endpoint = core.attach(&vol.id, ExportKind::VhostUserBlk).await.expect("attach").endpoint;
    let meta = std::fs::metadata(&endpoint.path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    let dir = endpoint.path.parent().expect("dir");
    assert_eq!(
        std::fs::metadata(dir).expect("dir").permissions().mode() & 0o077,
        0,
        "root-only dir"
    );
    core.expand_volume(&vol.id, 32 * MIB as i64).await.expect("online expand under vhost-user-blk");
    core.detach(&vol.id).await.expect("detach");
    assert!(!endpoint.path.exists(), "socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preallocation_modes_allocate_what_they_promise_and_thin_allocates_almost_nothing() {
    use qsd_node::engine::Preallocation;
    use std::os::unix::fs::MetadataExt;
    let env = Env::new().await;
    let core = env.core();
    let size = 64 * MIB;
    let mut allocated = Vec::new();
    for (name, mode) in [
        ("off", Preallocation::Off),
        ("metadata", Preallocation::Metadata),
        ("falloc", Preallocation::Falloc),
        ("full", Preallocation::Full),
    ] {
        let mut request = CreateVolume::named("local", name, size as i64).expect("request");
        request.preallocation = mode;
        let vol = core.create_volume(&request).await.expect("create");
        let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
        let meta = std::fs::metadata(pool.layer_path(chain[0])).expect("image");
        allocated.push((name, meta.blocks() * 512, meta.len()));
    }
    let (_, thin, _) = allocated[0];
    assert!(thin < 2 * MIB, "thin volume allocates only metadata: {allocated:?}");
    let (_, _, metadata_len) = allocated[1];
    assert!(metadata_len >= size, "metadata preallocation sizes the file: {allocated:?}");
    for (name, blocks, _) in &allocated[2..] {
        assert!(*blocks >= size, "{name} allocates the whole volume: {allocated:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_clone_shares_the_sources_data_as_of_now_and_diverges_afterwards() {
    use qsd_node::engine::CloneMode;
    let env = Env::new().await;
    let core = env.core();
    let src = core
        .create_volume(&CreateVolume::named("local", "src", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&src.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&export, 0, &pattern(1, MIB as usize));
    let mut request = clone_request("linked", &src.id);
    request.clone_mode = CloneMode::Linked;
    request.size = Some(32 * MIB as i64);
    let clone = core.create_volume(&request).await.expect("linked clone while attached");
    assert_eq!((clone.size, clone.chain_depth), (32 * MIB, 2), "an overlay on the shared layer");
    write_at(&export, 0, &pattern(2, MIB as usize));
    let cexport =
        core.attach(&clone.id, ExportKind::Fuse).await.expect("attach clone").endpoint.path;
    assert_eq!(
        read_at(&cexport, 0, MIB as usize),
        pattern(1, MIB as usize),
        "data as of the clone"
    );
    write_at(&cexport, MIB, &pattern(3, MIB as usize));
    assert_eq!(read_at(&export, 0, MIB as usize), pattern(2, MIB as usize), "source diverged");
    assert_eq!(
        read_at(&export, MIB, MIB as usize),
        vec![0u8; MIB as usize],
        "clone writes stay in the clone"
    );
    // Deleting the source keeps the shared layer for the clone.
    core.detach(&src.id).await.expect("detach");
    core.delete_volume(&src.id).await.expect("delete source");
    assert_eq!(read_at(&cexport, 0, MIB as usize), pattern(1, MIB as usize));
    core.detach(&clone.id).await.expect("detach clone");
    core.delete_volume(&clone.id).await.expect("delete clone");
    assert!(env.layer_files().is_empty(), "{:?}", env.layer_files());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_reports_its_progress_then_its_outcome_with_the_new_volumes_labels() {
    use qsd_node::engine::EngineEvent;
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "src", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&export, 0, &pattern(5, 8 * MIB as usize));
    let mut events = core.subscribe();
    let mut request = clone_request("copy", &vol.id);
    request.labels = [("claim".to_owned(), "ns/c".to_owned())].into();
    // 8 MiB at 4 MiB/s: about two seconds, reported every 100 ms.
    let task = core
        .start_clone_with_speed(&request, Some(4 * MIB))
        .await
        .expect("start clone")
        .report_every(std::time::Duration::from_millis(100));
    let clone = tokio::spawn(task.finish());
    let progress =
        wait_event(&mut events, |e| matches!(e, EngineEvent::CloneProgress { .. })).await;
    let EngineEvent::CloneProgress { volume, source, done, total, labels } = progress else {
        unreachable!()
    };
    assert_eq!((&source, labels.get("claim").map(String::as_str)), (&vol.id, Some("ns/c")));
    assert!(done < total && total >= 8 * MIB, "reported while copying: {done} of {total}");
    let finished =
        wait_event(&mut events, |e| matches!(e, EngineEvent::CloneFinished { .. })).await;
    let info = clone.await.expect("task").expect("clone");
    assert_eq!(info.id, volume);
    assert_eq!(info.labels.get("claim").map(String::as_str), Some("ns/c"), "labels are kept");
    assert!(
        matches!(&finished, EngineEvent::CloneFinished { volume: v, error: None, .. } if *v == info.id),
        "{finished:?}"
    );
}

/// The image's cluster size and whether it has extended L2 entries, as qemu-img reads them.
fn qcow2_layout(path: &std::path::Path) -> (u64, bool) {
    let out = qemu_img(&["info", "--output=json", "-U", &path.display().to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let extended = info["format-specific"]["data"]["extended-l2"].as_bool().unwrap_or(false);
    (info["cluster-size"].as_u64().expect("cluster-size"), extended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_s_qcow2_layout_holds_for_its_snapshot_overlays_and_its_cache_for_its_head() {
    use qsd_node::engine::Format;
    let env = Env::new().await;
    let core = env.core();
    let mut request = CreateVolume::named("local", "tuned", 64 * MIB as i64).expect("request");
    request.format =
        Format { cluster_size: Some(128 << 10), extended_l2: true, l2_cache_size: Some(4 << 20) };
    let vol = core.create_volume(&request).await.expect("create");
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    assert_eq!(qcow2_layout(&pool.layer_path(chain[0])), (128 << 10, true));
    // Attached with its cache; a snapshot taken while attached puts an overlay of the same
    // layout under the same cache option; the data stays readable through the export.
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&export, 4096, &pattern(7, 4096));
    core.create_snapshot(&vol.id, &name("s1")).await.expect("snapshot");
    write_at(&export, 8192, &pattern(8, 4096));
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    assert_eq!(chain.len(), 2);
    for layer in &chain {
        assert_eq!(qcow2_layout(&pool.layer_path(*layer)), (128 << 10, true), "{layer}");
    }
    assert_eq!(read_at(&export, 4096, 8192), [pattern(7, 4096), pattern(8, 4096)].concat());
    core.detach(&vol.id).await.expect("detach");
    // The record keeps the format, so a re-attach applies it again.
    let again = core.attach(&vol.id, ExportKind::Fuse).await.expect("re-attach").endpoint.path;
    assert_eq!(read_at(&again, 8192, 4096), pattern(8, 4096));
    core.detach(&vol.id).await.expect("detach");

    // A layout QEMU would refuse is refused before any image exists.
    let files = env.layer_files();
    let mut bad = CreateVolume::named("local", "bad", 64 * MIB as i64).expect("request");
    bad.format = Format { cluster_size: Some(8 << 10), extended_l2: true, l2_cache_size: None };
    let err = core.create_volume(&bad).await.expect_err("extended L2 needs 16 KiB clusters");
    assert!(err.to_string().contains("extendedL2"), "{err}");
    assert_eq!(env.layer_files(), files, "nothing made for the refused volume");
}
