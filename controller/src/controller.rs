//! CSI Controller: create / delete / list volumes and snapshots, expand, modify, capacity.

use std::sync::Arc;

use qsd_csi_proto::csi::{self, controller_server::Controller};
use qsd_node::csi::{required, status, TOPOLOGY_KEY};
use qsd_node::engine::{EngineCore, SnapshotInfo, VolumeInfo};
use qsd_node::pool::PoolKind;
use qsd_node::ErrorKind;
use tonic::{Request, Response, Status};

use crate::params;

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    engine: Arc<EngineCore>,
    default_pool: String,
}

impl ControllerService {
    /// A controller over `engine`, placing volumes in `default_pool` unless a request names one.
    pub fn new(engine: Arc<EngineCore>, default_pool: String) -> Self {
        ControllerService { engine, default_pool }
    }

    fn volume(&self, info: &VolumeInfo, fs_type: Option<&str>) -> csi::Volume {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let pool = info.id.split(':').nth(1).and_then(|p| p.split('@').next()).unwrap_or_default();
        let local = self.engine.pool(pool).map(|p| p.kind() == PoolKind::Local).unwrap_or(true);
        let source_id = |prefix: &str, name: &str| {
            info.id
                .replacen("vol:", prefix, 1)
                .rsplit_once(':')
                .map(|(loc, _)| format!("{loc}:{name}"))
        };
        let content_source = info.source.as_deref().and_then(|s| match s.split_once(':') {
            Some(("snapshot", name)) => source_id("snap:", name)
                .map(|id| Type::Snapshot(SnapshotSource { snapshot_id: id })),
            Some(("volume", name)) => {
                source_id("vol:", name).map(|id| Type::Volume(VolumeSource { volume_id: id }))
            }
            _ => None,
        });
        let mut context = std::collections::HashMap::from([("pool".to_owned(), pool.to_owned())]);
        if let Some(fs) = fs_type {
            context.insert("fsType".to_owned(), fs.to_owned());
        }
        csi::Volume {
            capacity_bytes: info.size as i64,
            volume_id: info.id.clone(),
            volume_context: context,
            content_source: content_source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            accessible_topology: if local {
                vec![csi::Topology {
                    segments: [(
                        TOPOLOGY_KEY.to_owned(),
                        self.engine.config().node.as_str().to_owned(),
                    )]
                    .into(),
                }]
            } else {
                Vec::new()
            },
        }
    }

    fn snapshot(info: &SnapshotInfo) -> csi::Snapshot {
        csi::Snapshot {
            size_bytes: info.size as i64,
            snapshot_id: info.id.clone(),
            source_volume_id: info.source_volume_id.clone(),
            creation_time: Some(prost_types::Timestamp {
                seconds: info.created_unix as i64,
                nanos: 0,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    fn check_topology(&self, requirement: Option<&csi::TopologyRequirement>) -> Result<(), Status> {
        let Some(req) = requirement else { return Ok(()) };
        let node = self.engine.config().node.as_str();
        let fits = |t: &csi::Topology| t.segments.get(TOPOLOGY_KEY).is_none_or(|n| n == node);
        if !req.requisite.is_empty() && !req.requisite.iter().any(fits) {
            return Err(Status::resource_exhausted(format!(
                "no requisite topology includes node {node}"
            )));
        }
        Ok(())
    }
}

fn ok_if_gone<T: Default>(result: qsd_node::Result<()>) -> Result<Response<T>, Status> {
    match result {
        Ok(()) => Ok(Response::new(T::default())),
        // Deleting what does not exist (or cannot exist) succeeds: the CO may retry.
        Err(e) if e.kind() == ErrorKind::NotFound || e.is_malformed_id() => {
            Ok(Response::new(T::default()))
        }
        Err(e) => Err(status(e)),
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let command = params::create_volume(&req, &self.default_pool)?;
        self.check_topology(req.accessibility_requirements.as_ref())?;
        let info = self.engine.create_volume(&command).await.map_err(|e| match e.kind() {
            // A missing source is NOT_FOUND per spec; a missing pool is a bad parameter.
            ErrorKind::NotFound if command.source.is_none() => {
                Status::invalid_argument(e.to_string())
            }
            _ => status(e),
        })?;
        if let (Some(range), true) = (req.capacity_range.as_ref(), command.source.is_some()) {
            if range.limit_bytes > 0 && info.size as i64 > range.limit_bytes {
                return Err(Status::out_of_range("the source is larger than limit_bytes"));
            }
        }
        let fs = req.parameters.get("fsType").map(String::as_str);
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(self.volume(&info, fs)) }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        ok_if_gone(self.engine.delete_volume(&req.volume_id).await)
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("qsd-csi needs no controller publish (attachRequired: false)"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("qsd-csi needs no controller unpublish (attachRequired: false)"))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.engine.get_volume(&req.volume_id).map_err(status)?;
        if let Some(reason) = req.volume_capabilities.iter().find_map(params::unsupported) {
            return Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: reason,
            }));
        }
        Ok(Response::new(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let mut all = self.engine.list_volumes().map_err(status)?;
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let (page, next_token) = params::page(all, req.max_entries, &req.starting_token)?;
        let node = self.engine.config().node.as_str().to_owned();
        let entries = page
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(self.volume(v, None)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: v.export.map(|_| vec![node.clone()]).unwrap_or_default(),
                    volume_condition: None,
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let pool_name =
            req.parameters.get("pool").cloned().unwrap_or_else(|| self.default_pool.clone());
        let pool =
            self.engine.pool(&pool_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let usage = qsd_node::mount::usage(pool.root()).map_err(status)?;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: usage.bytes_available as i64,
            maximum_volume_size: Some(qsd_node::pool::id::MAX_SIZE as i64),
            minimum_volume_size: Some(qsd_node::pool::id::SIZE_ALIGN as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::SingleNodeMultiWriter,
            Type::ModifyVolume,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("source_volume_id", &req.source_volume_id)?;
        required("name", &req.name)?;
        if let Some(key) = req.parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
            return Err(Status::invalid_argument(format!("unknown snapshot parameter {key:?}")));
        }
        let info = self
            .engine
            .create_snapshot(&req.source_volume_id, &params::object_name(&req.name))
            .await
            .map_err(status)?;
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(Self::snapshot(&info)) }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("snapshot_id", &req.snapshot_id)?;
        ok_if_gone(self.engine.delete_snapshot(&req.snapshot_id).await)
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let mut all: Vec<_> = self
            .engine
            .list_snapshots()
            .map_err(status)?
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
            })
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let (page, next_token) = params::page(all, req.max_entries, &req.starting_token)?;
        let entries = page
            .iter()
            .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(Self::snapshot(s)) })
            .collect();
        Ok(Response::new(csi::ListSnapshotsResponse { entries, next_token }))
    }

    async fn get_snapshot(
        &self,
        _: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("GetSnapshot is not offered (GET_SNAPSHOT not advertised)"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let size = params::size(Some(range), false)?.unwrap_or(params::DEFAULT_SIZE);
        let capacity = self.engine.expand_volume(&req.volume_id, size).await.map_err(status)?;
        let block = matches!(
            req.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()),
            Some(csi::volume_capability::AccessType::Block(_))
        );
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: capacity as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume is not offered (GET_VOLUME not advertised)"))
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let qos = params::qos(&req.mutable_parameters)?;
        self.engine.set_qos(&req.volume_id, qos).await.map_err(status)?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}
