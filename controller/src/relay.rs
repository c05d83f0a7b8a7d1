//! Relays each node's volume events (the agent's `WatchEvents`) to [`Events`], while this
//! replica leads.
//!
//! ```text
//!   leading ─► one watcher per known node ─► agent.WatchEvents ─► Notice ─► Events (PVC)
//!              (re-synced with the agent set every SYNC;    └─► AutoGrow (auto-expanding
//!               a broken stream reconnects)                      volumes' crossings)
//!   not leading ─► no watchers
//! ```
//! Events a node reports while nobody watches are not replayed; the log of the node plugin
//! keeps them. A clone reports its progress every 10 s; the claim hears of the first report and
//! then of each further tenth copied, not of every report.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use qsd_csi_proto::agent::{self, volume_event::Kind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::agents::Agents;
use crate::events::{Events, Notice};
use crate::grow::AutoGrow;

/// How often the watchers are matched against the known nodes.
pub const SYNC: Duration = Duration::from_secs(5);
/// Pause before re-opening a node's stream that failed or ended.
pub const RECONNECT: Duration = Duration::from_secs(2);

/// Whether an event is worth an Event on the claim; `tenths` remembers how far each running
/// clone was last reported.
fn worth_posting(tenths: &mut HashMap<String, u64>, event: &agent::VolumeEvent) -> bool {
    match &event.kind {
        Some(Kind::CloneProgress(p)) => {
            let tenth = p.done_bytes.saturating_mul(10) / p.total_bytes.max(1);
            let last = tenths.insert(event.volume_id.clone(), tenth);
            last.is_none_or(|last| tenth > last)
        }
        Some(Kind::CloneFinished(_)) => {
            tenths.remove(&event.volume_id);
            true
        }
        _ => true,
    }
}

async fn watch_node(node: String, agents: Agents, events: Events, grow: Option<AutoGrow>) {
    let mut tenths = HashMap::new();
    loop {
        let Ok(agent) = agents.node(&node) else {
            return;
        };
        match agent.watch_events().await {
            Ok(mut stream) => {
                tracing::info!(node, "watching the node's volume events");
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(event) => {
                            if !worth_posting(&mut tenths, &event) {
                                continue;
                            }
                            if let Some(notice) = Notice::from_volume_event(&event) {
                                events.report(&event.labels, &notice).await;
                            }
                            if let Some(grow) = &grow {
                                grow.on_event(&event);
                            }
                        }
                        Err(status) => {
                            tracing::debug!(node, %status, "a node's event stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(node, %status, "watching a node's events failed"),
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Runs for the life of the controller: watches every node's events while `leading` is true,
/// and hands auto-expanding volumes' crossings to `grow`.
pub async fn run(
    agents: Agents,
    events: Events,
    grow: Option<AutoGrow>,
    mut leading: watch::Receiver<bool>,
) {
    let mut watchers: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    let mut sync = tokio::time::interval(SYNC);
    loop {
        let lead = *leading.borrow_and_update();
        if lead {
            let nodes: Vec<String> = agents.nodes().into_iter().map(|(n, _)| n).collect();
            watchers.retain(|node, task| {
                let keep = nodes.contains(node) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for node in nodes {
                watchers.entry(node.clone()).or_insert_with(|| {
                    tokio::spawn(watch_node(node, agents.clone(), events.clone(), grow.clone()))
                });
            }
        } else {
            for (_, task) in std::mem::take(&mut watchers) {
                task.abort();
            }
        }
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { break },
            _ = sync.tick() => {}
        }
    }
    for (_, task) in watchers {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(volume: &str, done: u64) -> agent::VolumeEvent {
        agent::VolumeEvent {
            volume_id: volume.into(),
            labels: Default::default(),
            kind: Some(Kind::CloneProgress(agent::CloneProgress {
                source_volume_id: "src".into(),
                done_bytes: done,
                total_bytes: 100,
            })),
        }
    }

    #[test]
    fn a_clone_is_reported_first_then_at_each_further_tenth_then_when_it_ends() {
        let mut tenths = HashMap::new();
        let posted: Vec<bool> = [3, 8, 12, 19, 20, 55, 56]
            .into_iter()
            .map(|done| worth_posting(&mut tenths, &progress("a", done)))
            .collect();
        assert_eq!(posted, [true, false, true, false, true, true, false]);
        assert!(worth_posting(&mut tenths, &progress("b", 1)), "another clone is reported apart");
        let finished = agent::VolumeEvent {
            kind: Some(Kind::CloneFinished(Default::default())),
            ..progress("a", 0)
        };
        assert!(worth_posting(&mut tenths, &finished));
        assert!(worth_posting(&mut tenths, &progress("a", 3)), "a new clone of the same name");
    }
}
