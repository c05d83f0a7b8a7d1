//! What a driver must leave after recovering from a kill, and after everything is deleted.
//!
//! - every image passes `qemu-img check`; every layer file has a record and every record is
//!   needed (a volume's head, a snapshot's layer, or a needed layer's backing);
//! - no operation intent is left; every staging record is complete;
//! - the daemon exports and holds nodes only for attached volumes, and runs no block job;
//! - once everything listed is deleted: no layer, record, mount or loop device is left.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use qsd_csi_proto::csi;
use serde_json::Value;

use super::Driver;

fn records(dir: &Path) -> Vec<Value> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !name.starts_with('.') {
            let bytes = std::fs::read(entry.path()).expect("read record");
            all.push(serde_json::from_slice(&bytes).expect("record parses"));
        }
    }
    all
}

fn field(v: &Value, key: &str) -> String {
    v[key].as_str().map(str::to_owned).unwrap_or_default()
}

fn pool(d: &Driver) -> PathBuf {
    d.path("state/pools/default")
}

/// The uids of the volumes attached on this node (its attachment journal).
fn attached_uids(d: &Driver) -> BTreeSet<String> {
    records(&d.path("state/attachments")).iter().map(|r| field(r, "uid")).collect()
}

/// Asserts the pool's files and records agree and every image is sound.
pub fn assert_pool_consistent(d: &Driver) {
    let pool = pool(d);
    let layers = records(&pool.join("layers"));
    let mut needed: BTreeSet<String> = BTreeSet::new();
    needed.extend(records(&pool.join("volumes")).iter().map(|v| field(v, "head")));
    needed.extend(records(&pool.join("snapshots")).iter().map(|s| field(s, "layer")));
    // Backing layers of needed layers are needed in turn.
    loop {
        let more: Vec<String> = layers
            .iter()
            .filter(|l| needed.contains(&field(l, "id")))
            .map(|l| field(l, "backing"))
            .filter(|b| !b.is_empty() && !needed.contains(b))
            .collect();
        if more.is_empty() {
            break;
        }
        needed.extend(more);
    }
    let recorded: BTreeSet<String> = layers.iter().map(|l| field(l, "id")).collect();
    assert_eq!(recorded, needed, "every layer record is needed, and every needed layer recorded");
    let files: BTreeSet<String> = std::fs::read_dir(pool.join("layers"))
        .expect("layers")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".qcow2").map(str::to_owned))
        .collect();
    assert_eq!(files, recorded, "every image has a record and every record an image");
    for layer in &files {
        let image = pool.join("layers").join(format!("{layer}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["check", "-U", "-q"])
            .arg(&image)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "qemu-img check {}: {}{}",
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Asserts no intent or half-done stage is left, and the daemon holds only what attached
/// volumes need: their exports and nodes, and no block job.
pub async fn assert_daemon_tidy(d: &Driver) {
    assert!(records(&d.path("state/operations")).is_empty(), "an operation intent was left");
    for staged in records(&d.path("state/staging")) {
        assert_ne!(staged["complete"], Value::Bool(false), "a half-done stage was left: {staged}");
    }
    let attached = attached_uids(d);
    let qmp = qsd_node::qmp::QmpClient::connect(&d.path("state/run/qmp-operator.sock"))
        .await
        .expect("the operator monitor");
    let exports = qsd_node::graph::export_ids(&qmp).await.expect("exports");
    for export in &exports {
        let tag = export.get(2..14).unwrap_or_default();
        assert!(attached.contains(tag), "export {export} of no attached volume");
    }
    let graph = qsd_node::graph::block_graph(&qmp).await.expect("graph");
    let roots: Vec<String> = attached.iter().map(|uid| format!("t-{uid}")).collect();
    let kept = graph.reachable_from(roots.iter().map(String::as_str));
    for node in graph.node_names() {
        let ours = ["q-", "t-", "c-", "f-"].iter().any(|p| node.starts_with(p));
        assert!(!ours || kept.contains(&node), "node {node} is orphaned: {:?}", graph.users(&node));
    }
    let jobs = qmp.call(&qsd_node::qmp::commands::QueryJobs {}).await.expect("jobs");
    assert!(
        jobs.is_empty(),
        "block jobs left: {:?}",
        jobs.iter().map(|j| &j.id).collect::<Vec<_>>()
    );
}

/// Unpublishes and unstages every staged volume (by the staging journal), deletes every
/// snapshot and volume the driver lists, and asserts nothing is left: no layer or record, no
/// mount and no loop device under the driver's directory.
pub async fn delete_everything(d: &mut Driver) {
    for staged in records(&d.path("state/staging")) {
        let id = field(&staged, "volume_id");
        for target in staged["targets"].as_array().into_iter().flatten() {
            let target = target.as_str().unwrap_or_default().to_owned();
            d.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target,
                })
                .await
                .expect("unpublish");
        }
        d.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: field(&staged, "staging_path"),
            })
            .await
            .expect("unstage");
    }
    let snapshots = d
        .controller
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("list snapshots")
        .into_inner()
        .entries;
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for s in snapshots.into_iter().filter_map(|e| e.snapshot) {
        if !s.group_snapshot_id.is_empty() {
            groups.entry(s.group_snapshot_id).or_default().push(s.snapshot_id);
            continue;
        }
        let req = csi::DeleteSnapshotRequest { snapshot_id: s.snapshot_id, ..Default::default() };
        d.controller.delete_snapshot(req).await.expect("delete snapshot");
    }
    if !groups.is_empty() {
        use csi::group_controller_client::GroupControllerClient;
        let mut client = GroupControllerClient::new(Driver::connect(&d.path("csi.sock")).await);
        for (group_snapshot_id, snapshot_ids) in groups {
            let req = csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id,
                snapshot_ids,
                ..Default::default()
            };
            client.delete_volume_group_snapshot(req).await.expect("delete group snapshot");
        }
    }
    let volumes = d
        .controller
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("list volumes")
        .into_inner()
        .entries;
    for v in volumes.into_iter().filter_map(|e| e.volume) {
        d.delete(&v.volume_id).await;
    }
    let pool = pool(d);
    for dir in ["layers", "volumes", "snapshots"] {
        let left: Vec<_> = std::fs::read_dir(pool.join(dir))
            .expect("pool dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{dir} left in the pool: {left:?}");
    }
    let under = d.dir.path().display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&under))
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:?}");
    let loops = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    let loops = String::from_utf8_lossy(&loops.stdout).into_owned();
    let ours: Vec<&str> = loops.lines().filter(|l| l.contains(&under)).collect();
    assert!(ours.is_empty(), "loop devices left: {ours:?}");
}
