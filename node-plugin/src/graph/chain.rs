//! Commands that change a volume's chain or watch it: snapshot overlays (one `transaction`),
//! `block-commit` and `block-stream` for chain shortening, `blockdev-backup` for clones,
//! `block_resize`, and write thresholds. The engine decides what to do; these functions are
//! the only code that spells the QMP commands for it.

use std::collections::HashSet;

use super::{call, delete_node_if_owned, layer_options, with_l2_cache, Names};
use crate::error::Result;
use crate::pool::{LayerId, Pool};
use crate::qmp::commands::{
    BlockCommit, BlockNodeInfo, BlockResize, BlockSetWriteThreshold, BlockStream, BlockdevAdd,
    BlockdevBackup, BlockdevSnapshot, ManualJob, ObjectDel, QomList, QueryBlockExports,
    QueryNamedBlockNodes, Transaction, TransactionAction,
};
use crate::qmp::{Job, JobOptions, QmpClient};

/// One attached volume moving onto a new, empty overlay.
#[derive(Debug)]
pub struct OverlaySwitch<'a> {
    /// The volume's pool.
    pub pool: &'a Pool,
    /// The volume's attached names.
    pub names: Names,
    /// Its head now.
    pub head: LayerId,
    /// The overlay (already created as an image) that becomes its head.
    pub overlay: LayerId,
    /// The new head's L2 cache (the volume's `l2CacheSize`).
    pub l2_cache_size: Option<u64>,
}

async fn remove_nodes(qmp: &QmpClient, nodes: &[String]) {
    for node in nodes {
        let _ = delete_node_if_owned(qmp, node).await;
    }
}

/// Opens each overlay beside its volume's graph, runs `before_switch` (the caller records the
/// new heads, so a crash after the switch rebuilds on the overlay receiving writes), then
/// switches every volume at one instant with one `transaction` of `blockdev-snapshot`s. On
/// failure the overlay nodes are gone again and the volumes still write to their old heads.
pub async fn switch_to_overlays(
    qmp: &QmpClient,
    switches: &[OverlaySwitch<'_>],
    before_switch: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut added = Vec::new();
    let mut actions = Vec::new();
    for s in switches {
        let overlay =
            with_l2_cache(layer_options(s.pool, &s.names, s.overlay, false, None), s.l2_cache_size);
        if let Err(e) = call(qmp, &BlockdevAdd(overlay)).await {
            remove_nodes(qmp, &added).await;
            return Err(e);
        }
        added.push(s.names.format(s.overlay));
        actions.push(TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
            node: s.names.format(s.head),
            overlay: s.names.format(s.overlay),
        }));
    }
    let switched = match before_switch() {
        Ok(()) if actions.is_empty() => Ok(()),
        Ok(()) => call(qmp, &Transaction { actions }).await.map(drop),
        Err(e) => Err(e),
    };
    if switched.is_err() {
        remove_nodes(qmp, &added).await;
    }
    switched
}

/// `block-commit` of `layer` into its backing `base`, under the chain whose root node is
/// `root` (an intermediate commit: `top-node` is always given). Waits for the job.
pub async fn commit(
    qmp: &QmpClient,
    names: &Names,
    root: String,
    layer: LayerId,
    base: LayerId,
) -> Result<()> {
    let id = names.job("commit");
    let command = BlockCommit {
        job_id: id.clone(),
        device: root,
        top_node: names.format(layer),
        base_node: names.format(base),
        backing_file: Some(Pool::layer_file_name(base)),
        manual: ManualJob::MANUAL,
    };
    Job::run(qmp, id, "commit", &command, JobOptions { manual_finalize: true }).await
}

/// `block-stream` of everything above `base` into `child` (the layer over the one that goes).
/// Waits for the job.
pub async fn stream(
    qmp: &QmpClient,
    names: &Names,
    child: LayerId,
    base: Option<LayerId>,
) -> Result<()> {
    let id = names.job("stream");
    let command = BlockStream {
        job_id: id.clone(),
        device: names.format(child),
        base_node: base.map(|b| names.format(b)),
        backing_file: base.map(Pool::layer_file_name),
        manual: ManualJob::MANUAL,
    };
    Job::run(qmp, id, "stream", &command, JobOptions { manual_finalize: true }).await
}

/// Starts a full `blockdev-backup` from `source` to `target` (node names) as a job named
/// under `names`, at most `speed` bytes/s. The copy is of the source as it was at the start.
pub async fn start_backup(
    qmp: &QmpClient,
    names: &Names,
    source: String,
    target: String,
    speed: Option<u64>,
) -> Result<Job> {
    let id = names.job("clone");
    let backup = BlockdevBackup {
        job_id: id.clone(),
        device: source,
        target,
        sync: "full",
        speed,
        manual: ManualJob::MANUAL,
    };
    Job::start(qmp, id, "backup", &backup, JobOptions { manual_finalize: true }).await
}

/// `block_resize` of one node.
pub async fn resize_node(qmp: &QmpClient, node: String, size: u64) -> Result<()> {
    call(qmp, &BlockResize { node_name: node, size }).await.map(drop)
}

/// Arms (or, with 0, disarms) the write threshold on the file node of an attached volume's
/// head: allocation in the host file is what fills a pool.
pub async fn arm_write_threshold(
    qmp: &QmpClient,
    names: &Names,
    head: LayerId,
    bytes: u64,
) -> Result<()> {
    let arm = BlockSetWriteThreshold { node_name: names.file(head), write_threshold: bytes };
    call(qmp, &arm).await.map(drop)
}

/// Every named node of the daemon, with its write threshold.
pub async fn named_nodes(qmp: &QmpClient) -> Result<Vec<BlockNodeInfo>> {
    call(qmp, &QueryNamedBlockNodes { flat: true }).await
}

/// The daemon's block graph: every node and who uses it.
pub async fn block_graph(qmp: &QmpClient) -> Result<crate::qmp::block_graph::BlockGraph> {
    call(qmp, &crate::qmp::block_graph::QueryBlockGraph {}).await
}

/// The IDs of the daemon's block exports.
pub async fn export_ids(qmp: &QmpClient) -> Result<HashSet<String>> {
    Ok(call(qmp, &QueryBlockExports {}).await?.into_iter().map(|e| e.id).collect())
}

/// Deletes the throttle groups whose ID `doomed` picks.
pub async fn delete_throttle_groups(qmp: &QmpClient, doomed: impl Fn(&str) -> bool) -> Result<()> {
    // The /objects container appears with the first object; absent means there are none.
    let objects = match call(qmp, &QomList { path: "/objects".into() }).await {
        Ok(objects) => objects,
        Err(e) if e.qmp_desc_contains("not found") => Vec::new(),
        Err(e) => return Err(e),
    };
    for object in objects.iter().filter(|o| o.kind.contains("throttle-group") && doomed(&o.name)) {
        call(qmp, &ObjectDel { id: object.name.clone() }).await?;
    }
    Ok(())
}
