//! Volume health across nodes (CSI v1.13's ControllerListVolumeHealth): each node's agent
//! asked at once, and a node that does not answer is not allowed to hide the others.
//!
//! The controller remembers which volumes each node listed last (asked with each health
//! listing, and by ListVolumes). When a node does not answer, those of its volumes no other node reports are
//! answered as inaccessible, naming the node and why; a controller that has not heard from
//! that node since it started cannot name them, and says so in its log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qsd_csi_model::health::{Finding, Severity};
use qsd_csi_proto::{agent, convert};
use tonic::Status;

use super::ControllerService;

/// How long one node's agent may take to list its volumes' health before it is counted as
/// unreachable (its connection attempt alone is bounded by the channel).
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason given for a volume whose node did not answer.
pub const NODE_UNREACHABLE: &str = "NodeUnreachable";

/// The volumes each node listed last.
#[derive(Debug, Clone, Default)]
pub struct Seen(Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>);

impl Seen {
    /// Remembers that `node` now lists exactly `volume_ids`.
    pub fn remember<'a>(&self, node: &str, volume_ids: impl Iterator<Item = &'a str>) {
        let listed = volume_ids.map(str::to_owned).collect();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node.into(), listed);
    }

    /// What `node` listed last (nothing if it never answered).
    fn of(&self, node: &str) -> Vec<String> {
        let seen = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.get(node).map(|ids| ids.iter().cloned().collect()).unwrap_or_default()
    }
}

impl ControllerService {
    /// Every volume's health, in ID order: what the nodes that answered report (a shared
    /// pool's volume once), and the remembered volumes of those that did not, inaccessible.
    pub(super) async fn all_volume_health(&self) -> Vec<agent::VolumeHealth> {
        // Every node asked at once: a node that does not answer delays no other's answer.
        let mut asked = tokio::task::JoinSet::new();
        for (node, agent) in self.agents.nodes() {
            asked.spawn(async move {
                // The node's volumes, then those with findings: the first are what is
                // remembered for when it does not answer.
                let listed = async {
                    let volumes = agent.every_volume().await?;
                    Ok((volumes, agent.every_volume_health().await?))
                };
                let answer =
                    tokio::time::timeout(LIST_TIMEOUT, listed).await.unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "no answer within {} s",
                            LIST_TIMEOUT.as_secs()
                        )))
                    });
                (node, answer)
            });
        }
        let mut all = Vec::new();
        let mut listed = BTreeSet::new();
        let mut unreachable = Vec::new();
        while let Some(joined) = asked.join_next().await {
            let Ok((node, answer)) = joined else { continue };
            match answer {
                Ok((volumes, health)) => {
                    self.seen.remember(&node, volumes.iter().map(|v| v.volume_id.as_str()));
                    listed.extend(volumes.into_iter().map(|v| v.volume_id));
                    all.extend(health);
                }
                Err(status) => unreachable.push((node, status)),
            }
        }
        for (node, status) in unreachable {
            let remembered = self.seen.of(&node);
            tracing::warn!(
                node = %node,
                error = %status.message(),
                volumes = remembered.len(),
                "a node did not answer for its volumes' health: its remembered volumes are reported inaccessible"
            );
            let finding = Finding::new(
                Severity::Inaccessible,
                NODE_UNREACHABLE,
                format!(
                    "node {node} did not answer ({}: {}); this volume's health is unknown and it cannot be reached there",
                    status.code(),
                    status.message()
                ),
            );
            // A volume another node listed (a shared pool's) is reachable there.
            all.extend(
                remembered
                    .into_iter()
                    .filter(|id| !listed.contains(id))
                    .map(|id| convert::agent_volume_health(id, std::slice::from_ref(&finding))),
            );
        }
        all.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        // A shared pool's volume is reported by every node that sees it: once is enough.
        all.dedup_by(|a, b| a.volume_id == b.volume_id);
        all
    }
}
