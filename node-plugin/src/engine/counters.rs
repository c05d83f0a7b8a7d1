//! What the engine counts for its metrics.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::pool::id::ObjectId;

/// What the engine counts for its metrics, since it started.
#[derive(Debug, Default)]
pub struct EngineCounters {
    crossings: Mutex<HashMap<ObjectId, u64>>,
}

impl EngineCounters {
    pub(super) fn crossed(&self, volume: &ObjectId) {
        let mut crossings = self.crossings.lock().unwrap_or_else(|p| p.into_inner());
        *crossings.entry(volume.clone()).or_default() += 1;
    }

    /// Write threshold crossings, by volume ID.
    pub fn crossings(&self) -> HashMap<ObjectId, u64> {
        self.crossings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
