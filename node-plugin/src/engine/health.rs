//! Volume and pool health as the engine sees it (CSI v1.13's health RPCs).
//!
//! ```text
//!   chain files on disk ─► LayerMissing / ChainBroken          (DATA_LOSS)
//!   attached here: QMP ──► DaemonUnreachable / ExportGone      (INACCESSIBLE)
//!   last reconcile ──────► NotReconciled                       (INACCESSIBLE)
//!   pool statvfs ────────► PoolFull / PoolNearlyFull           (DEGRADED)
//! ```
//! qemu-storage-daemon sends no `BLOCK_IO_ERROR` for I/O failing under a block export (the
//! event belongs to guest devices; verified on QEMU 7.2: a FUSE export hitting ENOSPC emits
//! nothing, and its anonymous backend has no `query-blockstats` entry). So a full pool — the
//! cause of ENOSPC — is reported from the pool's filesystem instead. What only the node's
//! kernel shows (the device, the ublk server) the Node service adds.

use std::collections::HashSet;

use qsd_csi_model::health::{normalize, pool_space, Finding, Severity};

use super::EngineCore;
use crate::error::Result;
use crate::graph::{self, Names};
use crate::pool::id::ObjectId;
use crate::pool::{Pool, VolumeRecord};

/// How long a health query waits for the daemon before calling it unreachable.
pub const DAEMON_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl EngineCore {
    /// What is wrong with a volume; empty when nothing is known to be.
    pub async fn volume_health(&self, id: &ObjectId) -> Result<Vec<Finding>> {
        let (pool, _, record) = self.resolve_volume(id)?;
        let exports = self.exports_if_needed(std::slice::from_ref(&record)).await;
        let space = pool_space_of(&pool).ok().flatten();
        Ok(self.findings(&pool, &record, exports.as_ref(), space.as_ref()))
    }

    /// Every volume of this node's pools with a finding, by ID.
    pub async fn list_volume_health(&self) -> Result<Vec<(ObjectId, Vec<Finding>)>> {
        let mut all = Vec::new();
        for pool in self.pools()? {
            let volumes = pool.volumes();
            let exports = self.exports_if_needed(&volumes).await;
            let space = pool_space_of(&pool).ok().flatten();
            for record in &volumes {
                let findings = self.findings(&pool, record, exports.as_ref(), space.as_ref());
                if !findings.is_empty() {
                    all.push((self.volume_id(&pool, record)?, findings));
                }
            }
        }
        Ok(all)
    }

    /// What is wrong with the node's storage: each pool's filesystem, and the daemon. Each
    /// finding names its pool (empty: the daemon, which serves them all).
    pub async fn storage_health(&self) -> Vec<(String, Finding)> {
        let mut all = Vec::new();
        let answers = tokio::time::timeout(DAEMON_WAIT, self.daemon_answers()).await;
        if !answers.unwrap_or(false) {
            let f = Finding::new(
                Severity::Inaccessible,
                "DaemonUnreachable",
                "qemu-storage-daemon does not answer on its monitor; the engine is restarting it",
            );
            all.push((String::new(), f));
        }
        for (name, pool) in &self.pools {
            let found = pool_space_of(pool).unwrap_or_else(|e| {
                Some(Finding::new(Severity::Inaccessible, "PoolUnreachable", e.to_string()))
            });
            all.extend(found.map(|f| (name.as_str().to_owned(), f)));
        }
        all
    }

    /// The daemon's export IDs when one of `volumes` is attached here (`None`: the daemon
    /// does not answer); an empty set when none is, without asking.
    async fn exports_if_needed(&self, volumes: &[VolumeRecord]) -> Option<HashSet<String>> {
        if !volumes.iter().any(|v| self.journal.get(v.uid).is_some()) {
            return Some(HashSet::new());
        }
        let qmp = self.daemon.qmp();
        tokio::time::timeout(DAEMON_WAIT, graph::export_ids(&qmp)).await.ok()?.ok()
    }

    fn findings(
        &self,
        pool: &Pool,
        record: &VolumeRecord,
        exports: Option<&HashSet<String>>,
        space: Option<&Finding>,
    ) -> Vec<Finding> {
        let mut found = Vec::new();
        match pool.chain(record.head) {
            Ok(chain) => {
                let missing: Vec<_> =
                    chain.iter().filter(|l| !pool.layer_path(**l).is_file()).collect();
                if !missing.is_empty() {
                    found.push(Finding::new(
                        Severity::DataLoss,
                        "LayerMissing",
                        format!(
                            "{} of the {} layers of its chain are gone from pool {} (first: {})",
                            missing.len(),
                            chain.len(),
                            pool.name().as_str(),
                            Pool::layer_file_name(*missing[0])
                        ),
                    ));
                }
            }
            Err(e) => found.push(Finding::new(Severity::DataLoss, "ChainBroken", e.to_string())),
        }
        if self.journal.get(record.uid).is_some() {
            let export = Names::new(record.uid.to_string()).export();
            match exports {
                None => found.push(Finding::new(
                    Severity::Inaccessible,
                    "DaemonUnreachable",
                    "qemu-storage-daemon does not answer; the volume's export cannot be checked",
                )),
                Some(ids) if !ids.contains(&export) => found.push(Finding::new(
                    Severity::Inaccessible,
                    "ExportGone",
                    format!("the daemon no longer exports the volume ({export})"),
                )),
                Some(_) => {}
            }
        }
        if let Some(why) = self.unreconciled.volume(record.uid) {
            found.push(Finding::new(
                Severity::Inaccessible,
                "NotReconciled",
                format!("the volume's graph could not be rebuilt after a restart (retried): {why}"),
            ));
        }
        found.extend(space.cloned());
        normalize(found)
    }
}

/// Free bytes (for unprivileged writers) in a pool's filesystem, if it answers.
pub(super) fn pool_free(pool: &Pool) -> Option<u64> {
    crate::mount::usage(pool.root()).ok().map(|u| u.bytes_available)
}

/// What a pool's filesystem says now: full, nearly full, or nothing; an error when it cannot
/// be read.
fn pool_space_of(pool: &Pool) -> Result<Option<Finding>> {
    let u = crate::mount::usage(pool.root())?;
    Ok(pool_space(pool.name().as_str(), u.bytes_available, u.bytes_total))
}
