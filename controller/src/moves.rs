//! Where moved volumes live. A volume moved to another node keeps its ID, which names its old
//! node (its home), so the controller keeps a routing of such IDs, checked against the home.
//!
//! ```text
//!   every agent's ListVolumes ─► claims: an ID listed by a node that is not its home
//!   a claim is followed (routed) when exactly one node makes it and its home does not list
//!   the ID (the old copy is gone), or the home's agent is not known at all;
//!   a move this controller made is followed at once
//! ```
//! A node's files are not trusted for another node's IDs: a node that forges a record under
//! another node's ID is not routed to while that node still holds the volume, and two nodes
//! claiming one ID are routed to neither. Claims are kept as they are too (unchecked), for the
//! follower to remove copies of moves cut short, which it decides from the PersistentVolume.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use qsd_csi_model::id::{IdKind, ObjectId};

use crate::agents::NodeAgent;

/// Moved volumes: the routing and the raw claims.
#[derive(Debug, Clone, Default)]
pub struct Moves {
    inner: Arc<RwLock<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// ID → the node it is routed to.
    routed: HashMap<String, String>,
    /// ID → the nodes listing it under another node's ID, as they said.
    claims: HashMap<String, Vec<String>>,
    /// Moves this controller made: ID → node, followed whatever the listings say.
    made: HashMap<String, String>,
}

/// The home node an ID names, if it is a local pool's volume.
fn home(id: &str) -> Option<String> {
    ObjectId::parse(IdKind::Volume, id).ok()?.location.node.map(|n| n.as_str().to_owned())
}

impl Moves {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a move this controller made: `id` now lives on `node`.
    pub fn made(&self, id: &str, node: &str) {
        let mut state = self.write();
        state.made.insert(id.to_owned(), node.to_owned());
        state.routed.insert(id.to_owned(), node.to_owned());
    }

    /// The node a moved volume is routed to, if `id` names one.
    pub fn routed(&self, id: &str) -> Option<String> {
        self.read().routed.get(id).cloned()
    }

    /// Every ID some node lists under another node's ID, with those nodes (unchecked).
    pub fn claims(&self) -> Vec<(String, Vec<String>)> {
        self.read().claims.iter().map(|(id, nodes)| (id.clone(), nodes.clone())).collect()
    }

    /// Lists every node's volumes and works out the routing again. A node that does not
    /// answer keeps what it claimed before.
    pub async fn refresh(&self, nodes: &[(String, NodeAgent)]) {
        let mut claims: HashMap<String, Vec<String>> = HashMap::new();
        let mut at_home = BTreeSet::new();
        let mut silent = BTreeSet::new();
        for (node, agent) in nodes {
            let Ok(volumes) = agent.every_volume().await else {
                silent.insert(node.clone());
                continue;
            };
            for volume in volumes {
                match home(&volume.volume_id) {
                    Some(home) if home == *node => {
                        at_home.insert(volume.volume_id);
                    }
                    Some(_) => claims.entry(volume.volume_id).or_default().push(node.clone()),
                    None => {}
                }
            }
        }
        let known: BTreeSet<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        let mut state = self.write();
        for (id, nodes) in &state.claims {
            for node in nodes.iter().filter(|n| silent.contains(*n)) {
                claims.entry(id.clone()).or_default().push(node.clone());
            }
        }
        let mut routed = HashMap::new();
        for (id, nodes) in &claims {
            let home_holds = at_home.contains(id) || home(id).is_some_and(|h| silent.contains(&h));
            match (nodes.as_slice(), state.made.get(id)) {
                (_, Some(made)) if nodes.contains(made) => {
                    routed.insert(id.clone(), made.clone());
                }
                ([only], _)
                    if !home_holds || home(id).is_none_or(|h| !known.contains(h.as_str())) =>
                {
                    routed.insert(id.clone(), only.clone());
                }
                _ => {
                    tracing::warn!(volume = id, claimants = ?nodes, home_holds, "a volume listed under another node's ID is not routed to: its home still holds it, or more than one node lists it");
                }
            }
        }
        // A move made here and not listed yet (its node silent) stays routed.
        for (id, node) in &state.made {
            if silent.contains(node) {
                routed.entry(id.clone()).or_insert_with(|| node.clone());
            }
        }
        state.made.retain(|id, node| {
            claims.get(id).is_some_and(|n| n.contains(node)) || silent.contains(node)
        });
        state.routed = routed;
        state.claims = claims;
    }
}
