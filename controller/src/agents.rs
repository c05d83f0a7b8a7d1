//! Where the controller's requests go: the node agents (`agent.proto`), by node name.
//!
//! ```text
//!   standalone:  ControllerService ─► NodeAgent::Local(dyn Agent) ─► this process's engine
//!   cluster:     ControllerService ─► NodeAgent::Remote(gRPC, mutual TLS) ─► node's engine
//! ```
//! One code path either way: the controller speaks the agent's messages and status codes, and
//! standalone mode calls the same service in-process — whatever implements `agent.proto`'s
//! `Agent` trait, handed over by the composition (the controller does not know the engine). A volume or snapshot of a local pool
//! names its node in its ID (`vol:<pool>@<node>:<name>`), so requests about it go there. A
//! shared pool's volume goes to the node it is attached on (its owner record), else to the
//! default node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use qsd_csi_model::id::{IdKind, ObjectId};
use qsd_csi_proto::agent::{
    self, agent_client::AgentClient, agent_server::Agent, ChangesStream, CopyExportStream,
    EventStream, HeldStream,
};
use qsd_csi_proto::paging::all_pages;
use qsd_csi_proto::tls::TlsFiles;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::ControllerError;

/// An agent in this process: anything that serves `agent.proto`.
pub type LocalAgent = Arc<
    dyn Agent<
        WatchEventsStream = EventStream,
        SnapshotChangesStream = ChangesStream,
        ExportForCopyStream = CopyExportStream,
        HoldWritesStream = HeldStream,
    >,
>;

/// One node's agent.
#[derive(Clone)]
pub enum NodeAgent {
    /// The engine in this process.
    Local(LocalAgent),
    /// A node plugin's agent over gRPC.
    Remote(AgentClient<Channel>),
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeAgent::Local(_) => f.write_str("NodeAgent::Local"),
            NodeAgent::Remote(client) => f.debug_tuple("NodeAgent::Remote").field(client).finish(),
        }
    }
}

/// The agent answers with explicit codes only; UNKNOWN or CANCELLED come from the transport
/// (a refused TLS handshake, a connection closed under the request): to the CO the node is
/// unavailable.
fn unreachable_is_unavailable(status: Status) -> Status {
    match status.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled => {
            ControllerError::Unreachable(status).into()
        }
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
    locate_volume(agent::VolumeRef) -> agent::VolumeLocation;
    locate_snapshot(agent::SnapshotRef) -> agent::VolumeLocation;
    list_volumes(agent::ListRequest) -> agent::VolumeList;
    expand_volume(agent::ExpandVolumeRequest) -> agent::Volume;
    modify_volume(agent::ModifyVolumeRequest) -> agent::Empty;
    create_snapshots(agent::CreateSnapshotsRequest) -> agent::SnapshotList;
    delete_snapshot(agent::SnapshotRef) -> agent::Empty;
    list_snapshots(agent::ListRequest) -> agent::SnapshotList;
    get_capacity(agent::PoolRef) -> agent::Capacity;
    get_snapshot_group(agent::SnapshotGroupRef) -> agent::SnapshotList;
    delete_snapshot_group(agent::SnapshotGroupRef) -> agent::Empty;
    get_volume_health(agent::VolumeRef) -> agent::VolumeHealth;
    list_volume_health(agent::ListRequest) -> agent::VolumeHealthList;
}

impl NodeAgent {
    /// Every volume of the node, page after page, in ID order.
    pub async fn every_volume(&self) -> Result<Vec<agent::Volume>, Status> {
        all_pages(|r| async move { self.list_volumes(r).await.map(|l| (l.volumes, l.next_token)) })
            .await
    }

    /// Every snapshot of the node, page after page, in ID order.
    pub async fn every_snapshot(&self) -> Result<Vec<agent::Snapshot>, Status> {
        all_pages(
            |r| async move { self.list_snapshots(r).await.map(|l| (l.snapshots, l.next_token)) },
        )
        .await
    }

    /// Every volume of the node with a health finding, page after page, in ID order.
    pub async fn every_volume_health(&self) -> Result<Vec<agent::VolumeHealth>, Status> {
        all_pages(
            |r| async move { self.list_volume_health(r).await.map(|l| (l.volumes, l.next_token)) },
        )
        .await
    }

    /// The agent's `WatchEvents`: the node's volume events from now on.
    pub async fn watch_events(&self) -> Result<EventStream, Status> {
        match self {
            NodeAgent::Local(service) => {
                service.watch_events(Request::new(agent::Empty {})).await.map(Response::into_inner)
            }
            NodeAgent::Remote(client) => {
                let stream = client
                    .clone()
                    .watch_events(agent::Empty {})
                    .await
                    .map_err(unreachable_is_unavailable)?
                    .into_inner();
                Ok(Box::pin(stream) as EventStream)
            }
        }
    }

    /// The agent's `ExportForCopy`: the export's address and key first; it lives until the
    /// stream is dropped.
    pub async fn export_for_copy(
        &self,
        request: agent::ExportForCopyRequest,
    ) -> Result<CopyExportStream, Status> {
        match self {
            NodeAgent::Local(service) => {
                service.export_for_copy(Request::new(request)).await.map(Response::into_inner)
            }
            NodeAgent::Remote(client) => {
                let stream = client
                    .clone()
                    .export_for_copy(request)
                    .await
                    .map_err(unreachable_is_unavailable)?
                    .into_inner();
                Ok(Box::pin(stream) as CopyExportStream)
            }
        }
    }

    /// The agent's `HoldWrites`: returns once the writes are held; they stay held until the
    /// stream is dropped.
    pub async fn hold_writes(&self, volume_ids: Vec<String>) -> Result<HeldStream, Status> {
        let request = agent::HoldWritesRequest { volume_ids };
        let mut held = match self {
            NodeAgent::Local(service) => {
                service.hold_writes(Request::new(request)).await.map(Response::into_inner)?
            }
            NodeAgent::Remote(client) => {
                let stream = client
                    .clone()
                    .hold_writes(request)
                    .await
                    .map_err(unreachable_is_unavailable)?
                    .into_inner();
                Box::pin(stream) as HeldStream
            }
        };
        match tokio_stream::StreamExt::next(&mut held).await {
            Some(Ok(agent::Held {})) => Ok(held),
            Some(Err(e)) => Err(unreachable_is_unavailable(e)),
            None => Err(Status::unavailable("the node let go of the writes before holding them")),
        }
    }

    /// The agent's `SnapshotChanges`: a snapshot's changed ranges, streamed.
    pub async fn snapshot_changes(
        &self,
        request: agent::ChangesRequest,
    ) -> Result<ChangesStream, Status> {
        match self {
            NodeAgent::Local(service) => {
                service.snapshot_changes(Request::new(request)).await.map(Response::into_inner)
            }
            NodeAgent::Remote(client) => {
                let stream = client
                    .clone()
                    .snapshot_changes(request)
                    .await
                    .map_err(unreachable_is_unavailable)?
                    .into_inner();
                Ok(Box::pin(stream) as ChangesStream)
            }
        }
    }
}

/// A node's agent at `addr` over mutual TLS, connected on first use (a node that is down must
/// not keep the controller from starting). Its certificate must name `server_name`.
pub fn remote(
    addr: std::net::SocketAddr,
    server_name: &str,
    tls: &TlsFiles,
) -> Result<NodeAgent, ControllerError> {
    let channel = tls
        .lazy_channel(addr, server_name)
        .map_err(|source| ControllerError::Channel { node: server_name.to_owned(), source })?;
    Ok(NodeAgent::Remote(AgentClient::new(channel)))
}

/// The node agents the controller knows, by node name. Cheap to clone (shared); the set can
/// change while the controller runs (agents discovered or gone).
#[derive(Debug, Clone)]
pub struct Agents {
    nodes: Arc<RwLock<BTreeMap<String, NodeAgent>>>,
    /// With discovery: the nodes the cluster has, agent or not. A node without an agent that
    /// the cluster still has is one whose node plugin is not running now (restarting,
    /// upgraded): its volumes exist, and requests for them must be retried, not answered.
    cluster_nodes: Arc<RwLock<Option<BTreeSet<String>>>>,
    default_node: Option<String>,
    /// Volumes moved off the node their ID names (they keep the ID): where they are routed.
    /// Found by [`Agents::find_moved`]; a move records its own at once.
    moves: crate::moves::Moves,
}

impl Agents {
    /// Agents by node name; requests that name no node go to `default_node` (or, without one,
    /// to the first node by name).
    pub fn new(nodes: BTreeMap<String, NodeAgent>, default_node: Option<String>) -> Self {
        Agents {
            nodes: Arc::new(RwLock::new(nodes)),
            cluster_nodes: Arc::new(RwLock::new(None)),
            default_node,
            moves: Default::default(),
        }
    }

    /// Standalone: the engine of this process (its agent service), on `node`.
    pub fn local(node: &str, service: LocalAgent) -> Self {
        Agents::new([(node.to_owned(), NodeAgent::Local(service))].into(), Some(node.to_owned()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, NodeAgent>> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the set of agents (discovery); returns the node names added and removed.
    pub fn replace(&self, nodes: BTreeMap<String, NodeAgent>) -> (Vec<String>, Vec<String>) {
        let mut current = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let added = nodes.keys().filter(|n| !current.contains_key(*n)).cloned().collect();
        let removed = current.keys().filter(|n| !nodes.contains_key(*n)).cloned().collect();
        *current = nodes;
        (added, removed)
    }

    /// Every node and its agent, by name.
    pub fn nodes(&self) -> Vec<(String, NodeAgent)> {
        self.read().iter().map(|(n, a)| (n.clone(), a.clone())).collect()
    }

    /// The names of the nodes with an agent, in order.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The node requests without a node go to; UNAVAILABLE while no agent is known.
    pub fn default_node(&self) -> Result<String, ControllerError> {
        match &self.default_node {
            Some(n) => Ok(n.clone()),
            None => self.read().keys().next().cloned().ok_or(ControllerError::NoAgents),
        }
    }

    /// Records the nodes the cluster has (discovery lists them with the agents).
    pub fn set_cluster_nodes(&self, nodes: BTreeSet<String>) {
        *self.cluster_nodes.write().unwrap_or_else(|p| p.into_inner()) = Some(nodes);
    }

    /// The agent of `node`. A node the cluster has but whose agent is not known now (its node
    /// plugin restarting): UNAVAILABLE, so the caller retries and nothing on it is taken for
    /// gone. A node neither has (or, without discovery, one not configured) holds nothing
    /// this controller can reach: NOT_FOUND.
    pub fn node(&self, node: &str) -> Result<NodeAgent, ControllerError> {
        if let Some(agent) = self.read().get(node) {
            return Ok(agent.clone());
        }
        let in_cluster = self
            .cluster_nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|nodes| nodes.contains(node));
        if in_cluster {
            Err(ControllerError::AgentDown(node.to_owned()))
        } else {
            Err(ControllerError::UnknownNode(node.to_owned()))
        }
    }

    /// Records that volume `id` now lives on `node` (this controller moved it there, keeping
    /// its ID).
    pub fn moved_to(&self, id: &str, node: &str) {
        self.moves.made(id, node);
    }

    /// The node a moved volume is routed to, if `id` names one that was moved.
    pub fn moved(&self, id: &str) -> Option<String> {
        self.moves.routed(id)
    }

    /// Every ID some node lists under another node's ID, with those nodes, as they said
    /// (unchecked: for removing copies of moves cut short, never for routing).
    pub fn move_claims(&self) -> Vec<(String, Vec<String>)> {
        self.moves.claims()
    }

    /// Asks every agent which volumes it holds under another node's ID, and routes those IDs
    /// where the checks of [`crate::moves`] allow.
    pub async fn find_moved(&self) {
        self.moves.refresh(&self.nodes()).await;
    }

    /// The node an object ID lives on. A local pool's ID names it, unless the volume was
    /// moved (it keeps its ID): then the node it was moved to. A shared pool's volume
    /// goes to the node its owner record names (where it is attached, so the daemon holding it
    /// open does the work), and a shared pool's snapshot to where its source volume is
    /// attached, as the default node's agent reports; otherwise the default node.
    pub async fn node_of(&self, kind: IdKind, id: &str) -> Result<String, Status> {
        let parsed = ObjectId::parse(kind, id).map_err(ControllerError::from)?;
        if let Some(node) = self.moved(id).filter(|_| kind == IdKind::Volume) {
            return Ok(node);
        }
        if let Some(n) = parsed.location.node {
            return Ok(n.as_str().to_owned());
        }
        let default = self.default_node()?;
        let agent = self.node(&default)?;
        let located = match kind {
            IdKind::Volume => {
                agent.locate_volume(agent::VolumeRef { volume_id: id.to_owned() }).await
            }
            IdKind::Snapshot => {
                agent.locate_snapshot(agent::SnapshotRef { snapshot_id: id.to_owned() }).await
            }
            // A shared pool's group: any node reads its records; the default one answers.
            IdKind::Group => return Ok(default),
        };
        match located {
            Ok(l) if !l.attached_node.is_empty() => {
                if self.read().contains_key(&l.attached_node) {
                    Ok(l.attached_node)
                } else {
                    Err(ControllerError::HolderUnknown { id: id.to_owned(), node: l.attached_node }
                        .into())
                }
            }
            Ok(_) => Ok(default),
            // The default node answers for a volume it does not hold (NOT_FOUND) as it would
            // for the request itself.
            Err(e) if e.code() == tonic::Code::NotFound => Ok(default),
            Err(e) => Err(e),
        }
    }

    /// The agent that holds an object.
    pub async fn for_id(&self, kind: IdKind, id: &str) -> Result<NodeAgent, Status> {
        Ok(self.node(&self.node_of(kind, id).await?)?)
    }
}
