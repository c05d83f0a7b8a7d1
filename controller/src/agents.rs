//! Where the controller's requests go: the node agents (`agent.proto`), by node name.
//!
//! ```text
//!   standalone:  ControllerService ─► NodeAgent::Local(AgentService) ─► this process's engine
//!   cluster:     ControllerService ─► NodeAgent::Remote(gRPC, mutual TLS) ─► node's engine
//! ```
//! One code path either way: the controller speaks the agent's messages and status codes, and
//! standalone mode calls the same service in-process. A volume or snapshot of a local pool
//! names its node in its ID (`vol:<pool>@<node>:<name>`), so requests about it go there; IDs
//! without a node (shared pools) go to the default node.

use std::collections::BTreeMap;

use qsd_csi_proto::agent::{self, agent_client::AgentClient, agent_server::Agent};
use qsd_node::agent::AgentService;
use qsd_node::pool::id::{IdKind, ObjectId};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// One node's agent.
#[derive(Debug, Clone)]
pub enum NodeAgent {
    /// The engine in this process.
    Local(AgentService),
    /// A node plugin's agent over gRPC.
    Remote(AgentClient<Channel>),
}

/// The agent answers with explicit codes only; an UNKNOWN comes from the transport (refused
/// TLS handshake, reset connection): the node is unavailable to us.
fn unreachable_is_unavailable(status: Status) -> Status {
    match status.code() {
        tonic::Code::Unknown => Status::unavailable(format!("node agent unreachable: {status}")),
        _ => status,
    }
}

/// Forwards one agent call to either kind of agent.
macro_rules! forward {
    ($($method:ident($req:ty) -> $resp:ty;)*) => {
        impl NodeAgent {
            $(
                #[doc = concat!("The agent's `", stringify!($method), "`.")]
                pub async fn $method(&self, request: $req) -> Result<$resp, Status> {
                    match self {
                        NodeAgent::Local(service) => {
                            service.$method(Request::new(request)).await.map(Response::into_inner)
                        }
                        NodeAgent::Remote(client) => client
                            .clone()
                            .$method(request)
                            .await
                            .map(Response::into_inner)
                            .map_err(unreachable_is_unavailable),
                    }
                }
            )*
        }
    };
}

forward! {
    create_volume(agent::CreateVolumeRequest) -> agent::Volume;
    delete_volume(agent::VolumeRef) -> agent::Empty;
    get_volume(agent::VolumeRef) -> agent::Volume;
    list_volumes(agent::Empty) -> agent::VolumeList;
    expand_volume(agent::ExpandVolumeRequest) -> agent::Volume;
    modify_volume(agent::ModifyVolumeRequest) -> agent::Empty;
    create_snapshots(agent::CreateSnapshotsRequest) -> agent::SnapshotList;
    delete_snapshot(agent::SnapshotRef) -> agent::Empty;
    list_snapshots(agent::Empty) -> agent::SnapshotList;
    get_capacity(agent::PoolRef) -> agent::Capacity;
}

/// The node agents the controller knows, by node name.
#[derive(Debug, Clone)]
pub struct Agents {
    nodes: BTreeMap<String, NodeAgent>,
    default_node: String,
}

impl Agents {
    /// Agents by node name; requests that name no node go to `default_node`, which must be one
    /// of them.
    pub fn new(nodes: BTreeMap<String, NodeAgent>, default_node: String) -> Result<Self, String> {
        if !nodes.contains_key(&default_node) {
            return Err(format!("the default node {default_node:?} has no agent"));
        }
        Ok(Agents { nodes, default_node })
    }

    /// Standalone: the engine of this process, on `node`.
    pub fn local(node: &str, service: AgentService) -> Self {
        Agents {
            nodes: [(node.to_owned(), NodeAgent::Local(service))].into(),
            default_node: node.to_owned(),
        }
    }

    /// The node names, in order.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeAgent)> {
        self.nodes.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// The default node.
    pub fn default_node(&self) -> &str {
        &self.default_node
    }

    /// The agent of `node`. A node the controller has no agent for holds nothing it can
    /// reach: NOT_FOUND.
    pub fn node(&self, node: &str) -> Result<&NodeAgent, Status> {
        self.nodes.get(node).ok_or_else(|| {
            Status::not_found(format!("node {node:?} is not one this controller serves"))
        })
    }

    /// The node an object ID lives on. `Err` carries the parse error for IDs that cannot be
    /// ours (the caller decides whether that is NOT_FOUND, "already gone" or a bad argument).
    pub fn node_of(&self, kind: IdKind, id: &str) -> Result<String, qsd_node::Error> {
        let parsed = ObjectId::parse(kind, id)?;
        Ok(parsed
            .location
            .node
            .map(|n| n.as_str().to_owned())
            .unwrap_or_else(|| self.default_node.clone()))
    }

    /// The agent that holds an object.
    pub fn for_id(&self, kind: IdKind, id: &str) -> Result<&NodeAgent, Status> {
        let node = self.node_of(kind, id).map_err(qsd_node::csi::status)?;
        self.node(&node)
    }
}
