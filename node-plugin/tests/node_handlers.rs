//! The Node service's handlers as a table of steps, through its seams: a real daemon, export and
//! loop device, and a mounter that only records what it is asked (so each decision, not mkfs or
//! mount, is what is tested). Each row is one CSI call and the code the CO must hear; changing a
//! decision or a code mapping fails the row that names it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::*;
use qsd_node::csi::csi::node_server::Node;
use qsd_node::csi::{csi, NodeConfig, NodeService, Seams};
use qsd_node::device::{Backend, Choice, Probes};
use qsd_node::engine::CreateVolume;
use qsd_node::error::Result;
use qsd_node::mount::{FsUsage, Mounter};
use tonic::Code;

/// Mounts in memory: target → what is mounted there.
#[derive(Debug, Default)]
struct RecordingMounter {
    mounts: Mutex<BTreeMap<PathBuf, PathBuf>>,
    /// The options each filesystem mount was made with.
    options: Mutex<BTreeMap<PathBuf, Vec<String>>>,
}

impl RecordingMounter {
    fn add(&self, source: &Path, target: &Path) {
        self.mounts.lock().expect("mounts").insert(target.to_owned(), source.to_owned());
    }
}

#[tonic::async_trait]
impl Mounter for RecordingMounter {
    fn is_mountpoint(&self, path: &Path) -> bool {
        self.mounts.lock().expect("mounts").contains_key(path)
    }
    fn mounts_of(&self, device: &Path) -> Result<Vec<PathBuf>> {
        let mounts = self.mounts.lock().expect("mounts");
        Ok(mounts.iter().filter(|(_, s)| *s == device).map(|(t, _)| t.clone()).collect())
    }
    async fn probe_fs(&self, _: &Path) -> Result<Option<String>> {
        Ok(None)
    }
    async fn format(&self, _: &Path, _: &str) -> Result<()> {
        Ok(())
    }
    async fn wipe(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn grow_unmounted_ext(&self, _: &Path, _: &str) -> Result<bool> {
        Ok(false)
    }
    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        _: Option<&str>,
        options: &[String],
    ) -> Result<()> {
        self.options.lock().expect("options").insert(target.to_owned(), options.to_vec());
        self.add(device, target);
        Ok(())
    }
    async fn grow_mounted_xfs(&self, _: &Path, _: &Path, _: &str) -> Result<bool> {
        Ok(false)
    }
    async fn bind(&self, source: &Path, target: &Path, _: bool) -> Result<()> {
        self.add(source, target);
        Ok(())
    }
    async fn unmount(&self, target: &Path) -> Result<()> {
        self.mounts.lock().expect("mounts").remove(target);
        Ok(())
    }
    async fn grow_fs(&self, _: &Path, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn device_size(&self, _: &Path) -> Result<u64> {
        Ok(64 * MIB)
    }
    fn usage(&self, path: &Path) -> Result<FsUsage> {
        Err(qsd_node::Error::FailedPrecondition(format!("no usage for {}", path.display())))
    }
}

fn capability() -> Option<csi::VolumeCapability> {
    labelled(&[])
}

/// An ext4 mount capability with these mount flags.
fn labelled(flags: &[&str]) -> Option<csi::VolumeCapability> {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    Some(csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    })
}

/// A Node service over `core` staging with FUSE, reaching the host through `mounter`.
fn fuse_node(
    core: &Arc<qsd_node::engine::EngineCore>,
    mounter: Arc<RecordingMounter>,
) -> NodeService {
    let seams = Seams {
        mounter,
        probes: Probes { ublk: false, ublk_resize: false, nbd: false, limits: Default::default() },
        ublk_served: |_| false,
    };
    let config = NodeConfig { device: Choice::Fixed(Backend::Fuse), max_volumes: 16 };
    NodeService::with_seams(core.clone(), config, seams).expect("node service")
}

/// One CSI call of the table.
enum Call {
    Stage { id: String, staging: PathBuf, capability: Option<csi::VolumeCapability> },
    Publish { id: String, staging: PathBuf, target: PathBuf },
    Unpublish { id: String, target: PathBuf },
    Unstage { id: String, staging: PathBuf },
}

async fn answer(node: &NodeService, call: Call) -> Code {
    let code = |r: std::result::Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    match call {
        Call::Stage { id, staging, capability } => {
            let req = csi::NodeStageVolumeRequest {
                volume_id: id,
                staging_target_path: staging.display().to_string(),
                volume_capability: capability,
                ..Default::default()
            };
            code(node.node_stage_volume(tonic::Request::new(req)).await.map(drop))
        }
        Call::Publish { id, staging, target } => {
            let req = csi::NodePublishVolumeRequest {
                volume_id: id,
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: capability(),
                ..Default::default()
            };
            code(node.node_publish_volume(tonic::Request::new(req)).await.map(drop))
        }
        Call::Unpublish { id, target } => {
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: target.display().to_string(),
            };
            code(node.node_unpublish_volume(tonic::Request::new(req)).await.map(drop))
        }
        Call::Unstage { id, staging } => {
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: staging.display().to_string(),
            };
            code(node.node_unstage_volume(tonic::Request::new(req)).await.map(drop))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_service_answers_each_call_of_a_volumes_life_with_the_right_code() {
    let env = Env::new().await;
    let core = env.core();
    let node = fuse_node(&core, Arc::new(RecordingMounter::default()));
    let volume = core
        .create_volume(&CreateVolume::named("local", "v", 64 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let id = volume.id.to_string();
    let dir = env.dir.path();
    let (staging, other) = (dir.join("staging"), dir.join("staging-2"));
    let target = dir.join("target");
    let stage = |id: &str, at: &Path| Call::Stage {
        id: id.into(),
        staging: at.to_owned(),
        capability: capability(),
    };
    let publish = |at: &Path| Call::Publish {
        id: id.clone(),
        staging: at.to_owned(),
        target: target.clone(),
    };
    let unpublish = || Call::Unpublish { id: id.clone(), target: target.clone() };
    let unstage = |id: &str| Call::Unstage { id: id.into(), staging: staging.clone() };
    let rows: Vec<(&str, Call, Code)> = vec![
        ("publish before any stage", publish(&staging), Code::FailedPrecondition),
        (
            "stage without a capability",
            Call::Stage { id: id.clone(), staging: staging.clone(), capability: None },
            Code::InvalidArgument,
        ),
        (
            "stage a volume that does not exist",
            stage("vol:local@node-1:nope", &staging),
            Code::NotFound,
        ),
        ("stage an ID that cannot be ours", stage("garbage", &staging), Code::NotFound),
        ("stage", stage(&id.to_string(), &staging), Code::Ok),
        ("stage again, same path", stage(&id.to_string(), &staging), Code::Ok),
        ("stage again, another path", stage(&id.to_string(), &other), Code::AlreadyExists),
        ("publish from another staging path", publish(&other), Code::FailedPrecondition),
        ("publish", publish(&staging), Code::Ok),
        ("publish again", publish(&staging), Code::Ok),
        ("unstage while published", unstage(&id.to_string()), Code::FailedPrecondition),
        ("unpublish", unpublish(), Code::Ok),
        ("unpublish again", unpublish(), Code::Ok),
        ("unstage", unstage(&id.to_string()), Code::Ok),
        ("unstage again", unstage(&id.to_string()), Code::Ok),
        ("unstage an ID that cannot be ours", unstage("garbage"), Code::Ok),
    ];
    for (row, call, expected) in rows {
        assert_eq!(answer(&node, call).await, expected, "{row}");
    }
    assert_eq!(
        core.attachment(&common::id(&id)).expect("attachment"),
        None,
        "unstaged means detached"
    );
    core.delete_volume(&common::id(&id)).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_selinux_label_is_mounted_at_stage_and_a_publish_asking_for_another_is_refused() {
    // The kubelet's SELinuxMount passes `context="…"` to NodeStage and NodePublish (the CSIDriver
    // says seLinuxMount: true): the staging mount gets it, and every bind of it carries it.
    let env = Env::new().await;
    let core = env.core();
    let mounter = Arc::new(RecordingMounter::default());
    let node = fuse_node(&core, mounter.clone());
    let id = core
        .create_volume(&CreateVolume::named("local", "labelled", 64 * MIB as i64).expect("request"))
        .await
        .expect("create")
        .id
        .to_string();
    let label = r#"context="system_u:object_r:container_file_t:s0:c1,c2""#;
    let other = r#"context="system_u:object_r:container_file_t:s0:c7,c9""#;
    let (staging, target) = (env.dir.path().join("staging"), env.dir.path().join("target"));
    let stage = csi::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: labelled(&[label]),
        ..Default::default()
    };
    node.node_stage_volume(tonic::Request::new(stage)).await.expect("stage");
    let options = mounter.options.lock().expect("options").get(&staging).cloned();
    assert_eq!(options, Some(vec![label.to_owned()]), "the staging mount carries the label");
    let publish = |flags: &[&str]| csi::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: labelled(flags),
        ..Default::default()
    };
    let refused = node.node_publish_volume(tonic::Request::new(publish(&[other]))).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    node.node_publish_volume(tonic::Request::new(publish(&[label]))).await.expect("same label");
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    node.node_unpublish_volume(tonic::Request::new(unpublish)).await.expect("unpublish");
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    node.node_unstage_volume(tonic::Request::new(unstage)).await.expect("unstage");
    core.delete_volume(&common::id(&id)).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_info_says_no_more_volumes_than_the_backends_kernel_driver_has_devices() {
    let env = Env::new().await;
    let limits = qsd_node::device::DeviceLimits { nbd: Some(16), ublk: Some(64), fuse: None };
    let info = |device: Backend, max_volumes: i64| {
        let seams = Seams {
            mounter: Arc::new(RecordingMounter::default()),
            probes: Probes { ublk: true, ublk_resize: true, nbd: true, limits },
            ublk_served: |_| false,
        };
        let config = NodeConfig { device: Choice::Fixed(device), max_volumes };
        let node = NodeService::with_seams(env.core(), config, seams).expect("node service");
        async move {
            let req = tonic::Request::new(csi::NodeGetInfoRequest {});
            node.node_get_info(req).await.expect("info").into_inner().max_volumes_per_node
        }
    };
    assert_eq!(info(Backend::Nbd, 256).await, 16, "nbds_max");
    assert_eq!(info(Backend::Ublk, 256).await, 64, "ublks_max");
    assert_eq!(info(Backend::Ublk, 32).await, 32, "--max-volumes below the devices");
    assert_eq!(info(Backend::Fuse, 256).await, 256, "loop devices are made on demand");
}
