//! Relays each node's volume events (the agent's `WatchEvents`) to [`Events`], while this
//! replica leads.
//!
//! ```text
//!   leading ─► one watcher per known node ─► agent.WatchEvents ─► Notice ─► Events (PVC)
//!              (re-synced with the agent set every SYNC; a broken stream reconnects)
//!   not leading ─► no watchers
//! ```
//! Events a node reports while nobody watches are not replayed; the log of the node plugin
//! keeps them.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::agents::Agents;
use crate::events::{Events, Notice};

/// How often the watchers are matched against the known nodes.
pub const SYNC: Duration = Duration::from_secs(5);
/// Pause before re-opening a node's stream that failed or ended.
pub const RECONNECT: Duration = Duration::from_secs(2);

async fn watch_node(node: String, agents: Agents, events: Events) {
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
                            if let Some(notice) = Notice::from_volume_event(&event) {
                                if let Err(e) = events.publish(&event.labels, &notice).await {
                                    tracing::warn!(error = %e, node, reason = notice.reason, "posting an event failed");
                                }
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

/// Runs for the life of the controller: watches every node's events while `leading` is true.
pub async fn run(agents: Agents, events: Events, mut leading: watch::Receiver<bool>) {
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
                    tokio::spawn(watch_node(node, agents.clone(), events.clone()))
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
