//! How the agents' objects look in CSI: volumes and snapshots with their topology, IDs' pools
//! and nodes, and the answer to deleting what is gone.

use std::collections::HashMap;

use qsd_csi_model::id::{IdKind, ObjectId};
use qsd_csi_model::params::TOPOLOGY_KEY;
use qsd_csi_model::volume::VolumeSource;
use qsd_csi_proto::{agent, csi};
use tonic::{Code, Response, Status};

use crate::params;

/// The pool and (local pools) node an ID names; `None` for an ID that cannot be ours.
pub fn location(kind: IdKind, id: &str) -> Option<(String, Option<String>)> {
    let parsed = ObjectId::parse(kind, id).ok()?;
    Some((
        parsed.location.pool.as_str().to_owned(),
        parsed.location.node.map(|n| n.as_str().to_owned()),
    ))
}

/// The topology of a volume reachable from `node` only.
pub fn node_topology(node: &str) -> csi::Topology {
    csi::Topology { segments: [(TOPOLOGY_KEY.to_owned(), node.to_owned())].into() }
}

/// An agent's volume as CSI's: its pool in the context (with the class's context keys), its
/// source, and (a local pool's) the node it is reachable from.
pub fn volume(info: &agent::Volume, parameters: &HashMap<String, String>) -> csi::Volume {
    use csi::volume_content_source::{SnapshotSource, Type};
    let (pool, node) = location(IdKind::Volume, &info.volume_id).unwrap_or_default();
    let content_source = info.content_source().map(|source| match source {
        VolumeSource::Snapshot(id) => {
            Type::Snapshot(SnapshotSource { snapshot_id: id.to_string() })
        }
        VolumeSource::Volume(id) => {
            Type::Volume(csi::volume_content_source::VolumeSource { volume_id: id.to_string() })
        }
    });
    let mut context = HashMap::from([("pool".to_owned(), pool)]);
    for key in params::CONTEXT_KEYS {
        if let Some(value) = parameters.get(key) {
            context.insert(key.to_owned(), value.clone());
        }
    }
    // An auto-expanding volume is staged with its threshold armed, named or not by the class.
    if let Some(policy) = info.auto_expand {
        context
            .entry(qsd_csi_model::params::WRITE_THRESHOLD_PERCENT.to_owned())
            .or_insert_with(|| policy.threshold_percent.to_string());
    }
    csi::Volume {
        capacity_bytes: info.size_bytes as i64,
        volume_id: info.volume_id.clone(),
        volume_context: context,
        content_source: content_source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        // A local pool's volume is reachable from its node only; a shared pool's from any.
        accessible_topology: node.iter().map(|n| node_topology(n)).collect(),
    }
}

/// An agent's snapshot as CSI's. A local pool's snapshot is accessible where a volume can be
/// restored from it: its own node first (a linked overlay, O(1)), then every other node in
/// `nodes` (a copy across); a shared pool's from any node (no topology).
pub fn snapshot(info: &agent::Snapshot, nodes: &[String]) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: info.size_bytes as i64,
        snapshot_id: info.snapshot_id.clone(),
        source_volume_id: info.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: info.created_unix as i64, nanos: 0 }),
        ready_to_use: true,
        group_snapshot_id: info.group_snapshot_id.clone(),
        accessible_topology: match info.node.as_str() {
            "" => Vec::new(),
            own => std::iter::once(own)
                .chain(nodes.iter().map(String::as_str).filter(|n| *n != own))
                .map(node_topology)
                .collect(),
        },
    }
}

/// Deleting what does not exist (or cannot exist) succeeds: the CO may retry.
pub fn ok_if_gone<T: Default>(result: Result<agent::Empty, Status>) -> Result<Response<T>, Status> {
    match result {
        Ok(_) => Ok(Response::new(T::default())),
        Err(e) if e.code() == Code::NotFound => Ok(Response::new(T::default())),
        Err(e) => Err(e),
    }
}
