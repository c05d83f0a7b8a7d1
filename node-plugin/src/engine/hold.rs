//! Writes held for a group snapshot across nodes: each node's members frozen until the
//! controller has snapshotted every node's, so no write lands anywhere in between.

use super::EngineCore;
use crate::error::{Error, Result};
use crate::pool::id::ObjectId;

impl EngineCore {
    /// Holds writes to `volume_ids` (volumes of this node): the filesystems mounted on them
    /// frozen, the volumes claimed against stage and unstage, until the guard is dropped.
    /// A volume attached here without a mounted filesystem (a raw block device, an export)
    /// cannot be held: FAILED_PRECONDITION, nothing frozen. A volume attached nowhere has no
    /// writer to hold.
    pub async fn hold_writes(&self, volume_ids: &[ObjectId]) -> Result<Box<dyn Send>> {
        let quiesce = self.quiesce.get().cloned();
        for id in volume_ids {
            let (_, _, record) = self.resolve_volume(id)?;
            if self.journal.get(record.uid).is_none() {
                continue;
            }
            let held = match &quiesce {
                Some(q) => q.holds(id)?,
                None => false,
            };
            if !held {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is attached on this node without a mounted filesystem: nothing can hold its writes while other nodes take their part of a group snapshot"
                )));
            }
        }
        let Some(quiesce) = quiesce else { return Ok(Box::new(())) };
        let ids = volume_ids.to_vec();
        let frozen = tokio::task::spawn_blocking(move || quiesce.freeze(&ids));
        frozen.await.map_err(|e| Error::Inconsistent(format!("freeze task: {e}")))?
    }
}
