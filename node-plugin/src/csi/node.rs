//! CSI Node: stage (attach a kernel device, format only an empty one, mount), publish (bind),
//! unpublish, unstage, expand, stats, info.
//!
//! ```text
//!   NodeStage    engine.attach(export) → device (loop over FUSE file) → mkfs if empty → mount staging
//!                (a filesystem smaller than its device, restored or cloned into a larger
//!                volume, grown to fill it: ext before mounting, xfs after)
//!   NodePublish  bind staging → target (read-only honoured); block: bind the device node
//!   NodeUnstage  umount staging → detach device → engine.detach
//! ```
//! Staged volumes are journaled under `<state>/staging/` before any mount, so a restarted plugin
//! knows each volume's device and can still unpublish and unstage it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::csi::{self, node_server::Node};
use super::{required, status};
use crate::device::{self, Backend, Choice, Probes};
use crate::engine::EngineCore;
use crate::error::{Error, Result};
use crate::mount;
use crate::pool::store;

pub use qsd_csi_model::params::{TOPOLOGY_KEY, WRITE_THRESHOLD_PERCENT};

/// `writeThresholdPercent`: a whole percentage of the volume's size, 1 to 99.
pub fn parse_threshold_percent(value: &str) -> Result<u64> {
    Ok(qsd_csi_model::params::threshold_percent(value)?)
}

/// After an alert, the threshold is re-armed this percentage of the size above the highest
/// write (at least 1 MiB).
pub const WRITE_THRESHOLD_STEP_PERCENT: u64 = 5;

/// Node service settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Which device backend to use.
    pub device: Choice,
    /// Advertised limit of volumes on this node.
    pub max_volumes: i64,
}

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    volume_id: String,
    staging_path: PathBuf,
    backend: Backend,
    device: PathBuf,
    /// The mounted filesystem; `None` for block volumes.
    fs_type: Option<String>,
    /// The CSI access mode it was staged with.
    access_mode: i32,
    /// Where it is published.
    #[serde(default)]
    targets: std::collections::BTreeSet<PathBuf>,
}

/// The CSI Node service.
#[derive(Debug)]
pub struct NodeService {
    engine: Arc<EngineCore>,
    config: NodeConfig,
    dir: PathBuf,
    busy: Mutex<HashSet<String>>,
}

struct Busy<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

fn file_name(volume_id: &str) -> String {
    // IDs are validated before use: no '/' can reach here.
    format!("{}.json", volume_id.replace('/', "_"))
}

impl NodeService {
    /// A node service over an open engine. Must be called inside a tokio runtime: it starts
    /// the task that re-attaches kernel devices after the daemon's graph was rebuilt.
    pub fn new(engine: Arc<EngineCore>, config: NodeConfig) -> Result<Self> {
        let dir = engine.config().state_dir.join("staging");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create staging journal", &dir, e))?;
        tokio::spawn(reattach_after_rebuilds(Arc::downgrade(&engine), dir.clone()));
        tokio::spawn(recover_ublk_devices(engine.clone(), dir.clone()));
        Ok(NodeService { engine, config, dir, busy: Mutex::default() })
    }

    fn claim(&self, id: &str) -> Result<Busy<'_>, Status> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(id.to_owned()) {
            return Err(Status::aborted(format!("an operation on {id} is already in progress")));
        }
        Ok(Busy { set: &self.busy, id: id.to_owned() })
    }

    fn staged(&self, id: &str) -> Result<Option<Staged>> {
        let path = self.dir.join(file_name(id));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Metadata { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.engine.config().node.as_str().to_owned())]
                .into(),
        }
    }

    /// Arms the thin-provisioning alert of a freshly attached volume at `percent` of its size,
    /// re-arming in steps of [`WRITE_THRESHOLD_STEP_PERCENT`]. A threshold already armed (the
    /// journal keeps it across restarts, re-armed higher each time it fired) is left alone.
    async fn arm_write_threshold(&self, id: &str, percent: &str) -> Result<()> {
        let percent = parse_threshold_percent(percent)?;
        if self.engine.write_threshold(id).await?.armed_at.is_some() {
            return Ok(());
        }
        let size = self.engine.get_volume(id)?.size;
        let step = (size / 100 * WRITE_THRESHOLD_STEP_PERCENT).max(1 << 20);
        self.engine.set_write_threshold(id, size / 100 * percent, step).await
    }

    async fn stage(
        &self,
        id: &str,
        staging: &Path,
        capability: &csi::VolumeCapability,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<()> {
        use csi::volume_capability::AccessType;
        self.engine.get_volume(id)?;
        let fs_type = match &capability.access_type {
            Some(AccessType::Mount(m)) => {
                let fs = [
                    m.fs_type.as_str(),
                    context.get("fsType").map(String::as_str).unwrap_or(""),
                    "ext4",
                ]
                .into_iter()
                .find(|f| !f.is_empty())
                .unwrap_or("ext4")
                .to_owned();
                if !mount::SUPPORTED_FS.contains(&fs.as_str()) {
                    return Err(Error::invalid(
                        "fs_type",
                        format!("{fs} is not one of {:?}", mount::SUPPORTED_FS),
                    ));
                }
                Some(fs)
            }
            Some(AccessType::Block(_)) => None,
            None => return Err(Error::invalid("volume_capability", "access type is required")),
        };
        if let Some(existing) = self.staged(id)? {
            if existing.staging_path != staging {
                return Err(Error::AlreadyExists {
                    what: "staged volume",
                    name: id.to_owned(),
                    difference: format!("staged at {}", existing.staging_path.display()),
                });
            }
            if existing.fs_type.is_none() || mount::is_mountpoint(staging) {
                return Ok(());
            }
        }
        let backend = self.config.device.resolve(Probes::host())?;
        let (kind, writethrough) = (Choice::export_kind(backend), Choice::writethrough(backend));
        let endpoint = self.engine.attach_with(id, kind, writethrough).await?.endpoint;
        if let Some(percent) = context.get(WRITE_THRESHOLD_PERCENT) {
            self.arm_write_threshold(id, percent).await?;
        }
        let direct_io = self.engine.daemon().features().loop_direct_io_over_fuse;
        let device = device::attach(backend, &endpoint, direct_io, id).await?;
        let record = Staged {
            volume_id: id.to_owned(),
            staging_path: staging.to_owned(),
            backend,
            device: device.clone(),
            fs_type: fs_type.clone(),
            access_mode: capability.access_mode.as_ref().map(|m| m.mode).unwrap_or_default(),
            targets: Default::default(),
        };
        let mounted = async {
            store::write_json(&self.dir, &file_name(id), &record)?;
            if let Some(fs) = &fs_type {
                mount::format_if_empty(&device, fs).await?;
                // format_if_empty made sure the device holds `fs`: no second probe.
                if mount::grow_unmounted_ext(&device, fs).await? {
                    tracing::info!(volume = %id, "grew the filesystem to its larger volume");
                }
                let mut flags = match &capability.access_type {
                    Some(AccessType::Mount(m)) => m.mount_flags.clone(),
                    _ => Vec::new(),
                };
                // A restored snapshot or a clone carries its source's XFS UUID; without
                // nouuid it could not be mounted beside its source.
                if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
                    flags.push("nouuid".into());
                }
                mount::mount(&device, staging, Some(fs), &flags).await?;
                if !flags.iter().any(|f| f == "ro")
                    && mount::grow_mounted_xfs(&device, staging, fs).await?
                {
                    tracing::info!(volume = %id, "grew the filesystem to its larger volume");
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = mounted {
            let _ = mount::unmount(staging).await;
            let _ = device::detach(backend, &device).await;
            let _ = self.engine.detach(id).await;
            let _ = store::remove(&self.dir, &file_name(id));
            return Err(e);
        }
        Ok(())
    }

    async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        if let Some(record) = self.staged(id)? {
            // Detach only after unmount: a bind mount still using the device would lose it.
            let mut users = mount::mounts_of(&record.device)?;
            // A block volume's bind-mounted device node shows up as devtmpfs: use our record.
            users.extend(record.targets.iter().filter(|t| mount::is_mountpoint(t)).cloned());
            if let Some(user) = users.iter().find(|m| **m != record.staging_path) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is still mounted at {}; unpublish it first",
                    user.display()
                )));
            }
            mount::unmount(&record.staging_path).await?;
            device::detach(record.backend, &record.device).await?;
        }
        mount::unmount(staging).await?;
        match self.engine.detach(id).await {
            Ok(()) => {}
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        store::remove(&self.dir, &file_name(id))
    }

    async fn publish(&self, req: &csi::NodePublishVolumeRequest) -> Result<()> {
        let id = &req.volume_id;
        let target = Path::new(&req.target_path);
        let record = self.staged(id)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
        })?;
        if record.staging_path != Path::new(&req.staging_target_path) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                record.staging_path.display(),
                req.staging_target_path
            )));
        }
        if mount::is_mountpoint(target) && record.targets.contains(target) {
            return Ok(());
        }
        use csi::volume_capability::access_mode::Mode;
        let single_writer = record.access_mode == Mode::SingleNodeSingleWriter as i32;
        if single_writer && record.targets.iter().any(|t| t != target) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is single-writer and already published at {}",
                record.targets.iter().next().map(|t| t.display().to_string()).unwrap_or_default()
            )));
        }
        let mut record = record;
        record.targets.insert(target.to_owned());
        store::write_json(&self.dir, &file_name(id), &record)?;
        match &record.fs_type {
            Some(_) => {
                std::fs::create_dir_all(target)
                    .map_err(|e| Error::io("create target", target, e))?;
                mount::bind(&record.staging_path, target, req.readonly).await
            }
            None => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io("create target parent", parent, e))?;
                }
                if !target.exists() {
                    std::fs::File::create(target)
                        .map_err(|e| Error::io("create target", target, e))?;
                }
                mount::bind(&record.device, target, req.readonly).await
            }
        }
    }

    async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        mount::unmount(target).await?;
        if let Some(mut record) = self.staged(id)? {
            if record.targets.remove(target) {
                store::write_json(&self.dir, &file_name(id), &record)?;
            }
        }
        let removed = if target.is_dir() {
            std::fs::remove_dir(target)
        } else {
            std::fs::remove_file(target)
        };
        match removed {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove target", target, e)),
        }
    }

    async fn expand(&self, id: &str, path: &Path) -> Result<u64> {
        let record = self
            .staged(id)?
            .ok_or_else(|| Error::NotFound { what: "staged volume", id: id.to_owned() })?;
        let endpoint = self
            .engine
            .attachment(id)?
            .ok_or_else(|| Error::FailedPrecondition(format!("volume {id} is not attached")))?
            .endpoint;
        let expected = self.engine.get_volume(id)?.size;
        device::refresh_size(record.backend, &record.device, &endpoint, id, expected).await?;
        if record.fs_type.is_some() {
            mount::grow_fs(&record.device, path).await?;
        }
        mount::device_size(&record.device).await
    }

    async fn stats(&self, id: &str, path: &Path) -> Result<csi::NodeGetVolumeStatsResponse> {
        use csi::volume_usage::Unit;
        self.engine.get_volume(id)?;
        if !path.exists() {
            return Err(Error::NotFound { what: "volume path", id: path.display().to_string() });
        }
        let record = self.staged(id)?;
        let condition = match (&record, self.engine.attachment(id)?) {
            (Some(r), Some(_))
                if r.backend == Backend::Ublk && !device::ublk::serves(&r.device) =>
            {
                csi::VolumeCondition {
                    abnormal: true,
                    message: "the ublk device has no server in this plugin".into(),
                }
            }
            (Some(r), Some(_)) if r.device.exists() => {
                csi::VolumeCondition { abnormal: false, message: "healthy".into() }
            }
            (Some(_), Some(_)) => {
                csi::VolumeCondition { abnormal: true, message: "the kernel device is gone".into() }
            }
            (_, None) => csi::VolumeCondition {
                abnormal: true,
                message: "the volume is not exported by the daemon".into(),
            },
            (None, Some(_)) => {
                csi::VolumeCondition { abnormal: true, message: "the volume is not staged".into() }
            }
        };
        let usage = if path.is_dir() {
            let u = mount::usage(path)?;
            vec![
                csi::VolumeUsage {
                    available: u.bytes_available as i64,
                    total: u.bytes_total as i64,
                    used: u.bytes_used as i64,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: u.inodes_free as i64,
                    total: u.inodes_total as i64,
                    used: u.inodes_total.saturating_sub(u.inodes_free) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        } else {
            let device =
                record.as_ref().map(|r| r.device.clone()).unwrap_or_else(|| path.to_owned());
            let total = mount::device_size(&device).await? as i64;
            vec![csi::VolumeUsage { available: 0, total, used: 0, unit: Unit::Bytes as i32 }]
        };
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
    }
}

/// Runs `action` on every staged volume of `backend` with its current export, logging each
/// outcome (`done`, or `failed` with the error).
async fn for_each_staged<F, Fut>(
    engine: &EngineCore,
    dir: &Path,
    backend: Backend,
    (done, failed): (&str, &str),
    action: F,
) where
    F: Fn(Staged, crate::graph::ExportEndpoint) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let staged = store::read_all::<Staged>(dir, true).unwrap_or_default();
    for record in staged.into_iter().filter(|r| r.backend == backend) {
        let (id, device) = (record.volume_id.clone(), record.device.clone());
        let result = match engine.attachment(&id) {
            Ok(Some(a)) => action(record, a.endpoint).await,
            Ok(None) => Err(Error::FailedPrecondition(format!("{id} is not exported"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => tracing::info!(volume = %id, device = %device.display(), "{done}"),
            Err(e) => tracing::error!(volume = %id, error = %e, "{failed}"),
        }
    }
}

const RECOVERED: (&str, &str) = ("recovered the ublk device", "recovering the ublk device failed");
const REATTACHED: (&str, &str) =
    ("re-attached the NBD device", "re-attaching the NBD device failed");

/// At start, takes over the ublk devices a previous run of this plugin served: the kernel has
/// kept their I/O queued since that process died (user recovery), so their writers see a pause.
async fn recover_ublk_devices(engine: Arc<EngineCore>, dir: PathBuf) {
    for_each_staged(&engine, &dir, Backend::Ublk, RECOVERED, |r, endpoint| async move {
        device::ublk::recover(&endpoint, &r.device).await
    })
    .await;
}

/// After the engine rebuilt exports (the daemon restarted), gives every staged NBD device a new
/// socket: the kernel has kept its I/O queued meanwhile (dead-connection timeout), so the writer
/// sees a pause, not an error. FUSE-backed devices cannot survive a daemon restart.
async fn reattach_after_rebuilds(engine: std::sync::Weak<EngineCore>, dir: PathBuf) {
    use crate::engine::EngineEvent;
    use tokio::sync::broadcast::error::RecvError;
    let Some(mut events) = engine.upgrade().map(|e| e.subscribe()) else { return };
    loop {
        match events.recv().await {
            Ok(EngineEvent::Reconciled { rebuilt, .. }) if rebuilt > 0 => {}
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        }
        let Some(engine) = engine.upgrade() else { return };
        for_each_staged(&engine, &dir, Backend::Nbd, REATTACHED, |r, endpoint| async move {
            // (NBD: the export's size is read from the daemon; no size to wait for.)
            device::refresh_size(r.backend, &r.device, &endpoint, &r.volume_id, 0).await
        })
        .await;
    }
}

fn capability(cap: &Option<csi::VolumeCapability>) -> Result<&csi::VolumeCapability, Status> {
    let cap =
        cap.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    if cap.access_type.is_none() {
        return Err(Status::invalid_argument(
            "volume_capability needs an access type (block or mount)",
        ));
    }
    if cap.access_mode.is_none() {
        return Err(Status::invalid_argument("volume_capability needs an access mode"));
    }
    Ok(cap)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        let cap = capability(&req.volume_capability)?;
        let _busy = self.claim(id)?;
        self.stage(id, Path::new(staging), cap, &req.volume_context).await.map_err(status)?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        let staging = required("staging_target_path", &req.staging_target_path)?;
        let _busy = self.claim(id)?;
        match self.unstage(id, Path::new(staging)).await {
            Ok(()) => Ok(Response::new(csi::NodeUnstageVolumeResponse {})),
            // Unknown or malformed volume: nothing is staged, so nothing to undo.
            Err(e) if e.kind() == crate::ErrorKind::NotFound || e.is_malformed_id() => {
                Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        required("target_path", &req.target_path)?;
        required("staging_target_path", &req.staging_target_path)?;
        capability(&req.volume_capability)?;
        let _busy = self.claim(id)?;
        self.engine.get_volume(id).map_err(status)?;
        self.publish(&req).await.map_err(status)?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        let target = required("target_path", &req.target_path)?;
        let _busy = self.claim(id)?;
        self.unpublish(id, Path::new(target)).await.map_err(status)?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        let path = required("volume_path", &req.volume_path)?;
        self.stats(id, Path::new(path)).await.map(Response::new).map_err(status)
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = required("volume_id", &req.volume_id)?;
        let path = required("volume_path", &req.volume_path)?;
        let _busy = self.claim(id)?;
        self.engine.get_volume(id).map_err(status)?;
        if !Path::new(path).exists() {
            return Err(Status::not_found(format!("volume path {path} does not exist")));
        }
        let capacity = self.expand(id, Path::new(path)).await.map_err(status)?;
        Ok(Response::new(csi::NodeExpandVolumeResponse { capacity_bytes: capacity as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::StageUnstageVolume,
            Type::ExpandVolume,
            Type::GetVolumeStats,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.engine.config().node.as_str().to_owned(),
            max_volumes_per_node: self.config.max_volumes,
            accessible_topology: Some(self.topology()),
        }))
    }
}
