//! Layer lifetimes, chain depth, thresholds, daemon restarts and clean-up, against a real
//! qemu-storage-daemon.

mod common;

use common::*;
use qsd_node::engine::{CreateVolume, Engine, EngineEvent, SnapshotBatch};
use qsd_node::graph::{ExportEndpoint, ExportKind};
use qsd_node::pool::{id::ObjectId, ObjectName};
use qsd_node::qmp::commands::{QomGetLimits, QomList, QueryBlockExports, QueryNamedBlockNodes};
use qsd_node::qsd::Origin;
use qsd_node::ErrorKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_snapshot_that_backs_a_live_volume_keeps_its_data_and_its_layer() {
    let env = Env::new().await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    let data = pattern(9, MIB as usize);
    write_at(&export, 3 * MIB, &data);
    let snap = core.create_snapshot(&vol.id, &name("s")).await.expect("snapshot");
    let restored = core.create_volume(&restore_request("r", &snap.id)).await.expect("restore");
    let (pool, chain) = core.volume_chain(&vol.id).expect("chain");
    let snapshot_layer = pool.layer_path(chain[1]);

    core.delete_snapshot(&snap.id).await.expect("delete snapshot");
    assert!(snapshot_layer.exists(), "the layer still backs two volumes");
    assert_eq!(read_at(&export, 3 * MIB, MIB as usize), data);
    core.detach(&vol.id).await.expect("detach");
    core.delete_volume(&vol.id).await.expect("delete source");
    assert!(snapshot_layer.exists(), "the restored volume still needs the layer");
    let rexport =
        core.attach(&restored.id, ExportKind::Fuse).await.expect("attach restored").endpoint.path;
    assert_eq!(read_at(&rexport, 3 * MIB, MIB as usize), data);
    core.detach(&restored.id).await.expect("detach restored");
    core.delete_volume(&restored.id).await.expect("delete restored");
    assert!(!snapshot_layer.exists(), "nothing refers to the layer any more");
    assert!(env.layer_files().is_empty(), "{:?}", env.layer_files());
}

/// Runs 50 snapshot + delete cycles, writing a different pattern into one of 8 slots each time,
/// and checks the depth limit after every cycle and all data at the end.
async fn cycle_snapshots(kind: Option<ExportKind>, keep_first_snapshot: bool) {
    let env = Env::with_depth(3).await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let mut latest = [0u8; 8];
    if keep_first_snapshot {
        core.create_snapshot(&vol.id, &name("keep")).await.expect("kept snapshot");
    }
    let mut endpoint = match kind {
        Some(k) => Some(core.attach(&vol.id, k).await.expect("attach").endpoint),
        None => None,
    };
    for i in 0..50u32 {
        let slot = (i % 8) as u64;
        let value = (i + 1) as u8;
        let write = |e: &ExportEndpoint| match e.kind {
            ExportKind::Nbd => nbd_io(e, &format!("write -P {value} {} 1M", slot * MIB)),
            _ => write_at(&e.path, slot * MIB, &vec![value; MIB as usize]),
        };
        match &endpoint {
            Some(e) => write(e),
            None => {
                let e = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint;
                write(&e);
                core.detach(&vol.id).await.expect("detach");
            }
        }
        latest[slot as usize] = value;
        let snap = core.create_snapshot(&vol.id, &name(&format!("s{i}"))).await.expect("snapshot");
        core.delete_snapshot(&snap.id).await.expect("delete snapshot");
        let depth = core.get_volume(&vol.id).expect("volume").chain_depth;
        assert!(depth <= 3, "cycle {i}: depth {depth}");
    }
    if endpoint.is_none() {
        endpoint = Some(core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint);
    }
    let e = endpoint.expect("endpoint");
    for (slot, value) in latest.iter().enumerate() {
        match e.kind {
            ExportKind::Nbd => nbd_io(&e, &format!("read -P {value} {} 1M", slot as u64 * MIB)),
            _ => assert_eq!(
                read_at(&e.path, slot as u64 * MIB, MIB as usize),
                vec![*value; MIB as usize]
            ),
        }
    }
    if keep_first_snapshot {
        let kept = core
            .list_snapshots()
            .expect("list")
            .into_iter()
            .find(|s| s.id.name.as_str() == "keep")
            .expect("kept");
        let r = core.create_volume(&restore_request("r", &kept.id)).await.expect("restore kept");
        let re = core.attach(&r.id, ExportKind::Fuse).await.expect("attach").endpoint;
        assert_eq!(
            read_at(&re.path, 0, MIB as usize),
            vec![0u8; MIB as usize],
            "kept snapshot is still empty"
        );
    }
    let expected_layers = 3; // at most: head, one mergeable, and the kept or bottom layer
    assert!(
        env.layer_files().iter().filter(|f| f.ends_with(".qcow2")).count() <= expected_layers + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stay_within_their_depth_through_50_snapshot_cycles_online_over_nbd() {
    cycle_snapshots(Some(ExportKind::Nbd), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stay_within_their_depth_through_50_snapshot_cycles_online_over_fuse() {
    cycle_snapshots(Some(ExportKind::Fuse), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stay_within_their_depth_through_50_snapshot_cycles_offline() {
    cycle_snapshots(None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_beyond_the_depth_limit_that_cannot_be_merged_is_refused_cleanly() {
    let env = Env::with_depth(3).await;
    let core = env.core();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    core.create_snapshot(&vol.id, &name("a")).await.expect("a");
    core.create_snapshot(&vol.id, &name("b")).await.expect("b");
    let files = env.layer_files();
    let err = core.create_snapshot(&vol.id, &name("c")).await.expect_err("every layer is pinned");
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert_eq!(env.layer_files(), files, "no half-created overlay left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_threshold_fires_once_per_arming_and_a_missed_one_is_found_after_reconnect() {
    let mut env = Env::new().await;
    let core = env.core();
    let mut events = core.subscribe();
    let vol = core
        .create_volume(&CreateVolume::named("local", "v", 64 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    core.set_write_threshold(&vol.id, 4 * MIB, 8 * MIB).await.expect("arm");
    write_at(&export, 0, &pattern(1, 6 * MIB as usize));
    let first =
        wait_event(&mut events, |e| matches!(e, EngineEvent::WriteThresholdCrossed { .. })).await;
    let EngineEvent::WriteThresholdCrossed { threshold, missed, rearmed_at, .. } = first else {
        unreachable!()
    };
    assert_eq!((threshold, missed), (4 * MIB, false));
    assert!(rearmed_at >= 12 * MIB, "re-armed a step above the highest write: {rearmed_at}");
    let state = core.write_threshold(&vol.id).await.expect("state");
    assert_eq!(state.daemon_threshold, rearmed_at, "the daemon holds the new arming");
    // Writes below the new threshold raise nothing more.
    write_at(&export, 0, &pattern(2, 6 * MIB as usize));
    core.write_threshold(&vol.id).await.expect("barrier: a QMP round trip after the write");
    let extra = events.try_recv();
    assert!(matches!(extra, Err(tokio::sync::broadcast::error::TryRecvError::Empty)), "{extra:?}");
    // Crossing the new arming (by less than one step) raises exactly one more.
    write_at(&export, 8 * MIB, &pattern(3, 7 * MIB as usize));
    let second =
        wait_event(&mut events, |e| matches!(e, EngineEvent::WriteThresholdCrossed { .. })).await;
    assert!(
        matches!(second, EngineEvent::WriteThresholdCrossed { threshold, .. } if threshold == rearmed_at)
    );
    let state = core.write_threshold(&vol.id).await.expect("state");
    let extra = events.try_recv();
    assert!(matches!(extra, Err(tokio::sync::broadcast::error::TryRecvError::Empty)), "{extra:?}");

    // Now cross it while nobody listens: the plugin is down, the daemon keeps serving.
    drop(core);
    drop(events);
    drop(env.engine.take());
    let armed = state.daemon_threshold;
    write_at(&export, 30 * MIB, &pattern(4, 24 * MIB as usize));
    env.engine = Some(env.restart_engine().await);
    let mut events = env.engine().subscribe();
    let missed =
        wait_event(&mut events, |e| matches!(e, EngineEvent::WriteThresholdCrossed { .. })).await;
    assert!(
        matches!(missed, EngineEvent::WriteThresholdCrossed { threshold, missed: true, .. } if threshold == armed),
        "{missed:?}"
    );
    let state = env.engine().write_threshold(&vol.id).await.expect("state");
    assert!(state.daemon_threshold > armed, "re-armed after the missed event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_sigkill_is_restarted_and_every_attached_graph_rebuilt() {
    let env = Env::new().await;
    let core = env.core();
    let mut events = core.subscribe();
    let data = pattern(5, 2 * MIB as usize);
    let fuse = core
        .create_volume(&CreateVolume::named("local", "f", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let fuse_path = core.attach(&fuse.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&fuse_path, MIB, &data);
    core.create_snapshot(&fuse.id, &name("chain")).await.expect("snapshot: a two-layer chain");
    write_at(&fuse_path, 8 * MIB, &data);
    let nbd = core
        .create_volume(&CreateVolume::named("local", "n", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let nbd_ep = core.attach(&nbd.id, ExportKind::Nbd).await.expect("attach").endpoint;
    nbd_io(&nbd_ep, "write -P 0x3c 0 2M");
    nbd_io(&nbd_ep, "flush");
    core.set_qos(&fuse.id, qsd_node::engine::Qos { iops_total: 5000, ..Default::default() })
        .await
        .expect("qos");
    let old_pid = env.daemon_pid();
    let _ = wait_event(&mut events, is_reconciled).await; // the initial one

    env.kill_daemon();
    let event = wait_event(&mut events, is_reconciled).await;
    assert_eq!(reconciled_origin(&event), Some((Origin::Started, 2)));
    assert_ne!(env.daemon_pid(), old_pid);
    assert_eq!(read_at(&fuse_path, MIB, data.len()), data);
    assert_eq!(read_at(&fuse_path, 8 * MIB, data.len()), data);
    nbd_io(&nbd_ep, "read -P 0x3c 0 2M");
    let limits = core
        .daemon()
        .qmp()
        .call(&QomGetLimits {
            path: "g-".to_owned() + &group_tag(&env, &fuse.id.to_string()),
            property: "limits",
        })
        .await
        .expect("limits");
    assert_eq!(limits.iops_total, 5000, "QoS restored with the graph");
    // And the volumes remain fully operable.
    core.detach(&fuse.id).await.expect("detach after restart");
    core.detach(&nbd.id).await.expect("detach after restart");
}

fn group_tag(env: &Env, volume_id: &str) -> String {
    let name = volume_id.rsplit(':').next().expect("name");
    let record =
        std::fs::read(env.pool_dir().join("volumes").join(format!("{name}.json"))).expect("record");
    let v: serde_json::Value = serde_json::from_slice(&record).expect("json");
    v["uid"].as_str().expect("uid").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_adopts_the_running_daemon_and_its_exports() {
    let mut env = Env::new().await;
    let vol = env
        .core()
        .create_volume(&CreateVolume::named("local", "v", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let path = env.core().attach(&vol.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&path, 0, &pattern(8, MIB as usize));
    let pid = env.daemon_pid();
    env.engine = Some(env.restart_engine().await);
    let mut events = env.engine().subscribe();
    let event = wait_event(&mut events, is_reconciled).await;
    assert_eq!(reconciled_origin(&event), Some((Origin::Adopted, 0)));
    assert_eq!(env.daemon_pid(), pid, "same daemon");
    assert_eq!(read_at(&path, 0, MIB as usize), pattern(8, MIB as usize));
    env.core().detach(&vol.id).await.expect("detach after restart");
    env.core().delete_volume(&vol.id).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_create_snapshot_delete_cycles_leave_nothing_behind() {
    let env = Env::new().await;
    let core = env.core();
    for i in 0..500 {
        let vol = core
            .create_volume(
                &CreateVolume::named("local", &format!("v{i}"), 4 * MIB as i64).expect("request"),
            )
            .await
            .expect("create");
        let kind = if i % 2 == 0 { ExportKind::Nbd } else { ExportKind::Fuse };
        core.attach(&vol.id, kind).await.expect("attach");
        let snap = core.create_snapshot(&vol.id, &name(&format!("s{i}"))).await.expect("snapshot");
        if i % 10 == 0 {
            let r = core
                .create_volume(&restore_request(&format!("r{i}"), &snap.id))
                .await
                .expect("restore");
            core.delete_volume(&r.id).await.expect("delete restore");
        }
        core.detach(&vol.id).await.expect("detach");
        core.delete_snapshot(&snap.id).await.expect("delete snapshot");
        core.delete_volume(&vol.id).await.expect("delete");
    }
    assert!(env.layer_files().is_empty(), "files left: {:?}", env.layer_files());
    for dir in ["volumes", "snapshots"] {
        assert_eq!(std::fs::read_dir(env.pool_dir().join(dir)).expect("dir").count(), 0, "{dir}");
    }
    let qmp = core.daemon().qmp();
    let nodes = qmp.call(&QueryNamedBlockNodes { flat: true }).await.expect("nodes");
    assert!(
        nodes.is_empty(),
        "nodes left: {:?}",
        nodes.iter().map(|n| &n.node_name).collect::<Vec<_>>()
    );
    assert!(qmp.call(&QueryBlockExports {}).await.expect("exports").is_empty());
    let objects = qmp.call(&QomList { path: "/objects".into() }).await.expect("objects");
    assert!(!objects.iter().any(|o| o.kind.contains("throttle-group")), "{objects:?}");
    assert_eq!(
        std::fs::read_dir(env.dir.path().join("state/exports")).expect("exports").count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_limits_change_live_on_an_attached_volume() {
    let env = Env::new().await;
    let core = env.core();
    let mut request = CreateVolume::named("local", "v", 8 * MIB as i64).expect("request");
    request.qos = qsd_node::engine::Qos { bps_total: 10 << 20, ..Default::default() };
    let vol = core.create_volume(&request).await.expect("create");
    core.attach(&vol.id, ExportKind::Nbd).await.expect("attach");
    let group = format!("g-{}", group_tag(&env, &vol.id.to_string()));
    let qmp = core.daemon().qmp();
    let query = QomGetLimits { path: group.clone(), property: "limits" };
    assert_eq!(qmp.call(&query).await.expect("limits").bps_total, 10 << 20);
    core.set_qos(&vol.id, qsd_node::engine::Qos { iops_read: 300, ..Default::default() })
        .await
        .expect("modify");
    let limits = qmp.call(&query).await.expect("limits");
    assert_eq!((limits.bps_total, limits.iops_read), (0, 300));
}

/// A group snapshot checks every member before changing any: here the second member's
/// snapshot name is already taken from another volume, and the first member sits at its chain
/// limit (its snapshot would first merge the layer a deleted snapshot left). The refusal leaves
/// the first member's chain as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_group_snapshot_changes_no_member() {
    let env = Env::new().await;
    let core = env.core();
    let mut at_limit = CreateVolume::named("local", "full", 8 * MIB as i64).expect("request");
    at_limit.max_chain_depth = Some(2);
    let full = core.create_volume(&at_limit).await.expect("create");
    // A snapshot taken and deleted: its layer stays in the chain, free to be merged.
    let first = [(full.id.clone(), name("s1"))];
    let s1 = core
        .create_snapshot_group(SnapshotBatch { items: &first, group: None, freeze: false })
        .await
        .expect("snapshot");
    core.delete_snapshot(&s1[0].id).await.expect("delete the snapshot");
    assert_eq!(core.get_volume(&full.id).expect("volume").chain_depth, 2, "at its limit");
    let other = core
        .create_volume(&CreateVolume::named("local", "other", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let third = core
        .create_volume(&CreateVolume::named("local", "third", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let taken = [(other.id.clone(), name("taken"))];
    core.create_snapshot_group(SnapshotBatch { items: &taken, group: None, freeze: false })
        .await
        .expect("the name taken from another volume");
    let items = [(full.id.clone(), name("s2")), (third.id.clone(), name("taken"))];
    let refused = core
        .create_snapshot_group(SnapshotBatch { items: &items, group: None, freeze: false })
        .await
        .expect_err("the second name is taken");
    assert_eq!(refused.kind(), qsd_node::ErrorKind::AlreadyExists, "{refused}");
    assert_eq!(
        core.get_volume(&full.id).expect("volume").chain_depth,
        2,
        "the first member's chain was not shortened for a snapshot that was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_captures_every_volume_at_one_instant() {
    let env = Env::new().await;
    let core = env.core();
    let mut paths = Vec::new();
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let v = core
            .create_volume(&CreateVolume::named("local", name, 8 * MIB as i64).expect("request"))
            .await
            .expect("create");
        let p = core.attach(&v.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
        write_at(&p, 0, &pattern(1, MIB as usize));
        paths.push(p);
        ids.push(v.id);
    }
    let items: Vec<(ObjectId, ObjectName)> =
        ids.iter().zip(["sa", "sb", "sc"]).map(|(v, s)| (v.clone(), name(s))).collect();
    // No node service here to freeze (the next test): the one instant is the transaction's.
    let batch = SnapshotBatch { items: &items, group: None, freeze: false };
    let snaps = core.create_snapshot_group(batch).await.expect("group snapshot");
    for p in &paths {
        write_at(p, 0, &pattern(2, MIB as usize));
    }
    for (i, s) in snaps.iter().enumerate() {
        let r =
            core.create_volume(&restore_request(&format!("r{i}"), &s.id)).await.expect("restore");
        let rp = core.attach(&r.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
        assert_eq!(read_at(&rp, 0, MIB as usize), pattern(1, MIB as usize));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_to_freeze_an_attached_volume_with_nothing_to_freeze_it_is_refused() {
    let env = Env::new().await;
    let core = env.core();
    let attached = core
        .create_volume(&CreateVolume::named("local", "attached", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let idle = core
        .create_volume(&CreateVolume::named("local", "idle", 8 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let path = core.attach(&attached.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&path, 0, &pattern(1, MIB as usize));
    let layers = env.layer_files();
    let items = [(idle.id.clone(), name("s-idle")), (attached.id.clone(), name("s-attached"))];
    let refused = core
        .create_snapshot_group(SnapshotBatch { items: &items, group: None, freeze: true })
        .await
        .expect_err("no freezer is registered on this engine");
    assert_eq!(refused.kind(), ErrorKind::FailedPrecondition, "{refused}");
    assert!(refused.to_string().contains(&attached.id.to_string()), "{refused}");
    assert!(core.list_snapshots().expect("list").is_empty(), "no member was taken");
    assert_eq!(env.layer_files(), layers, "no overlay was left behind");
    // A volume attached nowhere has nothing to freeze; unfrozen is taken as asked.
    let one = [(idle.id.clone(), name("s-idle"))];
    core.create_snapshot_group(SnapshotBatch { items: &one, group: None, freeze: true })
        .await
        .expect("nothing attached, nothing to freeze");
    let one = [(attached.id.clone(), name("s-attached"))];
    core.create_snapshot_group(SnapshotBatch { items: &one, group: None, freeze: false })
        .await
        .expect("taken without freezing when so asked");
    write_at(&path, 0, &pattern(2, MIB as usize));
    assert_eq!(read_at(&path, 0, MIB as usize), pattern(2, MIB as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_operation_on_a_busy_volume_is_aborted_while_others_proceed() {
    let env = Env::new().await;
    let core = env.core();
    let src = core
        .create_volume(&CreateVolume::named("local", "src", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let export = core.attach(&src.id, ExportKind::Fuse).await.expect("attach").endpoint.path;
    write_at(&export, 0, &pattern(1, 4 * MIB as usize));
    let request = clone_request("copy", &src.id);
    let mut task = core.start_clone_with_speed(&request, Some(1)).await.expect("clone");
    task.job().expect("job").running().await.expect("running");
    let busy = core.create_snapshot(&src.id, &name("s")).await.expect_err("source is busy");
    assert_eq!(busy.kind(), ErrorKind::Aborted);
    let busy = core.expand_volume(&src.id, 32 * MIB as i64).await.expect_err("source is busy");
    assert_eq!(busy.kind(), ErrorKind::Aborted);
    core.create_volume(&CreateVolume::named("local", "other", 4 * MIB as i64).expect("request"))
        .await
        .expect("other volumes proceed");
    task.job().expect("job").set_speed(0).await.expect("unthrottle");
    task.finish().await.expect("clone finishes");
    core.create_snapshot(&src.id, &name("s")).await.expect("free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_that_cannot_be_rebuilt_is_reported_and_retried_while_the_others_serve() {
    let mut env = Env::new().await;
    let core = env.core();
    let broken = core
        .create_volume(&CreateVolume::named("local", "broken", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let fine = core
        .create_volume(&CreateVolume::named("local", "fine", 16 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let broken_ep = core.attach(&broken.id, ExportKind::Nbd).await.expect("attach").endpoint;
    let fine_ep = core.attach(&fine.id, ExportKind::Nbd).await.expect("attach").endpoint;
    nbd_io(&fine_ep, "write -P 0x5a 0 1M");
    nbd_io(&broken_ep, "write -P 0x6b 0 1M");
    nbd_io(&broken_ep, "flush");
    drop(core);
    // The plugin stops and the daemon dies with the node; one volume's head is out of reach
    // when the plugin starts again.
    drop(env.engine.take());
    let pid = std::fs::read_to_string(env.dir.path().join("run/qsd.pid")).expect("pid");
    assert!(std::process::Command::new("kill").args(["-KILL", pid.trim()]).status().is_ok());
    let record = std::fs::read(env.pool_dir().join("volumes/broken.json")).expect("record");
    let head: serde_json::Value = serde_json::from_slice(&record).expect("json");
    let image =
        env.pool_dir().join(format!("layers/{}.qcow2", head["head"].as_str().expect("head")));
    let aside = image.with_extension("aside");
    std::fs::rename(&image, &aside).expect("move the head away");

    let engine = Engine::open(env.config.clone()).await.expect("opens, one volume notwithstanding");
    env.engine = Some(engine);
    let core = env.core();
    let mut events = core.subscribe();
    let _ = wait_event(&mut events, is_reconciled).await; // the opening one
    nbd_io(&fine_ep, "read -P 0x5a 0 1M");
    let findings = core.volume_health(&broken.id).await.expect("health");
    assert!(findings.iter().any(|f| f.reason == "NotReconciled"), "{findings:?}");
    let reasons = |f: Vec<qsd_csi_model::health::Finding>| -> Vec<String> {
        f.into_iter().map(|f| f.reason).collect()
    };
    let fine_health = core.volume_health(&fine.id).await.expect("health");
    assert_eq!(reasons(fine_health), env.pool_space_reasons());

    std::fs::rename(&aside, &image).expect("the head is back");
    let _ = wait_event(&mut events, is_rebuilt).await; // the supervisor's retry
    let findings = core.volume_health(&broken.id).await.expect("health");
    assert_eq!(reasons(findings), env.pool_space_reasons(), "rebuilt: nothing of its own");
    nbd_io(&broken_ep, "read -P 0x6b 0 1M");
    core.detach(&broken.id).await.expect("detach");
    core.detach(&fine.id).await.expect("detach");
}
