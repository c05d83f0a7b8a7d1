//! NodeStage all or nothing, through the Node service's seams: a real daemon and a real loop
//! device over its FUSE export, and a mounter that fails where it is told to (the filesystem
//! steps are what can fail on a real node: a bad mkfs, a mount refused). A failed stage leaves
//! the volume detached, so DeleteVolume succeeds, and no staging record or loop device behind.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use qsd_node::csi::csi::node_server::Node;
use qsd_node::csi::{csi, NodeConfig, NodeService, Seams};
use qsd_node::device::{Backend, Choice, Probes};
use qsd_node::engine::CreateVolume;
use qsd_node::error::{Error, Result};
use qsd_node::mount::{FsUsage, Mounter};

/// Where the fake mounter fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailAt {
    Format,
    Mount,
}

#[derive(Debug)]
struct FailingMounter(FailAt);

fn refused(program: &str) -> Error {
    Error::Command { program: program.into(), stderr: "refused by the test's mounter".into() }
}

#[tonic::async_trait]
impl Mounter for FailingMounter {
    fn is_mountpoint(&self, _: &Path) -> bool {
        false
    }
    fn mounts_of(&self, _: &Path) -> Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }
    async fn probe_fs(&self, _: &Path) -> Result<Option<String>> {
        Ok(None)
    }
    async fn format(&self, _: &Path, _: &str) -> Result<()> {
        match self.0 {
            FailAt::Format => Err(refused("mkfs.ext4")),
            FailAt::Mount => Ok(()),
        }
    }
    async fn wipe(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn grow_unmounted_ext(&self, _: &Path, _: &str) -> Result<bool> {
        Ok(false)
    }
    async fn mount(&self, _: &Path, _: &Path, _: Option<&str>, _: &[String]) -> Result<()> {
        Err(refused("mount"))
    }
    async fn grow_mounted_xfs(&self, _: &Path, _: &Path, _: &str) -> Result<bool> {
        Ok(false)
    }
    async fn bind(&self, _: &Path, _: &Path, _: bool) -> Result<()> {
        Ok(())
    }
    async fn unmount(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn grow_fs(&self, _: &Path, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn device_size(&self, _: &Path) -> Result<u64> {
        Ok(0)
    }
    fn usage(&self, _: &Path) -> Result<FsUsage> {
        Err(refused("statvfs"))
    }
}

fn loop_devices_over(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    let under = dir.display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&under))
        .map(String::from)
        .collect()
}

fn stage_request(
    id: &str,
    staging: &Path,
    context: &[(&str, &str)],
) -> csi::NodeStageVolumeRequest {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        }),
        volume_context: context.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_fails_at_any_filesystem_step_leaves_the_volume_detached_and_deletable() {
    let env = Env::new().await;
    let core = env.core();
    let table = [
        ("mkfs fails", FailAt::Format, tonic::Code::Internal),
        ("mount fails", FailAt::Mount, tonic::Code::Internal),
    ];
    for (i, (what, fail_at, code)) in table.into_iter().enumerate() {
        let seams = Seams {
            mounter: Arc::new(FailingMounter(fail_at)),
            probes: Probes {
                ublk: false,
                ublk_resize: false,
                nbd: false,
                limits: Default::default(),
            },
            ublk_served: |_| false,
        };
        let config = NodeConfig { device: Choice::Fixed(Backend::Fuse), max_volumes: 16 };
        let node = NodeService::with_seams(core.clone(), config, seams).expect("node service");
        let volume = core
            .create_volume(
                &CreateVolume::named("local", &format!("v{i}"), 16 * MIB as i64).expect("request"),
            )
            .await
            .expect("create");
        let staging = env.dir.path().join(format!("staging-{i}"));
        let request =
            stage_request(&volume.id.to_string(), &staging, &[("writeThresholdPercent", "80")]);
        let status = node.node_stage_volume(tonic::Request::new(request)).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains("refused by the test's mounter"), "{what}: {status:?}");
        assert_eq!(
            core.attachment(&volume.id).expect("attachment"),
            None,
            "{what}: still attached"
        );
        assert!(loop_devices_over(env.dir.path()).is_empty(), "{what}: a loop device was left");
        let staged =
            std::fs::read_dir(env.dir.path().join("state/staging")).expect("journal").count();
        assert_eq!(staged, 0, "{what}: a staging record was left");
        core.delete_volume(&volume.id).await.unwrap_or_else(|e| panic!("{what}: delete: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stage_parameter_or_a_filesystem_too_big_for_its_volume_is_refused_before_attaching()
{
    let env = Env::new().await;
    let core = env.core();
    let seams = Seams {
        mounter: Arc::new(FailingMounter(FailAt::Mount)),
        probes: Probes { ublk: false, ublk_resize: false, nbd: false, limits: Default::default() },
        ublk_served: |_| false,
    };
    let config = NodeConfig { device: Choice::Fixed(Backend::Fuse), max_volumes: 16 };
    let node = NodeService::with_seams(core.clone(), config, seams).expect("node service");
    let volume = core
        .create_volume(&CreateVolume::named("local", "small", 64 * MIB as i64).expect("request"))
        .await
        .expect("create");
    let staging = env.dir.path().join("staging");
    let bad = stage_request(&volume.id.to_string(), &staging, &[("writeThresholdPercent", "150")]);
    let status = node.node_stage_volume(tonic::Request::new(bad)).await.expect_err("150 %");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut xfs = stage_request(&volume.id.to_string(), &staging, &[]);
    if let Some(csi::volume_capability::AccessType::Mount(m)) =
        xfs.volume_capability.as_mut().and_then(|c| c.access_type.as_mut())
    {
        m.fs_type = "xfs".into();
    }
    let status = node.node_stage_volume(tonic::Request::new(xfs)).await.expect_err("64 MiB of xfs");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("at least 300 MiB"), "{status:?}");
    assert_eq!(core.attachment(&volume.id).expect("attachment"), None);
    core.delete_volume(&volume.id).await.expect("delete");
}
