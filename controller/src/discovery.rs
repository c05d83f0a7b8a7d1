//! Finds the node agents in a cluster: the node plugin pods, selected by label in one
//! namespace, run on the host network, so each names its node (`spec.nodeName`) and carries
//! the node's address (`status.podIP`). The agent listens there on a known port.
//!
//! ```text
//!   list pods (namespace, labelSelector) ─► {node name → podIP:port} ─► Agents::replace
//!   at start and every REFRESH; a node whose address is unchanged keeps its connection
//! ```
//!
//! The cluster's Nodes are listed with them: a node the cluster has whose plugin pod is not
//! running (deleted, restarting) is unavailable for now, not gone (`Agents::node`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use crate::agents::{Agents, NodeAgent};
use crate::error::ControllerError;

/// How often the agents are listed again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Where to look for node plugin pods.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The namespace of the node plugin pods.
    pub namespace: String,
    /// Their label selector, e.g. `app.kubernetes.io/component=node`.
    pub selector: String,
    /// The agent's port on each node.
    pub port: u16,
}

impl Discovery {
    /// Node name → agent address of every node plugin pod that is scheduled, has an address
    /// and is not being deleted.
    pub async fn addresses(
        &self,
        client: kube::Client,
    ) -> Result<BTreeMap<String, SocketAddr>, ControllerError> {
        let pods: Api<Pod> = Api::namespaced(client, &self.namespace);
        let list =
            pods.list(&ListParams::default().labels(&self.selector)).await.map_err(|source| {
                ControllerError::Kubernetes { what: "list node plugin pods", source }
            })?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| {
                let node = p.spec?.node_name?;
                let ip: IpAddr = p.status?.pod_ip?.parse().ok()?;
                Some((node, SocketAddr::new(ip, self.port)))
            })
            .collect())
    }

    /// Lists the agents once and makes `agents` exactly those. `known` is the previous
    /// listing (kept by the caller between refreshes); `connect` builds a new node's agent.
    pub async fn refresh(
        &self,
        client: kube::Client,
        agents: &Agents,
        known: &mut BTreeMap<String, SocketAddr>,
        connect: &impl Fn(&str, SocketAddr) -> Result<NodeAgent, ControllerError>,
    ) -> Result<(), ControllerError> {
        let nodes: Api<Node> = Api::all(client.clone());
        let cluster_nodes = nodes
            .list_metadata(&ListParams::default())
            .await
            .map_err(|source| ControllerError::Kubernetes { what: "list nodes", source })?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name);
        agents.set_cluster_nodes(cluster_nodes.collect());
        let listed = self.addresses(client).await?;
        let current: BTreeMap<String, NodeAgent> = agents.nodes().into_iter().collect();
        let mut found = BTreeMap::new();
        for (node, addr) in &listed {
            let agent = match current.get(node) {
                Some(a) if known.get(node) == Some(addr) => a.clone(),
                _ => connect(node, *addr)?,
            };
            found.insert(node.clone(), agent);
        }
        *known = listed;
        let (added, removed) = agents.replace(found);
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(?added, ?removed, "node agents changed");
        }
        Ok(())
    }
}
