//! CSI Controller: create / delete / list volumes and snapshots, expand, modify, capacity.
//!
//! Every request becomes agent calls ([`crate::agents`]): to the node an ID names, to the node
//! the topology asks for on create, or to every node for lists.

use std::collections::HashMap;

use qsd_csi_model::id::{IdKind, MAX_SIZE, SIZE_ALIGN};
use qsd_csi_model::params::TOPOLOGY_KEY;
use qsd_csi_proto::csi::{self, controller_server::Controller};
use qsd_csi_proto::{agent, convert};
use tonic::{Code, Request, Response, Status};

use crate::agents::{Agents, NodeAgent};
use crate::error::{required, ControllerError};
use crate::events::{Events, Notice};
use crate::params;
use crate::shapes::{self, location, node_topology, ok_if_gone};

mod health;
mod placement;

pub use health::NODE_UNREACHABLE;

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    agents: Agents,
    default_pool: String,
    events: Events,
    /// The volumes each node listed last, for its health while it does not answer.
    seen: health::Seen,
}

impl ControllerService {
    /// A controller over the node `agents`, placing volumes in `default_pool` unless a request
    /// names one.
    pub fn new(agents: Agents, default_pool: String) -> Self {
        ControllerService {
            agents,
            default_pool,
            events: Events::log_only(),
            seen: Default::default(),
        }
    }

    /// Tells claims about their volumes through `events` (by default only the log hears).
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Posts `notice` on the claim of `volume_id` (its labels asked of `agent`), in the
    /// background: the CSI reply does not wait for it.
    fn tell_claim(&self, agent: NodeAgent, volume_id: String, notice: Notice) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let labels = match agent.get_volume(agent::VolumeRef { volume_id }).await {
                Ok(volume) => volume.labels,
                Err(_) => Default::default(),
            };
            events.report(&labels, &notice).await;
        });
    }

    /// Every volume on every node, in ID order, each with the node it is attached on: the
    /// node whose agent reports its export. (A shared pool's volume is listed by every node
    /// that mounts the pool, exported by at most one; its ID names none. A volume moved to
    /// another node is listed there and, until its old copy is removed, on its old node: the
    /// node its ID is routed to wins.)
    async fn all_volumes(&self) -> Result<Vec<(agent::Volume, Option<String>)>, Status> {
        let mut all = Vec::new();
        for (node, a) in self.agents.nodes() {
            let listed = a.every_volume().await?;
            self.seen.remember(&node, listed.iter().map(|v| v.volume_id.as_str()));
            for v in listed {
                let exported = v.export != agent::ExportKind::ExportNone as i32;
                let routed = self.agents.moved(&v.volume_id).is_none_or(|to| to == node);
                all.push((v, exported.then(|| node.clone()), routed));
            }
        }
        // By ID, the exported listing first, then the routed one: the dedup keeps it.
        all.sort_by(|(a, a_node, a_routed), (b, b_node, b_routed)| {
            a.volume_id
                .cmp(&b.volume_id)
                .then(b_node.is_some().cmp(&a_node.is_some()))
                .then(b_routed.cmp(a_routed))
        });
        all.dedup_by(|later, kept| later.0.volume_id == kept.0.volume_id);
        Ok(all.into_iter().map(|(v, node, _)| (v, node)).collect())
    }

    /// Every snapshot on every node (or on the node `snapshot_id` names), in ID order.
    async fn all_snapshots(&self, snapshot_id: &str) -> Result<Vec<agent::Snapshot>, Status> {
        let agents: Vec<NodeAgent> = match snapshot_id {
            "" => self.agents.nodes().into_iter().map(|(_, a)| a).collect(),
            id => match self.agents.for_id(IdKind::Snapshot, id).await {
                Ok(a) => vec![a],
                Err(e) if e.code() == Code::NotFound => Vec::new(), // cannot be ours
                Err(e) => return Err(e),
            },
        };
        let mut all = Vec::new();
        for a in agents {
            all.extend(a.every_snapshot().await?);
        }
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        all.dedup_by(|a, b| a.snapshot_id == b.snapshot_id);
        Ok(all)
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
        let source = command.source.as_ref().map(|s| (s.kind(), s.id().to_string()));
        let requirement = req.accessibility_requirements.as_ref();
        let (node, from) = self.placement(requirement, source.as_ref()).await?;
        let message = agent::CreateVolumeRequest::from(&command);
        let info = match from {
            None => self.agents.node(&node)?.create_volume(message).await?,
            Some(from) => {
                // In a task of its own: the copy (and the source's export it needs) goes on
                // if the CO stops waiting; its retry finds the volume busy, then made.
                let this = self.clone();
                let copied = command
                    .source
                    .clone()
                    .ok_or_else(|| Status::internal("a copy across nodes without a source"))?;
                tokio::spawn(async move { this.copy_across(&node, &from, &copied, message).await })
                    .await
                    .map_err(|e| Status::internal(format!("a copy across nodes ended: {e}")))??
            }
        };
        if let (Some(range), true) = (req.capacity_range.as_ref(), source.is_some()) {
            if range.limit_bytes > 0 && info.size_bytes as i64 > range.limit_bytes {
                let message = "the source is larger than limit_bytes";
                return Err(ControllerError::OutOfRange(message.into()).into());
            }
        }
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(shapes::volume(&info, &req.parameters)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let deleted = match self.agents.for_id(IdKind::Volume, &req.volume_id).await {
            Ok(a) => a.delete_volume(agent::VolumeRef { volume_id: req.volume_id }).await,
            Err(e) => Err(e),
        };
        ok_if_gone(deleted)
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(ControllerError::Unimplemented(
            "qsd-csi needs no controller publish (attachRequired: false)",
        )
        .into())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(ControllerError::Unimplemented(
            "qsd-csi needs no controller unpublish (attachRequired: false)",
        )
        .into())
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(ControllerError::Required("volume_capabilities").into());
        }
        self.agents
            .for_id(IdKind::Volume, &req.volume_id)
            .await?
            .get_volume(agent::VolumeRef { volume_id: req.volume_id.clone() })
            .await?;
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
        let all = self.all_volumes().await?;
        let (page, next_token) = params::page(all, req.max_entries, &req.starting_token)?;
        let entries = page
            .into_iter()
            .map(|(v, attached_on)| csi::list_volumes_response::Entry {
                volume: Some(shapes::volume(&v, &HashMap::new())),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: attached_on.into_iter().collect(),
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
        let pool = req.parameters.get("pool").cloned().unwrap_or_else(|| self.default_pool.clone());
        let node = match req.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_KEY))
        {
            Some(node) => node.clone(),
            None => self.agents.default_node()?,
        };
        let capacity = self.agents.node(&node)?.get_capacity(agent::PoolRef { pool }).await?;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: capacity.available_bytes as i64,
            maximum_volume_size: Some(MAX_SIZE as i64),
            minimum_volume_size: Some(SIZE_ALIGN as i64),
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
            Type::GetVolumeHealth,
            Type::ListVolumeHealth,
            Type::GetSnapshot,
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
        let freeze = params::snapshot_freeze(&req.parameters)?;
        // A local pool's snapshot is restorable on every node with an agent (on others by a
        // copy): a requisite must name one of them.
        if let (Some(required), Some((_, Some(node)))) = (
            req.accessibility_requirements.as_ref().filter(|r| !r.requisite.is_empty()),
            location(IdKind::Volume, &req.source_volume_id),
        ) {
            let served = self.agents.names();
            if !served.iter().any(|n| required.requisite.contains(&node_topology(n))) {
                return Err(ControllerError::Unplaceable(node).into());
            }
        }
        let agent = self.agents.for_id(IdKind::Volume, &req.source_volume_id).await?;
        let taken = agent
            .create_snapshots(agent::CreateSnapshotsRequest {
                snapshots: vec![agent::SnapshotRequest {
                    volume_id: req.source_volume_id.clone(),
                    name: params::object_name(&req.name),
                }],
                group: String::new(),
                no_freeze: !freeze,
            })
            .await;
        let snapshot_name = match (
            req.parameters.get("csi.storage.k8s.io/volumesnapshot/namespace"),
            req.parameters.get("csi.storage.k8s.io/volumesnapshot/name"),
        ) {
            (Some(ns), Some(name)) => format!("VolumeSnapshot {ns}/{name}"),
            _ => format!("snapshot {:?}", req.name),
        };
        let notice = match &taken {
            Ok(list) => list.snapshots.first().map(|s| Notice {
                warning: false,
                reason: "SnapshotTaken",
                action: "CreateSnapshot",
                note: format!(
                    "{snapshot_name} taken as {}: an O(1) qcow2 overlay, the volume kept running",
                    s.snapshot_id
                ),
            }),
            Err(e) if e.code() == Code::Aborted => None,
            Err(e) => Some(Notice {
                warning: true,
                reason: "SnapshotFailed",
                action: "CreateSnapshot",
                note: format!("{snapshot_name} failed ({:?}): {}", e.code(), e.message()),
            }),
        };
        if let Some(notice) = notice {
            self.tell_claim(agent, req.source_volume_id.clone(), notice);
        }
        let taken = taken?;
        let info = taken
            .snapshots
            .first()
            .ok_or_else(|| ControllerError::Internal("the agent took no snapshot".into()))?;
        let snapshot = shapes::snapshot(info, &self.agents.names());
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(snapshot) }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("snapshot_id", &req.snapshot_id)?;
        let deleted = match self.agents.for_id(IdKind::Snapshot, &req.snapshot_id).await {
            Ok(a) => a.delete_snapshot(agent::SnapshotRef { snapshot_id: req.snapshot_id }).await,
            Err(e) => Err(e),
        };
        ok_if_gone(deleted)
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let all: Vec<_> = self
            .all_snapshots(&req.snapshot_id)
            .await?
            .into_iter()
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
            })
            .collect();
        let (page, next_token) = params::page(all, req.max_entries, &req.starting_token)?;
        let nodes = self.agents.names();
        let entries = page
            .iter()
            .map(|s| csi::list_snapshots_response::Entry {
                snapshot: Some(shapes::snapshot(s, &nodes)),
            })
            .collect();
        Ok(Response::new(csi::ListSnapshotsResponse { entries, next_token }))
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("snapshot_id", &req.snapshot_id)?;
        let found = self
            .all_snapshots(&req.snapshot_id)
            .await?
            .into_iter()
            .find(|s| s.snapshot_id == req.snapshot_id)
            .ok_or_else(|| {
                Status::not_found(format!("snapshot {} does not exist", req.snapshot_id))
            })?;
        let snapshot = shapes::snapshot(&found, &self.agents.names());
        Ok(Response::new(csi::GetSnapshotResponse { snapshot: Some(snapshot) }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        // CSI: the range is required, and at least one of its bounds (an empty one would grow
        // the volume to whatever default this driver has).
        let range = req
            .capacity_range
            .as_ref()
            .filter(|r| r.required_bytes != 0 || r.limit_bytes != 0)
            .ok_or(ControllerError::Required("capacity_range"))?;
        let size = params::size(Some(range), false)?.unwrap_or(qsd_csi_model::params::DEFAULT_SIZE);
        let grown = self
            .agents
            .for_id(IdKind::Volume, &req.volume_id)
            .await?
            .expand_volume(agent::ExpandVolumeRequest {
                volume_id: req.volume_id.clone(),
                size_bytes: size,
            })
            .await?;
        // Block volumes too: the node's kernel device (a loop device's capacity, NBD's size,
        // ublk's) learns the new size only from NodeExpandVolume.
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: grown.size_bytes as i64,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(ControllerError::Unimplemented(
            "ControllerGetVolume is not offered (GET_VOLUME not advertised)",
        )
        .into())
    }

    async fn controller_get_volume_health(
        &self,
        request: Request<csi::ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let health = self
            .agents
            .for_id(IdKind::Volume, &req.volume_id)
            .await?
            .get_volume_health(agent::VolumeRef { volume_id: req.volume_id.clone() })
            .await?;
        Ok(Response::new(csi::ControllerGetVolumeHealthResponse {
            volume_health: Some(convert::csi_volume_health(&health)),
        }))
    }

    async fn controller_list_volume_health(
        &self,
        request: Request<csi::ControllerListVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerListVolumeHealthResponse>, Status> {
        let req = request.into_inner();
        let all = self.all_volume_health().await;
        let (page, next_token) = params::page(all, req.max_entries, &req.starting_token)?;
        let entries = page.iter().map(convert::csi_volume_health).collect();
        Ok(Response::new(csi::ControllerListVolumeHealthResponse { entries, next_token }))
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let qos = params::qos(&req.mutable_parameters)?;
        self.agents
            .for_id(IdKind::Volume, &req.volume_id)
            .await?
            .modify_volume(agent::ModifyVolumeRequest {
                volume_id: req.volume_id.clone(),
                qos: Some(qos.into()),
            })
            .await?;
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}
