//! Volume and storage health (CSI v1.13's alpha health RPCs) through the built `qsd-csi
//! standalone`, from conditions made for real: a pool filesystem filled up, a layer file
//! removed, the daemon stopped.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use qsd_csi_proto::csi;

type Statuses = Vec<(i32, String)>;

async fn controller_health(d: &mut Driver, volume_id: &str) -> Statuses {
    let req =
        csi::ControllerGetVolumeHealthRequest { volume_id: volume_id.into(), ..Default::default() };
    let health = d.controller.controller_get_volume_health(req).await.expect("controller health");
    let health = health.into_inner().volume_health.expect("volume health");
    assert_eq!(health.volume_id, volume_id);
    health.health_statuses.into_iter().map(|s| (s.status, s.reason)).collect()
}

async fn node_health(d: &mut Driver, volume_id: &str) -> Statuses {
    let req = csi::NodeGetVolumeHealthRequest { volume_id: volume_id.into(), ..Default::default() };
    let health = d.node.node_get_volume_health(req).await.expect("node health");
    let health = health.into_inner().volume_health.expect("volume health");
    health.health_statuses.into_iter().map(|s| (s.status, s.reason)).collect()
}

async fn storage_health(d: &mut Driver) -> Statuses {
    let health = d.node.node_get_storage_health(csi::NodeGetStorageHealthRequest::default()).await;
    let health = health.expect("storage health").into_inner();
    health.backend_health.into_iter().map(|b| (b.status, b.reason)).collect()
}

async fn listed(d: &mut Driver) -> Vec<(String, Statuses)> {
    let list = d
        .controller
        .controller_list_volume_health(csi::ControllerListVolumeHealthRequest::default());
    let list = list.await.expect("list health").into_inner();
    list.entries
        .into_iter()
        .map(|v| {
            (v.volume_id, v.health_statuses.into_iter().map(|s| (s.status, s.reason)).collect())
        })
        .collect()
}

fn layers(pool: &std::path::Path) -> Vec<PathBuf> {
    let files = std::fs::read_dir(pool.join("layers")).expect("layers").flatten();
    files.map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "qcow2")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_full_pool_a_lost_layer_and_a_stopped_daemon_and_clears_when_fixed() {
    use csi::StorageHealthErrorType as S;
    use csi::VolumeHealthErrorType as V;
    let pool = Tmpfs::new("160m");
    let mut d =
        Driver::start_with(vec!["--pool".into(), format!("small={}", pool.0.display())]).await;
    let cap = block_cap();
    let attached = d.create("attached", 64 << 20, &cap, None).await.expect("create");
    d.stage_and_publish(&attached, &cap, false).await.expect("publish");
    let a = attached.volume_id.clone();
    let healthy = (controller_health(&mut d, &a).await, node_health(&mut d, &a).await);
    assert_eq!(healthy, (vec![], vec![]), "a fresh staged volume is healthy");
    assert_eq!(storage_health(&mut d).await, vec![]);
    assert_eq!(listed(&mut d).await, vec![]);

    // The pool fills up: writes to unallocated space would fail with ENOSPC.
    let filler = pool.fill();
    let full = (V::Degraded as i32, "PoolFull".to_owned());
    assert_eq!(controller_health(&mut d, &a).await, vec![full.clone()]);
    assert_eq!(node_health(&mut d, &a).await, vec![full.clone()]);
    assert_eq!(storage_health(&mut d).await, vec![(S::StorageDegraded as i32, "PoolFull".into())]);
    assert_eq!(listed(&mut d).await, vec![(a.clone(), vec![full])]);
    std::fs::remove_file(filler).expect("free the pool");
    assert_eq!(controller_health(&mut d, &a).await, vec![], "cleared once there is room again");

    // A detached volume's only layer is removed behind the driver's back.
    let before = layers(&pool.0);
    let lost = d.create("lost", 16 << 20, &cap, None).await.expect("create");
    let new: Vec<_> = layers(&pool.0).into_iter().filter(|l| !before.contains(l)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    std::fs::remove_file(&new[0]).expect("remove the layer");
    let loss = vec![(V::DataLoss as i32, "LayerMissing".to_owned())];
    assert_eq!(controller_health(&mut d, &lost.volume_id).await, loss);
    assert_eq!(listed(&mut d).await, vec![(lost.volume_id.clone(), loss)]);

    // The daemon stops answering: an attached volume is inaccessible, the storage unreachable.
    let daemon = d.daemon_pid();
    assert!(Command::new("kill").args(["-STOP", &daemon]).status().expect("kill").success());
    let stopped = (controller_health(&mut d, &a).await, storage_health(&mut d).await);
    assert!(Command::new("kill").args(["-CONT", &daemon]).status().expect("kill").success());
    assert_eq!(
        stopped,
        (
            vec![(V::Inaccessible as i32, "DaemonUnreachable".to_owned())],
            vec![(S::StorageUnreachable as i32, "DaemonUnreachable".to_owned())]
        )
    );
    assert_eq!(controller_health(&mut d, &a).await, vec![]);
    let missing = csi::ControllerGetVolumeHealthRequest {
        volume_id: a.replace(":attached", ":nope"),
        ..Default::default()
    };
    let missing = d.controller.controller_get_volume_health(missing).await;
    assert_eq!(missing.err().map(|s| s.code()), Some(tonic::Code::NotFound));
    d.unpublish_and_unstage(&a).await;
}
