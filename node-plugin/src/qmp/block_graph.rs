//! The daemon's block graph as it is, parents and children: who uses each node.
//!
//! ```text
//!   export's backend ─┐      block job ─┬─ main node ─► q-src-…      (a backup's source)
//!   (anonymous)       ▼                 └─ target ────► q-tgt-…
//!                  t-<uid> ─► q-<uid>-<head> ─backing─► q-<uid>-<older>
//! ```
//! `blockdev-del` refuses a node that a job, an export or a parent node still uses, and it
//! refuses a child defined inside its parent's `blockdev-add` (only the parent is the monitor's
//! to delete). After a restart the engine needs exactly that picture to tidy what a killed
//! operation left without touching what a running volume or job still needs. QEMU exposes it as
//! `x-debug-query-block-graph` (present, with this shape, from 3.0 through 11.1); the `x-`
//! marks it as a debugging aid, so everything here tolerates unknown node types.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::commands::Command;

/// `x-debug-query-block-graph`.
#[derive(Debug, Serialize)]
pub struct QueryBlockGraph {}

impl Command for QueryBlockGraph {
    const NAME: &'static str = "x-debug-query-block-graph";
    type Reply = BlockGraph;
}

/// The kind of a vertex of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VertexKind {
    /// A block driver node (what `blockdev-add` makes).
    BlockDriver,
    /// A block backend (an export's, or a job's).
    BlockBackend,
    /// A block job.
    BlockJob,
    /// Anything a newer QEMU adds.
    #[serde(other)]
    Other,
}

/// One vertex.
#[derive(Debug, Clone, Deserialize)]
pub struct Vertex {
    /// Its number in this answer.
    pub id: u64,
    /// Node name, job id, or "" for anonymous backends.
    pub name: String,
    /// What it is.
    #[serde(rename = "type")]
    pub kind: VertexKind,
}

/// One edge: `parent` uses `child` under the role `name` (file, backing, target, …).
#[derive(Debug, Clone, Deserialize)]
pub struct Edge {
    /// The user.
    pub parent: u64,
    /// The node used.
    pub child: u64,
    /// The child's role.
    pub name: String,
}

/// The whole graph.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BlockGraph {
    /// Vertices.
    pub nodes: Vec<Vertex>,
    /// Edges.
    pub edges: Vec<Edge>,
}

impl BlockGraph {
    fn by_id(&self) -> HashMap<u64, &Vertex> {
        self.nodes.iter().map(|v| (v.id, v)).collect()
    }

    /// The named block-driver nodes.
    pub fn node_names(&self) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|v| v.kind == VertexKind::BlockDriver && !v.name.is_empty())
            .map(|v| v.name.clone())
            .collect()
    }

    /// Whether `node` has any user: a parent node, a job, or a backend (an export).
    pub fn has_users(&self, node: &str) -> bool {
        !self.users(node).is_empty()
    }

    /// What uses `node`, as (kind, name, role) of each parent.
    pub fn users(&self, node: &str) -> Vec<(VertexKind, String, String)> {
        let vertices = self.by_id();
        let Some(target) = self.nodes.iter().find(|v| v.name == node) else { return Vec::new() };
        self.edges
            .iter()
            .filter(|e| e.child == target.id)
            .filter_map(|e| {
                vertices.get(&e.parent).map(|p| (p.kind, p.name.clone(), e.name.clone()))
            })
            .collect()
    }

    /// The node under `node` in the role `role` (`backing`, `file`), if any.
    pub fn child(&self, node: &str, role: &str) -> Option<String> {
        let vertices = self.by_id();
        let parent = self.nodes.iter().find(|v| v.name == node)?;
        self.edges
            .iter()
            .find(|e| e.parent == parent.id && e.name == role)
            .and_then(|e| vertices.get(&e.child))
            .map(|v| v.name.clone())
    }

    /// Every node reachable downwards from `roots` (the roots included).
    pub fn reachable_from<'a>(&self, roots: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        let vertices = self.by_id();
        let mut children: HashMap<u64, Vec<u64>> = HashMap::new();
        for e in &self.edges {
            children.entry(e.parent).or_default().push(e.child);
        }
        let mut stack: Vec<u64> = roots
            .into_iter()
            .filter_map(|r| self.nodes.iter().find(|v| v.name == r).map(|v| v.id))
            .collect();
        let mut seen = BTreeSet::new();
        let mut names = BTreeSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            if let Some(v) = vertices.get(&id) {
                if !v.name.is_empty() {
                    names.insert(v.name.clone());
                }
            }
            stack.extend(children.get(&id).into_iter().flatten());
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2 answered with a chain `q-a-top → q-a-base`, a target `q-b-tgt` and a
    /// backup job from the chain to the target (trimmed to the vertices that matter).
    fn sample() -> BlockGraph {
        serde_json::from_value(serde_json::json!({
            "nodes": [
                {"name": "clone-b-1", "type": "block-job", "id": 1},
                {"name": "q-b-tgt", "type": "block-driver", "id": 2},
                {"name": "#block095", "type": "block-driver", "id": 3},
                {"name": "f-a-top", "type": "block-driver", "id": 4},
                {"name": "q-a-top", "type": "block-driver", "id": 5},
                {"name": "q-a-base", "type": "block-driver", "id": 6},
                {"name": "", "type": "block-backend", "id": 7},
                {"name": "t-x", "type": "block-driver", "id": 8},
                {"name": "", "type": "block-export", "id": 9}
            ],
            "edges": [
                {"name": "main node", "parent": 1, "child": 3, "perm": [], "shared-perm": []},
                {"name": "target", "parent": 1, "child": 2, "perm": [], "shared-perm": []},
                {"name": "file", "parent": 3, "child": 5, "perm": [], "shared-perm": []},
                {"name": "file", "parent": 5, "child": 4, "perm": [], "shared-perm": []},
                {"name": "backing", "parent": 5, "child": 6, "perm": [], "shared-perm": []},
                {"name": "root", "parent": 7, "child": 8, "perm": [], "shared-perm": []}
            ]
        }))
        .expect("graph")
    }

    #[test]
    fn a_node_used_by_a_job_a_parent_or_a_backend_has_users_and_a_free_one_has_none() {
        let g = sample();
        assert!(g.has_users("q-b-tgt"), "a backup's target");
        assert!(g.has_users("q-a-base"), "a backing child");
        assert!(g.has_users("t-x"), "an export's backend");
        assert!(g.has_users("q-a-top"), "under the job's filter");
        assert!(!g.has_users("#block095") || g.users("#block095")[0].0 == VertexKind::BlockJob);
        assert!(!g.has_users("no-such-node"));
        assert_eq!(
            g.users("q-b-tgt"),
            vec![(VertexKind::BlockJob, "clone-b-1".into(), "target".into())]
        );
    }

    #[test]
    fn children_and_reachability_follow_the_edges_downwards() {
        let g = sample();
        assert_eq!(g.child("q-a-top", "backing").as_deref(), Some("q-a-base"));
        assert_eq!(g.child("q-a-base", "backing"), None);
        let below = g.reachable_from(["q-a-top"]);
        assert_eq!(below, ["f-a-top", "q-a-base", "q-a-top"].map(String::from).into());
        assert!(g.node_names().contains("#block095") && !g.node_names().contains("clone-b-1"));
    }
}
