//! The standalone driver SIGKILLed at each step of each multi-command operation (a fault point
//! per step, `qsd_node::fault`): it comes back within 10 s, the CO's retry of the interrupted
//! call succeeds, every image passes `qemu-img check`, no layer, node, export, job or intent
//! is orphaned, data written before the kill reads back, and deleting everything leaves
//! nothing behind. Real daemon, real qcow2 files, real ext4 on loop devices over FUSE exports.

mod common;

use std::time::Duration;

use common::{mount_cap, tidy, Driver, MIB};
use qsd_csi_proto::csi;
use qsd_node::fault::POINTS;

/// How long a restarted driver may take to answer ready.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// What the interrupted call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Create,
    Snapshot,
    /// A group snapshot of the source volume and a second, detached one.
    Group,
    Clone,
    Expand,
    Shorten,
    Stage,
    /// NodeUnstageVolume of the published source volume, unpublished first.
    Unstage,
}

fn call_of(point: &str) -> Call {
    match point.split(':').next() {
        Some("create") => Call::Create,
        Some("snapshot") => Call::Snapshot,
        Some("clone") => Call::Clone,
        Some("expand") => Call::Expand,
        Some("shorten") => Call::Shorten,
        Some("stage") => Call::Stage,
        Some("unstage" | "undo-stage") => Call::Unstage,
        _ => panic!("no scenario reaches fault point {point}"),
    }
}

fn points(call: Call) -> Vec<&'static str> {
    POINTS.iter().copied().filter(|p| call_of(p) == call).collect()
}

/// The volume every scenario but Create starts from; `maxChainDepth` 3 lets the shorten
/// scenario reach its merge with three snapshots.
async fn source_volume(d: &mut Driver) -> csi::Volume {
    let req = csi::CreateVolumeRequest {
        name: "vol".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap("ext4")],
        parameters: [(qsd_csi_model::params::MAX_CHAIN_DEPTH.to_owned(), "3".to_owned())].into(),
        ..Default::default()
    };
    d.controller.create_volume(req).await.expect("create").into_inner().volume.expect("volume")
}

async fn snapshot(
    d: &mut Driver,
    volume: &str,
    name: &str,
) -> Result<csi::Snapshot, tonic::Status> {
    let req = csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        ..Default::default()
    };
    Ok(d.controller.create_snapshot(req).await?.into_inner().snapshot.expect("snapshot"))
}

/// The call a fault point interrupts; the CO sends it again, unchanged, after the restart.
async fn issue(
    d: &mut Driver,
    call: Call,
    volume: Option<&csi::Volume>,
) -> Result<(), tonic::Status> {
    let cap = mount_cap("ext4");
    let id = volume.map(|v| v.volume_id.clone()).unwrap_or_default();
    match call {
        Call::Group => {
            use csi::group_controller_client::GroupControllerClient;
            let second = d
                .controller
                .list_volumes(csi::ListVolumesRequest::default())
                .await?
                .into_inner()
                .entries
                .into_iter()
                .filter_map(|e| e.volume)
                .find(|v| v.volume_id.ends_with(":second"))
                .expect("the group's second volume");
            let mut groups = GroupControllerClient::new(Driver::connect(&d.path("csi.sock")).await);
            let req = csi::CreateVolumeGroupSnapshotRequest {
                name: "group".into(),
                source_volume_ids: vec![id, second.volume_id],
                ..Default::default()
            };
            groups.create_volume_group_snapshot(req).await.map(drop)
        }
        Call::Create => d.create("new", 64 * MIB, &cap, None).await.map(drop),
        Call::Snapshot => snapshot(d, &id, "snap").await.map(drop),
        Call::Shorten => snapshot(d, &id, "s3").await.map(drop),
        Call::Clone => {
            use csi::volume_content_source::{Type, VolumeSource};
            let source = Type::Volume(VolumeSource { volume_id: id });
            d.create("copy", 64 * MIB, &cap, Some(source)).await.map(drop)
        }
        Call::Expand => {
            let req = csi::ControllerExpandVolumeRequest {
                volume_id: id,
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 128 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            };
            d.controller.controller_expand_volume(req).await.map(drop)
        }
        Call::Unstage => unreachable!("an unstage has its own scenario"),
        Call::Stage => {
            let volume = volume.expect("a volume");
            let req = csi::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: d.path("staging-crash").display().to_string(),
                volume_capability: Some(cap),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            };
            d.node.node_stage_volume(req).await.map(drop)
        }
    }
}

/// Every scenario runs on a local pool and on a shared one: a local pool also collects, when
/// it opens, images and layers nothing records or needs; a shared pool cannot (another node may
/// be writing them), so there recovery alone tidies.
async fn killed_at(point: &str, attached: bool) {
    killed_during(point, call_of(point), attached).await;
}

/// [`killed_at`], the call made explicit (a group snapshot reaches the snapshot's points).
async fn killed_during(point: &str, call: Call, attached: bool) {
    for shared in [false, true] {
        killed_in(point, call, attached, shared, false).await;
    }
}

/// Points inside a snapshot's freeze: a filesystem write there waits for the restarted
/// driver to thaw it.
const FROZEN: &[&str] = &[
    "snapshot:after-intent",
    "snapshot:after-overlay-image",
    "snapshot:after-overlay-node",
    "snapshot:after-head-record",
];

/// One run: the driver killed at `point` during its call, restarted, the call retried.
/// `attached`: the source volume is staged, published and holds a file first.
/// `daemon_too`: the daemon dies after the driver (a node losing power): the next start has a
/// fresh daemon that knows nothing of the operation; where the filesystem is not frozen, a
/// file written and synced between the two deaths must survive too.
async fn killed_in(point: &str, call: Call, attached: bool, shared: bool, daemon_too: bool) {
    let mut d = Driver::start_armed(point, shared).await;
    let volume = match call {
        Call::Create => None,
        _ => Some(source_volume(&mut d).await),
    };
    if call == Call::Group {
        d.create("second", 64 * MIB, &mount_cap("ext4"), None).await.expect("second volume");
    }
    let mut written = None;
    if let (Some(v), true) = (&volume, attached) {
        let target = d.stage_and_publish(v, &mount_cap("ext4"), false).await.expect("publish");
        let file = target.join("before-the-kill");
        std::fs::write(&file, point.as_bytes()).expect("write");
        common::sync_fs(&target);
        written = Some(file);
    }
    if call == Call::Shorten {
        let id = volume.as_ref().map(|v| v.volume_id.clone()).unwrap_or_default();
        let s1 = snapshot(&mut d, &id, "s1").await.expect("s1").snapshot_id;
        snapshot(&mut d, &id, "s2").await.expect("s2");
        let req = csi::DeleteSnapshotRequest { snapshot_id: s1, ..Default::default() };
        d.controller.delete_snapshot(req).await.expect("delete s1");
    }
    let died = issue(&mut d, call, volume.as_ref()).await;
    assert!(died.is_err(), "{point}: the call should have died with the driver: {died:?}");
    if point == "stage:after-format" {
        half_made_filesystem(&d);
    }
    let mut late = None;
    if daemon_too {
        if let Some(file) = written.as_ref().filter(|_| !FROZEN.contains(&point)) {
            let after = file.with_file_name("after-the-kill");
            std::fs::write(&after, point.as_bytes()).expect("write after the driver died");
            common::sync_fs(file.parent().expect("mount"));
            late = Some(after);
        }
        let pid = std::fs::read_to_string(d.path("state/run/qsd.pid")).expect("daemon pid");
        let killed = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill the daemon");
        let proc = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
        common::wait_until("the daemon to die", || !proc.exists());
    }
    let took = d.restart_after_crash().await;
    assert!(took < BACK_WITHIN, "{point}: back after {took:?}");
    if let (true, Some(v)) = (daemon_too && attached, volume.as_ref()) {
        // The kernel device of a FUSE export does not outlive its daemon: as after a reboot,
        // the volume is staged again before anything uses it.
        d.unpublish_and_unstage(&v.volume_id).await;
        d.stage_and_publish(v, &mount_cap("ext4"), false).await.expect("publish again");
    }
    issue(&mut d, call, volume.as_ref()).await.unwrap_or_else(|e| panic!("{point}: retry: {e}"));
    tidy::assert_pool_consistent(&d);
    tidy::assert_daemon_tidy(&d).await;
    for file in written.iter().chain(late.iter()) {
        let read = std::fs::read(file).unwrap_or_else(|e| panic!("{point}: read back: {e}"));
        assert_eq!(
            read,
            point.as_bytes(),
            "{point}: {} written before the daemon died",
            file.display()
        );
    }
    tidy::delete_everything(&mut d).await;
    let pool = if shared { "shared" } else { "local" };
    let deaths = if daemon_too { "driver and daemon" } else { "driver" };
    eprintln!("crash: {point} in {call:?} ({pool} pool, attached: {attached}, {deaths} killed): back in {took:?}, retry ok, tidy");
}

/// Leaves on the staged device what a mkfs killed half-way leaves: its superblock written,
/// everything after the first 4 KiB not yet (blkid calls it ext4; it cannot be mounted).
fn half_made_filesystem(d: &Driver) {
    let records = std::fs::read_dir(d.path("state/staging")).expect("staging journal");
    let record = records.flatten().find(|e| e.file_name().to_string_lossy().ends_with(".json"));
    let bytes = std::fs::read(record.expect("a staging record").path()).expect("read");
    let staged: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let device = staged["device"].as_str().expect("the device was recorded");
    let zeroed = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4096", "seek=1", "count=1024", "conv=fsync"])
        .arg(format!("of={device}"))
        .output()
        .expect("dd");
    assert!(zeroed.status.success(), "{}", String::from_utf8_lossy(&zeroed.stderr));
}

#[tokio::test]
async fn a_create_killed_at_any_step_is_undone_and_its_retry_succeeds() {
    for point in points(Call::Create) {
        killed_at(point, false).await;
    }
}

#[tokio::test]
async fn a_snapshot_of_a_mounted_volume_killed_at_any_step_is_completed_or_undone() {
    for point in points(Call::Snapshot) {
        killed_at(point, true).await;
    }
}

#[tokio::test]
async fn a_snapshot_whose_node_lost_power_midway_keeps_every_write_the_daemon_took() {
    for point in points(Call::Snapshot) {
        for shared in [false, true] {
            killed_in(point, Call::Snapshot, true, shared, true).await;
        }
    }
}

#[tokio::test]
async fn a_snapshot_of_a_detached_volume_killed_at_any_step_is_completed_or_undone() {
    for point in points(Call::Snapshot) {
        killed_at(point, false).await;
    }
}

#[tokio::test]
async fn a_group_snapshot_of_a_mounted_and_a_detached_volume_killed_at_any_step_is_all_or_nothing()
{
    for point in points(Call::Snapshot) {
        killed_during(point, Call::Group, true).await;
    }
}

#[tokio::test]
async fn a_full_clone_killed_at_any_step_leaves_no_target_and_its_retry_copies() {
    // Detached, the source chain is opened under a temporary tag, nested: what the old
    // start-up sweep tried to delete bottom-up while the backup job still used it.
    for point in points(Call::Clone) {
        killed_at(point, true).await;
        killed_at(point, false).await;
    }
}

#[tokio::test]
async fn an_expansion_and_a_chain_shortening_killed_midway_are_completed_or_undone() {
    for call in [Call::Expand, Call::Shorten] {
        for point in points(call) {
            killed_at(point, true).await;
        }
    }
}

/// NodeUnstageVolume for `volume`, at the staging path `Driver::stage_and_publish` used.
async fn unstage(d: &mut Driver, volume: &csi::Volume) -> Result<(), tonic::Status> {
    let id = &volume.volume_id;
    let req = csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: d
            .path(&format!("staging-{}", common::short(id)))
            .display()
            .to_string(),
    };
    d.node.node_unstage_volume(req).await.map(drop)
}

/// An unstage killed at each of its steps: the restart finishes it. Before the CO's retry a
/// second volume is staged, and takes the loop device the first one let go of (the kernel
/// hands out the lowest free number): the retry succeeds, and leaves that device, its mount
/// and its data alone. (Before unstaging was journaled, a kill after the device was detached
/// left a complete record naming it, and the retry found the second volume's mount on "its"
/// device: FAILED_PRECONDITION until that volume went away, then a detach of its device.)
#[tokio::test]
async fn an_unstage_killed_at_any_step_is_finished_and_leaves_the_next_volumes_device_alone() {
    let cap = mount_cap("ext4");
    for point in points(Call::Unstage) {
        let mut d = Driver::start_armed(point, false).await;
        let first = source_volume(&mut d).await;
        d.stage_and_publish(&first, &cap, false).await.expect("publish");
        let target = d.path(&format!("target-{}", common::short(&first.volume_id)));
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: first.volume_id.clone(),
            target_path: target.display().to_string(),
        };
        d.node.node_unpublish_volume(req).await.expect("unpublish");
        let died = unstage(&mut d, &first).await;
        assert!(died.is_err(), "{point}: the unstage should have died with the driver");
        let took = d.restart_after_crash().await;
        assert!(took < BACK_WITHIN, "{point}: back after {took:?}");

        let second = d.create("second", 64 * MIB, &cap, None).await.expect("second volume");
        let mounted = d.stage_and_publish(&second, &cap, false).await.expect("publish second");
        std::fs::write(mounted.join("data"), point.as_bytes()).expect("write");
        unstage(&mut d, &first).await.unwrap_or_else(|e| panic!("{point}: retry: {e}"));
        common::sync_fs(&mounted);
        let read = std::fs::read(mounted.join("data")).expect("the second volume still reads");
        assert_eq!(read, point.as_bytes(), "{point}: the second volume's data");
        d.unpublish_and_unstage(&second.volume_id).await;
        tidy::assert_pool_consistent(&d);
        tidy::assert_daemon_tidy(&d).await;
        tidy::delete_everything(&mut d).await;
        eprintln!("crash: {point} in an unstage: back in {took:?}, retry ok, tidy");
    }
}

#[tokio::test]
async fn a_stage_killed_at_any_step_is_undone_and_its_retry_stages_cleanly() {
    for point in points(Call::Stage) {
        killed_at(point, false).await;
    }
}

#[test]
fn every_fault_point_has_a_scenario_that_reaches_it() {
    for point in POINTS {
        call_of(point);
    }
}
