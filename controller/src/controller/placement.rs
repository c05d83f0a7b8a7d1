//! Where a new volume goes, and copying it there from another node when its source lives
//! on one.

use std::collections::HashMap;

use qsd_csi_model::id::{IdKind, ObjectId};
use qsd_csi_model::params::TOPOLOGY_KEY;
use qsd_csi_model::volume::VolumeSource;
use qsd_csi_proto::{agent, csi};
use tonic::Status;

use super::ControllerService;
use crate::error::ControllerError;
use crate::params;
use crate::shapes::location;

impl ControllerService {
    /// The node a new volume goes to, and for a source in another node's local pool, that
    /// node (the volume is then copied across).
    ///
    /// Without a source: the first preferred, else the first requisite topology naming a node
    /// with an agent, else the default node. With a source in a local pool: the first
    /// preferred node (the scheduler's pick, under WaitForFirstConsumer), else the source's
    /// node, else the first requisite one. A shared pool's source is served where it is. A
    /// node outside the requisite topologies is RESOURCE_EXHAUSTED. The first preferred node
    /// is the scheduler's choice when the class waits for the first consumer: if the cluster
    /// has it but its agent is not up now (its node plugin restarting), the answer is
    /// UNAVAILABLE, so the CO retries, rather than a volume on a node its pod cannot use.
    pub(super) async fn placement(
        &self,
        requirement: Option<&csi::TopologyRequirement>,
        source: Option<&(IdKind, String)>,
    ) -> Result<(String, Option<String>), Status> {
        let known = |t: &csi::Topology| {
            t.segments.get(TOPOLOGY_KEY).filter(|n| self.agents.node(n).is_ok()).cloned()
        };
        let allowed = |node: &str| {
            requirement.is_none_or(|req| {
                req.requisite.is_empty()
                    || req
                        .requisite
                        .iter()
                        .any(|t| t.segments.get(TOPOLOGY_KEY).is_none_or(|n| n == node))
            })
        };
        if let Some(first) = requirement.and_then(|r| r.preferred.first()) {
            if let Some(node) = first.segments.get(TOPOLOGY_KEY) {
                if let Err(e @ ControllerError::AgentDown(_)) = self.agents.node(node) {
                    return Err(e.into());
                }
            }
        }
        let (node, from) = match (source, requirement) {
            (Some((kind, id)), _) => {
                let held_by = self.agents.node_of(*kind, id).await?;
                let local = location(*kind, id).is_some_and(|(_, node)| node.is_some());
                let picked = requirement.and_then(|r| r.preferred.first()).and_then(known);
                let target = match picked.filter(|n| local && allowed(n)) {
                    Some(n) => n,
                    None if allowed(&held_by) || !local => held_by.clone(),
                    None => requirement
                        .and_then(|r| r.requisite.iter().find_map(known))
                        .unwrap_or_else(|| held_by.clone()),
                };
                let from = (target != held_by).then_some(held_by);
                (target, from)
            }
            (None, Some(req)) => match req.preferred.iter().chain(&req.requisite).find_map(known) {
                Some(node) => (node, None),
                None => (self.agents.default_node()?, None),
            },
            (None, None) => (self.agents.default_node()?, None),
        };
        if !allowed(&node) {
            return Err(ControllerError::Unplaceable(node).into());
        }
        Ok((node, from))
    }

    /// Creates the volume `message` describes on `node` as a copy of its source, which node
    /// `from` serves for the copy's duration (`ExportForCopy`, held until the copy ends).
    pub(super) async fn copy_across(
        &self,
        node: &str,
        from: &str,
        source: &VolumeSource,
        mut message: agent::CreateVolumeRequest,
    ) -> Result<agent::Volume, Status> {
        let target = self.agents.node(node)?;
        let request = agent::ExportForCopyRequest {
            source: Some(source.into()),
            reader_node: node.to_owned(),
        };
        let mut export = self.agents.node(from)?.export_for_copy(request).await?;
        let served = tokio_stream::StreamExt::next(&mut export).await.ok_or_else(|| {
            ControllerError::Unreachable(Status::unavailable(format!(
                "node {from} ended the copy's export before serving it"
            )))
        })??;
        tracing::info!(from, to = node, name = message.name, "copying a volume across nodes");
        message.remote = Some(served);
        let created = target.create_volume(message).await;
        drop(export); // the source node stops serving
        created
    }

    /// Moves volume `id` from node `from` to node `to`, keeping its ID: a copy across that
    /// replaces it, of its size, labels and growth policy, with the QoS and layout its class's
    /// `parameters` give. The original stays on `from` until the caller deletes it.
    pub async fn move_volume(
        &self,
        id: &str,
        from: &str,
        to: &str,
        parameters: &HashMap<String, String>,
    ) -> Result<agent::Volume, Status> {
        let parsed = ObjectId::parse(IdKind::Volume, id).map_err(ControllerError::from)?;
        let volume_ref = agent::VolumeRef { volume_id: id.to_owned() };
        let held = self.agents.node(from)?.get_volume(volume_ref).await?;
        use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
        let request = csi::CreateVolumeRequest {
            name: parsed.name.as_str().to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: held.size_bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![csi::VolumeCapability {
                access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
                access_type: Some(AccessType::Block(BlockVolume {})),
            }],
            parameters: parameters.clone(),
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource { volume_id: id.to_owned() },
                )),
            }),
            ..Default::default()
        };
        let mut command = params::create_volume(&request, &self.default_pool)?;
        command.pool = parsed.location.pool.clone();
        command.name = parsed.name.clone();
        command.labels = held.labels.into_iter().collect();
        command.auto_expand = held
            .auto_expand
            .map(qsd_csi_model::grow::AutoExpand::try_from)
            .transpose()
            .map_err(ControllerError::from)?;
        command.keep_id = Some(parsed.clone());
        let source = VolumeSource::Volume(parsed.clone());
        let message = agent::CreateVolumeRequest::from(&command);
        let moved = self.copy_across(to, from, &source, message).await?;
        self.agents.moved_to(id, to);
        Ok(moved)
    }
}
