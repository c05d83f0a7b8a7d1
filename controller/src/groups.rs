//! CSI GroupController: snapshots of several volumes at one instant.
//!
//! ```text
//!   CreateVolumeGroupSnapshot(name, volumes) ─► volumes by node
//!     one node:  its agent: CreateSnapshots(group) ─► one QMP transaction, mounted
//!                filesystems frozen around it
//!     several:   HoldWrites on every node (filesystems frozen; a volume attached without
//!                one: FAILED_PRECONDITION) ─► CreateSnapshots(group) on each, unfrozen
//!                ─► every hold let go; a node that fails: the other nodes' parts deleted
//! ```
//! Across nodes no write lands anywhere between the first node's hold and the last node's
//! snapshot, so the members are one instant; without freezing (`freezeFilesystem: "false"`)
//! nothing could hold the writes, and such a group is refused. Each node keeps its part under
//! its own group ID, `group:<pool>[@<node>]:<name>`; the group's ID is its first node's part's,
//! and Get and Delete of a local pool's group gather the parts from every node. Members are
//! ordinary snapshots, deleted with the group only.

use std::collections::BTreeMap;

use qsd_csi_model::id::{IdKind, NodeName, ObjectId};
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

    /// Where a group's parts may be, as (node, that node's group ID): for a local pool's
    /// group, the same name on every node with an agent (its first node's first); for a
    /// shared pool's, the node requests for it go to.
    async fn parts(&self, group_id: &str) -> Result<Vec<(String, String)>, Status> {
        let parsed = ObjectId::parse(IdKind::Group, group_id).map_err(ControllerError::from)?;
        let Some(first) = parsed.location.node.clone() else {
            let node = self.agents.node_of(IdKind::Group, group_id).await?;
            return Ok(vec![(node, group_id.to_owned())]);
        };
        let mut nodes = vec![first.as_str().to_owned()];
        nodes.extend(self.agents.names().into_iter().filter(|n| n != first.as_str()));
        let mut parts = Vec::new();
        for node in nodes {
            let mut part = parsed.clone();
            part.location.node = Some(NodeName::parse(&node).map_err(ControllerError::from)?);
            parts.push((node, part.to_string()));
        }
        Ok(parts)
    }

    /// Deletes the parts of a group made so far (a later node failed), as far as it can.
    async fn delete_parts(&self, parts: &[agent::SnapshotList]) {
        for part in parts {
            let Some(first) = part.snapshots.first() else { continue };
            let group_snapshot_id = first.group_snapshot_id.clone();
            let Ok(agent) = self.agents.node(&first.node) else { continue };
            let r = agent::SnapshotGroupRef { group_snapshot_id: group_snapshot_id.clone() };
            if let Err(e) = agent.delete_snapshot_group(r).await {
                tracing::warn!(group = group_snapshot_id, error = %e.message(), "deleting a part of a failed group snapshot failed");
            }
        }
    }
}

/// Whether members spread over `by_node` can be one group: across nodes only with every
/// node's filesystems frozen, and never for a shared pool (one node takes its groups).
fn check_spread(
    by_node: &BTreeMap<String, Vec<String>>,
    shared: bool,
    freeze: bool,
) -> Result<(), ControllerError> {
    if by_node.len() < 2 {
        return Ok(());
    }
    let nodes: Vec<&String> = by_node.keys().collect();
    if shared {
        return Err(ControllerError::Ungroupable(format!(
            "the volumes are attached on nodes {nodes:?}: a shared pool's group snapshot is \
             taken by one node, so its volumes must be attached on that node (or nowhere)"
        )));
    }
    if !freeze {
        return Err(ControllerError::Ungroupable(format!(
            "the volumes are on nodes {nodes:?}: a group across nodes is one instant only \
             while every node holds its members' writes, by freezing their filesystems, \
             which freezeFilesystem: \"false\" turns off"
        )));
    }
    Ok(())
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
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for id in &req.source_volume_ids {
            let node = self.agents.node_of(IdKind::Volume, id).await?;
            by_node.entry(node).or_default().push(id.clone());
        }
        let shared = req.source_volume_ids.iter().any(|id| {
            crate::shapes::location(IdKind::Volume, id).is_some_and(|(_, node)| node.is_none())
        });
        check_spread(&by_node, shared, freeze)?;
        let group_name = params::object_name(&req.name);
        // Every node holds its members' writes before any takes its part (one node: its own
        // transaction is the instant, frozen inside CreateSnapshots).
        let mut holds = Vec::new();
        if by_node.len() > 1 {
            for (node, ids) in &by_node {
                holds.push(self.agents.node(node)?.hold_writes(ids.clone()).await?);
            }
        }
        let mut parts = Vec::new();
        for (node, ids) in &by_node {
            let snapshots = ids
                .iter()
                .map(|id| agent::SnapshotRequest {
                    volume_id: id.clone(),
                    // Stable per (group, volume): a retry names the same members.
                    name: params::object_name(&format!("{}/{id}", req.name)),
                })
                .collect();
            let request = agent::CreateSnapshotsRequest {
                snapshots,
                group: group_name.clone(),
                no_freeze: !freeze || by_node.len() > 1,
            };
            match self.agents.node(node)?.create_snapshots(request).await {
                Ok(taken) => parts.push(taken),
                Err(e) => {
                    drop(holds);
                    self.delete_parts(&parts).await;
                    return Err(e);
                }
            }
        }
        drop(holds);
        let mut taken = agent::SnapshotList {
            snapshots: parts.into_iter().flat_map(|p| p.snapshots).collect(),
            next_token: String::new(),
        };
        // The group's ID is its first node's part's.
        let id = taken.snapshots.first().map(|s| s.group_snapshot_id.clone()).unwrap_or_default();
        for member in &mut taken.snapshots {
            member.group_snapshot_id = id.clone();
        }
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
        let mut parts = Vec::new();
        // An ID that was never ours, or whose node is gone: deleted, as the spec asks.
        let located = match self.parts(&req.group_snapshot_id).await {
            Err(e) if e.code() == tonic::Code::NotFound => Vec::new(),
            located => located?,
        };
        for (node, part) in located {
            let deleted = match self.agents.node(&node) {
                Ok(a) => {
                    a.delete_snapshot_group(agent::SnapshotGroupRef { group_snapshot_id: part })
                        .await
                }
                Err(e) => Err(e.into()),
            };
            parts.push(deleted);
        }
        // Gone, or an ID that was never ours: deleted, as the spec asks.
        match parts
            .into_iter()
            .find(|r| r.as_ref().is_err_and(|e| e.code() != tonic::Code::NotFound))
        {
            Some(failed) => ok_if_gone(failed),
            None => Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse::default())),
        }
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("group_snapshot_id", &req.group_snapshot_id)?;
        let mut members = agent::SnapshotList::default();
        for (node, part) in self.parts(&req.group_snapshot_id).await? {
            let found = self
                .agents
                .node(&node)?
                .get_snapshot_group(agent::SnapshotGroupRef { group_snapshot_id: part })
                .await;
            match found {
                Ok(list) => members.snapshots.extend(list.snapshots),
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if members.snapshots.is_empty() {
            return Err(Status::not_found(format!("no group snapshot {}", req.group_snapshot_id)));
        }
        for member in &mut members.snapshots {
            member.group_snapshot_id = req.group_snapshot_id.clone();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_spans_nodes_only_frozen_and_never_for_a_shared_pool() {
        let one: BTreeMap<String, Vec<String>> = [("n1".into(), vec!["a".into()])].into();
        let two: BTreeMap<String, Vec<String>> =
            [("n1".into(), vec!["a".into()]), ("n2".into(), vec!["b".into()])].into();
        // (row, members, shared pool, freeze, allowed)
        let rows = [
            ("one node, shared, unfrozen", &one, true, false, true),
            ("two nodes, frozen", &two, false, true, true),
            ("two nodes, unfrozen", &two, false, false, false),
            ("two nodes, shared", &two, true, true, false),
        ];
        for (row, by_node, shared, freeze, allowed) in rows {
            assert_eq!(check_spread(by_node, shared, freeze).is_ok(), allowed, "{row}");
        }
    }
}
