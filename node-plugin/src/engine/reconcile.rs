//! Bringing the daemon's graph in line with the journals after any (re)connect — including a
//! start after this process was killed in the middle of anything.
//!
//! ```text
//!   1 block jobs      every job a killed operation left is cancelled and dismissed
//!   2 operations      each intent completed or undone (engine::ops), graph read after 1
//!   3 attachments     intact ones adopted (export present, throttle over the recorded head),
//!                     others rebuilt; one volume failing is reported, never fatal
//!   4 sweep           exports, then nodes, then throttle groups of ours that nothing needs:
//!                     a node is deleted only when nothing uses it (no job, export or parent),
//!                     parents before children, re-reading the graph after each round
//! ```
//! Only an unreachable daemon fails a reconcile. Anything else that could not be tidied is kept
//! in [`Unreconciled`]: the volumes concerned report it as a health finding, and the supervisor
//! reconciles again after a delay until nothing is left.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use super::journal::AttachmentRecord;
use super::{EngineCore, EngineEvent};
use crate::error::Result;
use crate::graph::{self, ExportKind, Names};
use crate::pool::LayerId;
use crate::qmp::block_graph::BlockGraph;
use crate::qsd::Origin;

/// How many rounds of deletion a sweep makes at most (one per level of nesting it meets).
const SWEEP_ROUNDS: usize = 32;

/// What the last reconcile could not tidy: by volume uid where one is concerned, else by what.
#[derive(Debug, Default)]
pub struct Unreconciled {
    by_volume: Mutex<BTreeMap<LayerId, String>>,
    other: Mutex<Vec<String>>,
}

impl Unreconciled {
    fn replace(&self, by_volume: BTreeMap<LayerId, String>, other: Vec<String>) {
        *self.by_volume.lock().unwrap_or_else(|p| p.into_inner()) = by_volume;
        *self.other.lock().unwrap_or_else(|p| p.into_inner()) = other;
    }

    /// Why a volume is not reconciled, if it is not.
    pub fn volume(&self, uid: LayerId) -> Option<String> {
        self.by_volume.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).cloned()
    }

    /// Whether anything is left to retry.
    pub fn is_empty(&self) -> bool {
        self.by_volume.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            && self.other.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// The node names a sweep may delete: what the engine adds with `blockdev-add` at the top of
/// a definition (qcow2 heads and chains, throttle filters, image-creation file nodes). File
/// nodes (`f-`) are children, freed with their parents.
fn sweepable(name: &str) -> bool {
    ["q-", "t-", "c-"].iter().any(|p| name.starts_with(p))
}

/// The tag inside one of our names (`q-<tag>-…`, `x-<tag>`, `g-<tag>`).
fn tag_of(name: &str) -> Option<&str> {
    name.get(2..14)
}

impl EngineCore {
    /// See the module documentation. Fails only when the daemon cannot be asked.
    pub(super) async fn reconcile(&self, origin: Origin) -> Result<()> {
        let _graph = self.graph.reconcile().await;
        let qmp = self.daemon.qmp();
        let mut other = Vec::new();
        let mut by_volume = BTreeMap::new();
        for (job, e) in crate::qmp::settle_jobs(&qmp).await? {
            other.push(format!("block job {job}: {}", e.with_causes()));
        }
        let before = graph::block_graph(&qmp).await?;
        for (what, e) in self.recover_operations(&before, origin).await {
            other.push(format!("operation {what}: {}", e.with_causes()));
        }
        let now = graph::block_graph(&qmp).await?;
        let thresholds: HashMap<String, u64> = graph::named_nodes(&qmp)
            .await?
            .into_iter()
            .map(|n| (n.node_name, n.write_threshold))
            .collect();
        let exports = graph::export_ids(&qmp).await?;
        let mut attached = HashSet::new();
        let mut rebuilt = 0;
        for attachment in self.journal.all() {
            attached.insert(attachment.uid.to_string());
            match self.reconcile_attachment(&attachment, &now, &exports, &thresholds).await {
                Ok(true) => rebuilt += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(volume = %attachment.volume_id, error = %e.with_causes(), "reconciling an attached volume failed; will retry");
                    by_volume.insert(attachment.uid, e.with_causes());
                }
            }
        }
        other.extend(self.sweep(&attached).await);
        if let Err(e) = self.drop_stale_owner_records() {
            other.push(format!("owner records: {}", e.with_causes()));
        }
        for problem in &other {
            tracing::error!(problem, "reconcile left something untidied; will retry");
        }
        self.unreconciled.replace(by_volume, other);
        tracing::info!(?origin, rebuilt, "reconciled with qemu-storage-daemon");
        let _ = self.events.send(EngineEvent::Reconciled { origin, rebuilt });
        Ok(())
    }

    /// Adopts an intact attachment (checking for a threshold that fired while we were away) or
    /// rebuilds it. Returns whether it was rebuilt.
    async fn reconcile_attachment(
        &self,
        attachment: &AttachmentRecord,
        graph: &BlockGraph,
        exports: &HashSet<String>,
        thresholds: &HashMap<String, u64>,
    ) -> Result<bool> {
        let pool = self.pool(&attachment.pool)?;
        let Some(record) = pool.volume(&attachment.name) else {
            tracing::warn!(volume = %attachment.volume_id, "journaled volume has no record; forgetting it");
            self.journal.remove(attachment.uid)?;
            return Ok(false);
        };
        let names = Names::new(record.uid.to_string());
        let chain = pool.chain(record.head)?;
        let intact = exports.contains(&names.export())
            && graph.child(&names.throttle(), "file") == Some(names.format(record.head));
        let qmp = self.daemon.qmp();
        if intact {
            if let Some(armed) = attachment.threshold {
                let now = thresholds.get(&names.file(record.head)).copied().unwrap_or(0);
                if now == 0 {
                    self.threshold_crossed(record.uid, armed.armed_at, 0, true).await?;
                }
            }
            return Ok(false);
        }
        tracing::info!(volume = %attachment.volume_id, "rebuilding the graph of an attached volume");
        graph::detach(&qmp, &names, &chain).await?;
        if attachment.endpoint.kind == ExportKind::Nbd {
            graph::ensure_nbd_server(&qmp, &attachment.endpoint.path).await?;
        }
        let cache = record.format.l2_cache_size;
        graph::attach(&qmp, &pool, &names, &chain, record.qos, cache, &attachment.endpoint).await?;
        if attachment.endpoint.kind == ExportKind::Fuse {
            self.daemon.guard_fuse_reads();
        }
        if let Some(armed) = attachment.threshold {
            graph::arm_write_threshold(&qmp, &names, record.head, armed.armed_at).await?;
        }
        Ok(true)
    }

    /// Removes owner records in shared pools that name this node for a volume it does not have
    /// attached (left by a crash between a detach and its record's removal), so requests for
    /// those volumes go to the default node again.
    fn drop_stale_owner_records(&self) -> Result<()> {
        let node = &self.config.node;
        for pool in self.pools.values() {
            pool.refresh()?;
            for name in pool.owned_by(node)? {
                let attached =
                    pool.volume(&name).is_some_and(|record| self.journal.get(record.uid).is_some());
                if !attached {
                    tracing::info!(
                        pool = pool.name().as_str(),
                        volume = %name,
                        "removing a stale owner record"
                    );
                    pool.clear_owner(&name, node)?;
                }
            }
        }
        Ok(())
    }

    /// Removes exports, nodes and throttle groups named by us that no attached volume needs:
    /// what operations interrupted by a restart left. Returns what it could not remove.
    async fn sweep(&self, attached: &HashSet<String>) -> Vec<String> {
        let qmp = self.daemon.qmp();
        let mut left = Vec::new();
        let unattached = |name: &str| tag_of(name).is_some_and(|t| !attached.contains(t));
        match graph::export_ids(&qmp).await {
            Ok(exports) => {
                for export in exports.iter().filter(|e| e.starts_with("x-") && unattached(e)) {
                    if let Err(e) = graph::delete_export(&qmp, export, true).await {
                        left.push(format!("export {export}: {}", e.with_causes()));
                    }
                }
            }
            Err(e) => left.push(format!("listing exports: {}", e.with_causes())),
        }
        let roots: Vec<String> =
            attached.iter().map(|uid| Names::new(uid.clone()).throttle()).collect();
        let mut failed = HashSet::new();
        for _ in 0..SWEEP_ROUNDS {
            let g = match graph::block_graph(&qmp).await {
                Ok(g) => g,
                Err(e) => {
                    left.push(format!("reading the block graph: {}", e.with_causes()));
                    break;
                }
            };
            let kept = g.reachable_from(roots.iter().map(String::as_str));
            let doomed: Vec<String> = g
                .node_names()
                .into_iter()
                .filter(|n| sweepable(n) && !kept.contains(n) && !failed.contains(n))
                .filter(|n| !g.has_users(n))
                .collect();
            if doomed.is_empty() {
                let stuck: Vec<String> = g
                    .node_names()
                    .into_iter()
                    .filter(|n| sweepable(n) && !kept.contains(n) && g.has_users(n))
                    .filter(|n| !g.users(n).iter().all(|(_, parent, _)| sweepable(parent)))
                    .collect();
                for node in stuck {
                    left.push(format!("node {node} is still used by {:?}", g.users(&node)));
                }
                break;
            }
            for node in doomed {
                tracing::info!(node, "removing a node no attached volume needs");
                if let Err(e) = graph::delete_node_if_owned(&qmp, &node).await {
                    left.push(format!("node {node}: {}", e.with_causes()));
                    failed.insert(node);
                }
            }
        }
        if let Err(e) =
            graph::delete_throttle_groups(&qmp, |name| name.starts_with("g-") && unattached(name))
                .await
        {
            left.push(format!("throttle groups: {}", e.with_causes()));
        }
        left
    }
}
