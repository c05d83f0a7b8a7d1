//! End to end: the built `qsd-csi standalone` binary driven over gRPC on its unix socket exactly
//! as external-provisioner, external-snapshotter, external-resizer and kubelet would, with the
//! data checked through real mounts and devices.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use qsd_csi_proto::csi;

/// The lifecycle on `fs`, sized for it (xfs needs 300 MB), with online expansion checked when
/// `expand` is set.
async fn lifecycle(fs: &str, size: i64, expand: bool) {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut d = Driver::start().await;
    let cap = mount_cap(fs);
    let info =
        d.identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.name, "qsd.csi.dev");
    let vol = d.create("data", size, &cap, None).await.expect("create");
    let mnt = d.stage_and_publish(&vol, &cap, false).await.expect("stage and publish");
    std::fs::write(mnt.join("before.txt"), b"written before the snapshot").expect("write");
    sync_fs(&mnt);
    let snap = d.snapshot(&vol.volume_id, "snap-1").await;
    assert!(snap.ready_to_use);
    std::fs::write(mnt.join("after.txt"), b"written after").expect("write");
    sync_fs(&mnt);

    let restored = d
        .create(
            "restored",
            size,
            &cap,
            Some(Type::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
        )
        .await
        .expect("restore");
    let rmnt = d.stage_and_publish(&restored, &cap, false).await.expect("publish restored");
    assert_eq!(
        std::fs::read(rmnt.join("before.txt")).expect("restored file"),
        b"written before the snapshot"
    );
    assert!(!rmnt.join("after.txt").exists(), "later writes are not in the snapshot");

    let clone = d
        .create(
            "clone",
            size,
            &cap,
            Some(Type::Volume(VolumeSource { volume_id: vol.volume_id.clone() })),
        )
        .await
        .expect("clone");
    let cmnt = d.stage_and_publish(&clone, &cap, false).await.expect("publish clone");
    assert_eq!(std::fs::read(cmnt.join("after.txt")).expect("cloned file"), b"written after");

    if expand {
        expand_online(&mut d, &vol.volume_id, &mnt, &cap, 2 * size).await;
    }
    let stats = d
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: mnt.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    let health = d
        .node
        .node_get_volume_health(csi::NodeGetVolumeHealthRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("health")
        .into_inner()
        .volume_health
        .expect("volume health");
    // Nothing is wrong with the volume; the host's disk may be nearly full (CI machines' often
    // are), and then, only then, the pool says so.
    let reasons: Vec<_> = health.health_statuses.iter().map(|h| h.reason.as_str()).collect();
    let pool_space = d.pool_space_finding();
    assert_eq!(
        (health.volume_id.as_str(), reasons),
        (vol.volume_id.as_str(), pool_space.iter().map(|f| f.reason.as_str()).collect())
    );
    teardown(&mut d, &[&vol.volume_id, &restored.volume_id, &clone.volume_id], &snap.snapshot_id)
        .await;
}

/// The controller grows a volume's image to `size`; the node still has to grow its filesystem.
async fn controller_expand(
    d: &mut Driver,
    volume_id: &str,
    cap: &csi::VolumeCapability,
    size: i64,
) {
    let grown = d
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume_id.to_owned(),
            capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("controller expand")
        .into_inner();
    assert!(grown.node_expansion_required);
}

/// Controller grows the image, the node grows the device and the filesystem; `df` shows it.
async fn expand_online(
    d: &mut Driver,
    volume_id: &str,
    mnt: &Path,
    cap: &csi::VolumeCapability,
    size: i64,
) {
    let before = df_size(mnt);
    controller_expand(d, volume_id, cap, size).await;
    d.node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: volume_id.to_owned(),
            volume_path: mnt.display().to_string(),
            capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .expect("node expand");
    let after = df_size(mnt);
    assert!(after as i64 > before as i64 + size / 3, "df grew from {before} to {after}");
}

/// Refuses to delete a staged volume, then unpublishes, unstages and deletes everything.
async fn teardown(d: &mut Driver, volumes: &[&String], snapshot_id: &str) {
    let busy = d
        .controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: volumes[0].clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(busy.err().map(|s| s.code()), Some(tonic::Code::FailedPrecondition));
    for id in volumes {
        d.unpublish_and_unstage(id).await;
    }
    d.controller
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("delete snapshot");
    for id in volumes {
        d.delete(id).await;
    }
    let left = d
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(left.entries.is_empty());
    assert_eq!(
        std::fs::read_dir(d.path("state/pools/default/layers")).expect("layers").count(),
        0,
        "no layer left"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_volume_lifecycle_over_grpc_on_ext4() {
    lifecycle("ext4", 256 * MIB, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs CAP_SYS_RESOURCE for online ext4 resize, which this CI sandbox withholds"]
async fn a_mounted_ext4_volume_grows_online() {
    lifecycle("ext4", 256 * MIB, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_ext4_grows_online_or_the_node_says_which_capability_is_missing() {
    let mut d = Driver::start().await;
    let cap = mount_cap("ext4");
    let vol = d.create("grow", 64 * MIB, &cap, None).await.expect("create");
    let mnt = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    if qsd_node::has_cap_sys_resource() {
        expand_online(&mut d, &vol.volume_id, &mnt, &cap, 128 * MIB).await;
    } else {
        // This machine withholds CAP_SYS_RESOURCE: resize2fs cannot grow a mounted ext4.
        controller_expand(&mut d, &vol.volume_id, &cap, 128 * MIB).await;
        let refused = d
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: mnt.display().to_string(),
                ..Default::default()
            })
            .await
            .expect_err("no online ext4 growth without the capability");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("CAP_SYS_RESOURCE"), "{}", refused.message());
    }
    d.unpublish_and_unstage(&vol.volume_id).await;
    d.delete(&vol.volume_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_volume_lifecycle_over_grpc_on_xfs() {
    lifecycle("xfs", 512 * MIB, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_block_volume_is_published_as_a_device_that_keeps_its_bytes() {
    use std::os::unix::fs::FileExt;
    let mut d = Driver::start().await;
    let cap = block_cap();
    let vol = d.create("raw", 64 * MIB, &cap, None).await.expect("create");
    let dev = d.stage_and_publish(&vol, &cap, false).await.expect("publish block");
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).expect("open device");
    f.write_all_at(&data, 8 * MIB as u64).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    d.unpublish_and_unstage(&vol.volume_id).await;
    let dev = d.stage_and_publish(&vol, &cap, false).await.expect("publish again");
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&dev)
        .expect("open")
        .read_exact_at(&mut back, 8 * MIB as u64)
        .expect("read");
    assert_eq!(back, data);
    d.unpublish_and_unstage(&vol.volume_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_publish_refuses_writes_and_staging_never_reformats() {
    let mut d = Driver::start().await;
    let cap = mount_cap("ext4");
    // Large enough for xfs, so that the last stage is refused for what the volume holds.
    let vol = d.create("ro", 320 * MIB, &cap, None).await.expect("create");
    let rw = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    std::fs::write(rw.join("keep.txt"), b"kept").expect("write");
    sync_fs(&rw);
    d.unpublish_and_unstage(&vol.volume_id).await;
    // Staging again finds the filesystem and mounts it as it is.
    let ro = d.stage_and_publish(&vol, &cap, true).await.expect("publish read-only");
    assert_eq!(std::fs::read(ro.join("keep.txt")).expect("read"), b"kept", "not reformatted");
    let err = std::fs::write(ro.join("new.txt"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS");
    d.unpublish_and_unstage(&vol.volume_id).await;
    // A volume holding ext4 is never reformatted as xfs.
    let err = d.stage_and_publish(&vol, &mount_cap("xfs"), false).await.expect_err("wrong fs");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_code_reaches_the_caller() {
    use csi::volume_content_source::{SnapshotSource, Type};
    let mut d = Driver::start().await;
    let cap = mount_cap("ext4");
    let vol = d.create("v", 64 * MIB, &cap, None).await.expect("create");
    let code = |r: Result<csi::Volume, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(code(d.create("v", 128 * MIB, &cap, None).await), Some(tonic::Code::AlreadyExists));
    assert_eq!(code(d.create("", 64 * MIB, &cap, None).await), Some(tonic::Code::InvalidArgument));
    assert_eq!(code(d.create("huge", i64::MAX, &cap, None).await), Some(tonic::Code::OutOfRange));
    let missing =
        Some(Type::Snapshot(SnapshotSource { snapshot_id: "snap:default@e2e-node:nope".into() }));
    assert_eq!(code(d.create("r", 64 * MIB, &cap, missing).await), Some(tonic::Code::NotFound));
    let mut multi = cap.clone();
    multi.access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    assert_eq!(
        code(d.create("m", 64 * MIB, &multi, None).await),
        Some(tonic::Code::InvalidArgument)
    );
    let shrink = d
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await;
    assert_eq!(shrink.err().map(|s| s.code()), Some(tonic::Code::OutOfRange));
    let unstaged = d
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: d.path("nowhere").display().to_string(),
            target_path: d.path("t").display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    assert_eq!(unstaged.err().map(|s| s.code()), Some(tonic::Code::FailedPrecondition));
    // (ABORTED for a second operation on a busy volume is proven deterministically in the
    // engine's tests, where a rate-limited clone holds the volume.)
    let bad_token = d
        .controller
        .list_volumes(csi::ListVolumesRequest { max_entries: 1, starting_token: "x".into() })
        .await;
    assert_eq!(bad_token.err().map(|s| s.code()), Some(tonic::Code::Aborted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifying_writer_survives_the_plugin_being_killed_and_restarted() {
    let mut d = Driver::start().await;
    let cap = mount_cap("ext4");
    let vol = d.create("survivor", 256 * MIB, &cap, None).await.expect("create");
    let mnt = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let data = mnt.join("fio.dat");
    // 96 MiB at 24 MiB/s: about four seconds of writing, then a full read-back verification.
    let mut fio = Command::new("fio")
        .args([
            "--name=survive",
            "--rw=write",
            "--bs=64k",
            "--size=96M",
            "--rate=24m",
            "--ioengine=psync",
        ])
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--end_fsync=1"])
        .arg(format!("--filename={}", data.display()))
        // fio leaves its verify state file in its working directory: the test's, not the tree.
        .current_dir(d.path(""))
        .stdout(std::fs::File::create(d.path("fio.log")).expect("fio log"))
        .spawn()
        .expect("fio runs");
    wait_until("fio to be writing", || {
        std::fs::metadata(&data).is_ok_and(|m| m.len() > 4 * MIB as u64)
    });
    d.kill_and_restart().await;
    let probe = d.identity.probe(csi::ProbeRequest {}).await.expect("probe").into_inner();
    assert_eq!(probe.ready, Some(true));
    assert!(
        fio.try_wait().expect("fio status").is_none(),
        "fio was still running across the restart"
    );
    let status = fio.wait().expect("fio ends");
    let log = std::fs::read_to_string(d.path("fio.log")).unwrap_or_default();
    assert!(status.success(), "fio saw errors:\n{log}");
    assert!(log.contains("err= 0"), "{log}");
    d.unpublish_and_unstage(&vol.volume_id).await;
    d.delete(&vol.volume_id).await;
}

/// Runs `qsd-csi --endpoint <driver> ARGS...`; returns (success, stdout, stderr).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_drives_a_running_endpoint() {
    let d = Driver::start().await;
    let staging = d.path("cli-staging").display().to_string();
    // A create prints the bare ID, so a shell can capture it.
    let (ok, out, err) = cli(&d, &["volume", "create", "notes", "--size", "64M"]);
    assert!(ok, "{err}");
    let id = out.trim_end().to_owned();
    assert!(id.starts_with("vol:") && !id.contains(char::is_whitespace), "{out:?}");
    // Any class parameter reaches the engine: a qcow2 layout, checked in the image; a layout
    // QEMU would refuse, refused with the parameter's name.
    let (ok, out, err) = cli(
        &d,
        &[
            "volume",
            "create",
            "tuned",
            "--param",
            "clusterSize=128Ki",
            "--param",
            "extendedL2=true",
        ],
    );
    assert!(ok, "{err}");
    let tuned = out.trim_end().to_owned();
    let layers = std::fs::read_dir(d.path("state/pools/default/layers")).expect("layers");
    let tuned_images = layers
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .filter(|p| {
            let info = Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(p)
                .output()
                .expect("qemu-img");
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
            info["cluster-size"] == 128 << 10
                && info["format-specific"]["data"]["extended-l2"] == true
        })
        .count();
    assert_eq!(tuned_images, 1, "the tuned volume's head has 128 KiB clusters with subclusters");
    let (ok, _, err) = cli(&d, &["volume", "create", "odd", "--param", "clusterSize=96Ki"]);
    assert!(!ok && err.contains("InvalidArgument") && err.contains("clusterSize"), "{err}");
    let (ok, _, err) = cli(&d, &["volume", "create", "odd", "--param", "clusterSize"]);
    assert!(!ok && err.contains("KEY=VALUE"), "{err}");
    let (ok, _, err) = cli(&d, &["volume", "delete", &tuned]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&d, &["volume", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("volume list -o json");
    let notes = listed.as_array().and_then(|l| l.iter().find(|v| v["id"] == id.as_str()));
    assert!(ok && notes.is_some_and(|v| v["sizeBytes"] == 64 << 20), "{out}");
    let mnt = d.path("notes");
    let (ok, _, err) =
        cli(&d, &["publish", &id, mnt.to_str().expect("path"), "--staging-dir", &staging]);
    assert!(ok, "{err}");
    std::fs::write(mnt.join("a.txt"), b"from the shell").expect("write");
    sync_fs(&mnt);
    let (ok, out, err) = cli(&d, &["snapshot", "create", &id, "notes-snap"]);
    assert!(ok, "{err}");
    let snap = out.trim_end().to_owned();
    let (ok, out, _) = cli(&d, &["snapshot", "list", "--volume", &id]);
    assert!(
        ok && out.contains(&snap) && out.lines().next().is_some_and(|h| h.ends_with("AGE")),
        "{out}"
    );
    // Times are RFC 3339 (or an age), never a raw epoch number.
    let (ok, out, _) = cli(&d, &["snapshot", "list", "--volume", &id, "-o", "yaml"]);
    let created = out.lines().find_map(|l| l.trim().strip_prefix("createdAt: ")).unwrap_or("");
    let created = created.trim_matches('"');
    assert!(ok && created.len() == 20 && created.ends_with('Z') && created.contains('T'), "{out}");
    let (ok, out, _) = cli(&d, &["snapshot", "list", "-o", "name"]);
    assert!(ok && out == format!("{snap}\n"), "{out:?}");
    let (ok, out, err) = cli(&d, &["clone", &id, "notes-copy", "-o", "wide"]);
    assert!(ok && out.contains("64M") && out.contains("e2e-node"), "{out}{err}");
    let copy = out.lines().nth(1).and_then(|row| row.split_whitespace().next()).expect("clone id");
    let copy = copy.to_owned();
    let (ok, out, err) = cli(&d, &["expand", &id, "128M"]);
    assert!(ok && out.contains("128M"), "{out}{err}");
    let (ok, out, _) = cli(&d, &["volume", "list"]);
    assert!(ok && out.contains(&id) && out.contains(&copy) && out.contains("e2e-node"), "{out}");
    // An actionable error: the name is taken with another size.
    let (ok, _, err) = cli(&d, &["volume", "create", "notes", "--size", "1G"]);
    assert!(!ok && err.contains("AlreadyExists") && err.contains("hint:"), "{err}");
    let (ok, _, err) = cli(&d, &["volume", "delete", &id]);
    assert!(!ok && err.contains("FailedPrecondition"), "published volumes are not deleted: {err}");
    let (ok, _, err) =
        cli(&d, &["unpublish", &id, mnt.to_str().expect("path"), "--staging-dir", &staging]);
    assert!(ok, "{err}");
    // The clone holds the file written before it.
    let cmnt = d.path("copy");
    let (ok, _, err) = cli(
        &d,
        &["publish", &copy, cmnt.to_str().expect("path"), "--staging-dir", &staging, "--read-only"],
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(cmnt.join("a.txt")).expect("cloned file"), b"from the shell");
    let (ok, _, err) =
        cli(&d, &["unpublish", &copy, cmnt.to_str().expect("path"), "--staging-dir", &staging]);
    assert!(ok, "{err}");
    for args in [
        vec!["snapshot", "delete", &snap],
        vec!["volume", "delete", &id],
        vec!["volume", "delete", &copy],
    ] {
        let (ok, _, err) = cli(&d, &args);
        assert!(ok, "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
        .args(["--endpoint", "unix:///nonexistent/csi.sock", "volume", "list"])
        .output()
        .expect("qsd-csi runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("qsd-csi standalone"), "{err}");
}

/// A snapshot restored, and a volume cloned, into larger volumes: each is staged with a
/// filesystem grown to fill its volume, and keeps the source's files.
async fn restored_and_cloned_into_larger_volumes(fs: &str, size: i64) {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut d = Driver::start().await;
    let cap = mount_cap(fs);
    let vol = d.create("small", size, &cap, None).await.expect("create");
    let mnt = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    std::fs::write(mnt.join("kept.txt"), b"kept").expect("write");
    sync_fs(&mnt);
    let small = qsd_node::mount::usage(&mnt).expect("usage").bytes_total;
    let snap = d.snapshot(&vol.volume_id, "snap-small").await;
    let sources = [
        ("restored", Type::Snapshot(SnapshotSource { snapshot_id: snap.snapshot_id.clone() })),
        ("cloned", Type::Volume(VolumeSource { volume_id: vol.volume_id.clone() })),
    ];
    let mut made = Vec::new();
    for (name, source) in sources {
        let big = d.create(name, 2 * size, &cap, Some(source)).await.expect("create larger");
        let bmnt = d.stage_and_publish(&big, &cap, false).await.expect("publish larger");
        assert_eq!(std::fs::read(bmnt.join("kept.txt")).expect("kept"), b"kept", "{name}");
        let grown = qsd_node::mount::usage(&bmnt).expect("usage").bytes_total;
        assert!(
            grown > small + (size as u64) * 3 / 4,
            "{fs} {name}: {grown} bytes, its source's filesystem {small}"
        );
        made.push(big.volume_id);
    }
    let ids: Vec<&String> = std::iter::once(&vol.volume_id).chain(&made).collect();
    teardown(&mut d, &ids, &snap.snapshot_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext4_restored_or_cloned_into_a_larger_volume_fills_it() {
    restored_and_cloned_into_larger_volumes("ext4", 64 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xfs_restored_or_cloned_into_a_larger_volume_fills_it() {
    restored_and_cloned_into_larger_volumes("xfs", 320 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_create_is_answered_by_the_volume_grown_since_when_within_its_limit() {
    let mut d = Driver::start().await;
    let cap = mount_cap("ext4");
    let vol = d.create("grown", 64 * MIB, &cap, None).await.expect("create");
    d.controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .expect("expand");
    let again = d.create("grown", 64 * MIB, &cap, None).await.expect("the same request, later");
    assert_eq!(
        (again.volume_id.as_str(), again.capacity_bytes),
        (vol.volume_id.as_str(), 96 * MIB)
    );
    let limited = d
        .controller
        .create_volume(csi::CreateVolumeRequest {
            name: "grown".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 80 * MIB,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await;
    assert_eq!(limited.err().map(|s| s.code()), Some(tonic::Code::AlreadyExists), "past its limit");
    d.delete(&vol.volume_id).await;
}

/// The driver's log lines that report a failed call naming `object`.
fn failure_lines(d: &Driver, object: &str) -> Vec<String> {
    let log = std::fs::read_to_string(d.path("driver.log")).expect("log");
    log.lines()
        .filter(|l| l.contains("call failed") && l.contains(object))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_call_is_logged_once_with_its_method_object_code_and_cause() {
    let mut d = Driver::start().await;
    let id = "vol:default@e2e-node:nothing-here";
    let staged = d
        .node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: d.path("s").display().to_string(),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        })
        .await;
    assert_eq!(staged.err().map(|s| s.code()), Some(tonic::Code::NotFound));
    let lines = failure_lines(&d, id);
    assert_eq!(lines.len(), 1, "logged once: {lines:#?}");
    let line = &lines[0];
    assert!(line.contains("WARN") && line.contains("/csi.v1.Node/NodeStageVolume"), "{line}");
    assert!(
        line.contains("NotFound") && line.contains("cause") && line.contains("not found"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_clone_that_fills_the_pool_is_resource_exhausted_and_leaves_nothing_behind() {
    use csi::volume_content_source::{Type, VolumeSource};
    let pool = Tmpfs::new("160m");
    let mut d =
        Driver::start_with(vec!["--pool".into(), format!("small={}", pool.0.display())]).await;
    let cap = block_cap();
    let vol = d.create("big", 128 * MIB, &cap, None).await.expect("create");
    let dev = d.stage_and_publish(&vol, &cap, false).await.expect("publish");
    let filled = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=100", "oflag=direct", "conv=fsync"])
        .arg(format!("of={}", dev.display()))
        .output()
        .expect("dd");
    assert!(filled.status.success(), "{}", String::from_utf8_lossy(&filled.stderr));
    let head = |p: &Path| {
        let out = Command::new("dd")
            .arg(format!("if={}", p.display()))
            .args(["bs=1M", "count=4"])
            .output();
        out.expect("dd").stdout
    };
    let before = head(&dev);
    let layers = || std::fs::read_dir(pool.0.join("layers")).expect("layers").count();
    let layers_before = layers();
    let source = Some(Type::Volume(VolumeSource { volume_id: vol.volume_id.clone() }));
    let copied = d.create("copy", 128 * MIB, &cap, source).await;
    let status = copied.expect_err("the pool cannot hold a second copy");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("No space left"), "{status:?}");
    assert_eq!(layers(), layers_before, "no half-made image is left");
    assert_eq!(head(&dev), before, "the source is intact");
    let lines = failure_lines(&d, "copy");
    assert_eq!(lines.len(), 1, "logged once: {lines:#?}");
    assert!(lines[0].contains("ERROR") && lines[0].contains("ResourceExhausted"), "{}", lines[0]);
    d.unpublish_and_unstage(&vol.volume_id).await;
    d.delete(&vol.volume_id).await;
}

/// `qsd-csi pool` with the pools of the driver in `d`, its exit status and stdout.
fn pool_cli(d: &Driver, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qsd-csi"))
        .args(["pool", "check", "--state-dir"])
        .arg(d.path("state"))
        .args(args)
        .output()
        .expect("qsd-csi runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.code(), format!("{stdout}{}", if stdout.is_empty() { &stderr } else { "" }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_check_from_the_shell_reports_repairs_and_the_start_reports_too() {
    let mut d = Driver::start().await;
    d.create("kept", 16 << 20, &mount_cap("ext4"), None).await.expect("create");
    let layers = d.path("state/pools/default/layers");
    // A snapshot record naming a layer that does not exist: the start-up report names it.
    let lost = qsd_node::pool::LayerId::random();
    let record = format!(
        "{{\"name\":\"lost\",\"source_volume\":\"kept\",\"layer\":\"{lost}\",\"size\":16777216,\"created_unix\":0}}"
    );
    std::fs::write(d.path("state/pools/default/snapshots/lost.json"), record).expect("lost");
    d.kill_and_restart().await;
    let log = std::fs::read_to_string(d.path("driver.log")).expect("log");
    assert!(log.contains("pool check at start-up") && log.contains(&lost.to_string()), "{log}");
    std::fs::remove_file(d.path("state/pools/default/snapshots/lost.json")).expect("remove");
    // A record that cannot be read (a pool with one does not open: the error names it).
    std::fs::write(d.path("state/pools/default/snapshots/torn.json"), b"{\"name\":").expect("torn");

    // An image nothing names, untouched for two hours. The driver holds nothing of the pool
    // open (its one volume is offline), so the check and the repair may run beside it.
    let orphan = layers.join(format!("{}.qcow2", qsd_node::pool::LayerId::random()));
    std::fs::write(&orphan, b"QFI\xfb").expect("orphan");
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    let file = std::fs::File::options().write(true).open(&orphan).expect("open");
    file.set_modified(then).expect("age");
    drop(file); // (an open file of the pool's would hold a repair off)
    let (status, out) = pool_cli(&d, &[]);
    assert_eq!(status, Some(2), "{out}");
    assert!(out.contains("torn.json") && out.contains("has no record"), "{out}");
    assert!(out.contains("1 volumes") && out.contains("--repair removes it"), "{out}");
    let (status, out) = pool_cli(&d, &["--repair", "-o", "json"]);
    let checked: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(status, Some(2), "the torn record is never repaired: {out}");
    assert_eq!(checked[0]["repaired"][0]["kind"], "orphanImage", "{out}");
    assert_eq!(checked[0]["report"]["findings"][0]["kind"], "badRecord", "{out}");
    assert!(!orphan.exists());
    std::fs::remove_file(d.path("state/pools/default/snapshots/torn.json")).expect("remove");
    let (status, out) = pool_cli(&d, &[]);
    assert_eq!((status, out.contains("  ok")), (Some(0), true), "{out}");
}
