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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

mod stage;

use super::csi::{self, node_server::Node};
use super::decide::{self, PublishStep, Seen, StageStep};
use super::freeze::Freezer;
use super::grown::{grow_staged, StagedVolumes};
use super::recovery::{reattach_after_rebuilds, recover_ublk_devices};
use super::staging::{Journal, Staged};
use super::{required, status, volume_id};
use crate::claims::{Claim, Claims};
use crate::device::{self, Backend, Choice, Probes};
use crate::engine::EngineCore;
use crate::error::{Error, Result};
use crate::mount::{HostMounter, Mounter};
use qsd_csi_model::health::{normalize, Finding, Severity};
use qsd_csi_proto::convert;

pub use qsd_csi_model::params::{TOPOLOGY_KEY, WRITE_THRESHOLD_PERCENT};

/// `writeThresholdPercent`: a whole percentage of the volume's size, 1 to 99.
pub fn parse_threshold_percent(value: &str) -> Result<u64> {
    Ok(qsd_csi_model::params::threshold_percent(value)?)
}

/// Node service settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Which device backend to use.
    pub device: Choice,
    /// Advertised limit of volumes on this node.
    pub max_volumes: i64,
}

/// The CSI Node service.
#[derive(Debug)]
pub struct NodeService {
    engine: Arc<EngineCore>,
    config: NodeConfig,
    journal: Journal,
    busy: Claims,
    mounter: Arc<dyn Mounter>,
    probes: Probes,
    ublk_served: fn(&Path) -> bool,
}

/// What the Node service does to the host through, handed over when it is built.
#[derive(Debug, Clone)]
pub struct Seams {
    /// Formats, mounts, binds and grows filesystems.
    pub mounter: Arc<dyn Mounter>,
    /// Which kernel device backends the host has.
    pub probes: Probes,
    /// Whether this process serves a ublk device (its health depends on it).
    pub ublk_served: fn(&Path) -> bool,
}

impl Seams {
    /// This host's mounts and kernel, and this process's ublk servers.
    pub fn host() -> Self {
        Seams {
            mounter: Arc::new(HostMounter),
            probes: Probes::host(),
            ublk_served: device::ublk::serves,
        }
    }
}

impl NodeService {
    /// A node service over an open engine. Must be called inside a tokio runtime: it starts
    /// the task that re-attaches kernel devices after the daemon's graph was rebuilt.
    pub fn new(engine: Arc<EngineCore>, config: NodeConfig) -> Result<Self> {
        Self::with_seams(engine, config, Seams::host())
    }

    /// [`NodeService::new`] with the host reached through `seams`.
    pub fn with_seams(engine: Arc<EngineCore>, config: NodeConfig, seams: Seams) -> Result<Self> {
        let journal = Journal::open(engine.config().state_dir.join("staging"))?;
        tokio::spawn(reattach_after_rebuilds(Arc::downgrade(&engine), journal.clone()));
        tokio::spawn(recover_ublk_devices(engine.clone(), journal.clone()));
        let Seams { mounter, probes, ublk_served } = seams;
        let busy = Claims::default();
        let freezer =
            Freezer::new(journal.clone(), busy.clone(), engine.config().state_dir.join("frozen"))?;
        freezer.thaw_leftovers()?;
        engine.set_quiesce(Arc::new(freezer));
        engine.set_mounts(Arc::new(StagedVolumes {
            journal: journal.clone(),
            mounter: mounter.clone(),
            engine: Arc::downgrade(&engine),
            busy: busy.clone(),
        }));
        Ok(NodeService { engine, config, journal, busy, mounter, probes, ublk_served })
    }

    fn claim(&self, id: &str) -> Result<Claim, Status> {
        self.busy
            .take(vec![id.to_owned()])
            .map_err(|_| Status::aborted(format!("an operation on {id} is already in progress")))
    }

    /// The volumes this node can hold: `--max-volumes`, or fewer when the kernel driver of the
    /// backend it stages with has fewer devices (NodeGetInfo; the scheduler places no more).
    fn max_volumes(&self) -> i64 {
        let configured = self.config.max_volumes;
        match self.config.device.resolve(self.probes) {
            Ok(backend) => self.probes.limits.volumes(backend, configured),
            Err(_) => configured,
        }
    }

    /// The path NodeExpandVolume takes for a volume staged here (its filesystem's staging
    /// mount; a block volume's device), once its stage finished.
    pub fn expansion_path(&self, id: &str) -> Option<PathBuf> {
        let staged = self.journal.get(id).ok().flatten().filter(|s| s.complete)?;
        Some(if staged.fs_type.is_some() { staged.staging_path } else { staged.device })
    }

    fn staged(&self, id: &str) -> Result<Option<Staged>> {
        self.journal.get(id)
    }

    fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.engine.config().node.as_str().to_owned())]
                .into(),
        }
    }

    /// Arms the thin-provisioning alert of a freshly attached volume at `percent` of its size
    /// (the engine keeps it armed across restarts and growth).
    async fn arm_write_threshold(&self, id: &str, percent: &str) -> Result<()> {
        let percent = parse_threshold_percent(percent)?;
        self.engine.arm_write_threshold_percent(&volume_id(id)?, percent).await
    }

    /// Unstages as the undo of a stage: once nothing but the staging path uses the volume, the
    /// record is marked unfinished and [`undo_stage`](Self::undo_stage) takes it apart, so a
    /// plugin killed half-way leaves a record the start-up undo finishes (a retry never meets
    /// a complete record naming a device already detached, and perhaps reused).
    async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let Some(mut record) = self.staged(id)? else {
            self.mounter.unmount(staging).await?;
            return match self.engine.detach(&volume_id(id)?).await {
                Err(e) if e.kind() != crate::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        };
        if record.complete {
            // Detach only after unmount: a bind mount still using the device would lose it.
            let mut users = if self.serves(&record) {
                self.mounter.mounts_of(&record.device)?
            } else {
                Vec::new()
            };
            users.extend(record.targets.iter().filter(|t| self.mounter.is_mountpoint(t)).cloned());
            decide::unstage_blocker(id, &record, &users)?;
            record.complete = false;
            self.journal.put(&record)?;
            crate::fault_point!("unstage:after-record");
            let undone = self.undo_stage(&record).await;
            if undone.is_err() && self.mounter.is_mountpoint(&record.staging_path) {
                // Nothing was taken apart (the staging path would not unmount): still staged.
                record.complete = true;
                self.journal.put(&record)?;
            }
            return undone;
        }
        self.undo_stage(&record).await
    }

    /// Whether the record's device still serves its volume (see [`device::serves`]).
    fn serves(&self, record: &Staged) -> bool {
        let volume = volume_id(&record.volume_id).ok();
        let attachment = volume.and_then(|v| self.engine.attachment(&v).ok().flatten());
        let endpoint = attachment.map(|a| a.endpoint);
        !record.device.as_os_str().is_empty()
            && device::serves(record.backend, &record.device, endpoint.as_ref(), &record.volume_id)
    }

    async fn publish(&self, req: &csi::NodePublishVolumeRequest) -> Result<()> {
        let id = &req.volume_id;
        let target = Path::new(&req.target_path);
        let mut record = self.staged(id)?;
        let staging = Path::new(&req.staging_target_path);
        let mounted = self.mounter.is_mountpoint(target);
        if let Some(capability) = &req.volume_capability {
            let staged = record.as_ref().and_then(|r| r.selinux_context.as_deref());
            decide::context_conflict(id, staged, decide::selinux_context(capability).as_deref())?;
        }
        let (source, block) =
            match decide::publish_step(id, record.as_ref(), staging, target, mounted)? {
                PublishStep::Done => return Ok(()),
                PublishStep::Bind { source, block } => (source, block),
            };
        if let Some(record) = record.as_mut() {
            record.targets.insert(target.to_owned());
            self.journal.put(record)?;
        }
        if block {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io("create target parent", parent, e))?;
            }
            if !target.exists() {
                std::fs::File::create(target).map_err(|e| Error::io("create target", target, e))?;
            }
        } else {
            std::fs::create_dir_all(target).map_err(|e| Error::io("create target", target, e))?;
        }
        self.mounter.bind(&source, target, req.readonly).await
    }

    async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        self.mounter.unmount(target).await?;
        if let Some(record) = decide::unpublished(self.staged(id)?, target) {
            self.journal.put(&record)?;
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
        grow_staged(&self.engine, &self.journal, self.mounter.as_ref(), id, Some(path)).await
    }

    async fn stats(&self, id: &str, path: &Path) -> Result<csi::NodeGetVolumeStatsResponse> {
        use csi::volume_usage::Unit;
        self.engine.get_volume(&volume_id(id)?)?;
        if !path.exists() {
            return Err(Error::NotFound { what: "volume path", id: path.display().to_string() });
        }
        let record = self.staged(id)?;
        let usage = if path.is_dir() {
            let u = self.mounter.usage(path)?;
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
            let total = self.mounter.device_size(&device).await? as i64;
            vec![csi::VolumeUsage { available: 0, total, used: 0, unit: Unit::Bytes as i32 }]
        };
        Ok(csi::NodeGetVolumeStatsResponse { usage })
    }

    /// The volume's health from this node: what the kernel shows of its staging, and what the
    /// engine sees of its chain, export and pool.
    async fn health(&self, id: &str) -> Result<Vec<Finding>> {
        let volume = volume_id(id)?;
        let mut found = self.engine.volume_health(&volume).await?;
        let record = self.staged(id)?;
        let seen = Seen {
            attached: self.engine.attachment(&volume)?.is_some(),
            device_exists: record.as_ref().is_some_and(|r| r.device.exists()),
            ublk_unserved: record
                .as_ref()
                .is_some_and(|r| r.backend == Backend::Ublk && !(self.ublk_served)(&r.device)),
        };
        found.extend(decide::node_findings(record.is_some(), seen));
        Ok(normalize(found))
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
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {
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
        self.engine.get_volume(&volume_id(id).map_err(status)?).map_err(status)?;
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
        self.engine.get_volume(&volume_id(id).map_err(status)?).map_err(status)?;
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
            Type::GetVolumeHealth,
            Type::GetStorageHealth,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_volume_health(
        &self,
        request: Request<csi::NodeGetVolumeHealthRequest>,
    ) -> Result<Response<csi::NodeGetVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let found = self.health(&req.volume_id).await.map_err(status)?;
        Ok(Response::new(csi::NodeGetVolumeHealthResponse {
            volume_health: Some(convert::volume_health(&req.volume_id, &found)),
        }))
    }

    async fn node_get_storage_health(
        &self,
        _: Request<csi::NodeGetStorageHealthRequest>,
    ) -> Result<Response<csi::NodeGetStorageHealthResponse>, Status> {
        use csi::node_get_storage_health_response::StorageBackendHealth;
        use csi::StorageHealthErrorType as T;
        let backend_health = self
            .engine
            .storage_health()
            .await
            .into_iter()
            .map(|(pool, f)| StorageBackendHealth {
                status: match f.severity {
                    Severity::Degraded => T::StorageDegraded,
                    Severity::Inaccessible | Severity::DataLoss => T::StorageUnreachable,
                } as i32,
                reason: f.reason,
                message: if pool.is_empty() {
                    f.message
                } else {
                    format!("pool {pool}: {}", f.message)
                },
                volume_capability: None,
            })
            .collect();
        Ok(Response::new(csi::NodeGetStorageHealthResponse { backend_health }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.engine.config().node.as_str().to_owned(),
            max_volumes_per_node: self.max_volumes(),
            accessible_topology: Some(self.topology()),
        }))
    }
}
