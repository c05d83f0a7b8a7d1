//! CSI GroupController: snapshots of several volumes at one instant.
//!
//! ```text
//!   CreateVolumeGroupSnapshot(name, volumes)
//!     └─ every volume on one node? ── no ─► FAILED_PRECONDITION (no cross-node instant)
//!          yes ─► that node's agent: CreateSnapshots(group) ─► one QMP transaction,
//!                 mounted filesystems frozen around it
//! ```
//! One instant across nodes would need every node's I/O paused together, which QMP cannot do
//! across daemons; qsd-csi refuses such a group rather than hand back members taken at
//! different instants. The group's ID is `group:<pool>[@<node>]:<name>`; its members are
//! ordinary snapshots that carry it, deleted with the group only.

use qsd_csi_model::id::IdKind;
use qsd_csi_proto::agent;
use qsd_csi_proto::csi::{self, group_controller_server::GroupController};
use tonic::{Request, Response, Status};

use crate::agents::Agents;
use crate::error::{required, ControllerError};
use crate::params;
use crate::shapes::{self, ok_if_gone};

/// The GroupController service.
#[derive(Debug, Clone)]
pub struct GroupService {
    agents: Agents,
}

impl GroupService {
    /// Group snapshots through `agents`.
    pub fn new(agents: Agents) -> Self {
        GroupService { agents }
    }
}

/// The CSI group of an agent's members (which all carry the group's ID).
fn group(
    members: &agent::SnapshotList,
    nodes: &[String],
) -> Result<csi::VolumeGroupSnapshot, Status> {
    let first = members
        .snapshots
        .first()
        .ok_or_else(|| ControllerError::Internal("the agent returned an empty group".into()))?;
    Ok(csi::VolumeGroupSnapshot {
        group_snapshot_id: first.group_snapshot_id.clone(),
        snapshots: members.snapshots.iter().map(|s| shapes::snapshot(s, nodes)).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: members.snapshots.iter().map(|s| s.created_unix).min().unwrap_or(0) as i64,
            nanos: 0,
        }),
        ready_to_use: true,
    })
}

#[tonic::async_trait]
impl GroupController for GroupService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let rpc = Rpc { r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32 };
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(Cap::Rpc(rpc)),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("name", &req.name)?;
        if req.source_volume_ids.is_empty() {
            return Err(ControllerError::Required("source_volume_ids").into());
        }
        let freeze = params::snapshot_freeze(&req.parameters)?;
        let mut node = None;
        for id in &req.source_volume_ids {
            let here = self.agents.node_of(IdKind::Volume, id).await?;
            match &node {
                None => node = Some(here),
                Some(first) if *first != here => {
                    return Err(ControllerError::Ungroupable(format!(
                        "the volumes are on nodes {first} and {here}: qsd-csi takes a group \
                         snapshot in one transaction of one node's daemon, so every volume of \
                         a group must be attached on (or local to) the same node"
                    ))
                    .into());
                }
                Some(_) => {}
            }
        }
        let agent = self.agents.node(node.as_deref().unwrap_or_default())?;
        let group_name = params::object_name(&req.name);
        let snapshots = req
            .source_volume_ids
            .iter()
            .map(|id| agent::SnapshotRequest {
                volume_id: id.clone(),
                // Stable per (group, volume): a retry names the same members.
                name: params::object_name(&format!("{}/{id}", req.name)),
            })
            .collect();
        let taken = agent
            .create_snapshots(agent::CreateSnapshotsRequest {
                snapshots,
                group: group_name,
                no_freeze: !freeze,
            })
            .await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group(&taken, &self.agents.names())?),
        }))
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("group_snapshot_id", &req.group_snapshot_id)?;
        let deleted = match self.agents.for_id(IdKind::Group, &req.group_snapshot_id).await {
            Ok(a) => {
                let r = agent::SnapshotGroupRef { group_snapshot_id: req.group_snapshot_id };
                a.delete_snapshot_group(r).await
            }
            Err(e) => Err(e),
        };
        // Gone, or an ID that was never ours: deleted, as the spec asks.
        ok_if_gone(deleted)
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("group_snapshot_id", &req.group_snapshot_id)?;
        let members = self
            .agents
            .for_id(IdKind::Group, &req.group_snapshot_id)
            .await?
            .get_snapshot_group(agent::SnapshotGroupRef {
                group_snapshot_id: req.group_snapshot_id.clone(),
            })
            .await?;
        let group = group(&members, &self.agents.names())?;
        if !req.snapshot_ids.is_empty() {
            let mut asked = req.snapshot_ids.clone();
            let mut have: Vec<String> =
                group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
            asked.sort();
            have.sort();
            if asked != have {
                return Err(ControllerError::Unsupported(format!(
                    "snapshot_ids do not match the members of {}",
                    req.group_snapshot_id
                ))
                .into());
            }
        }
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(group) }))
    }
}
