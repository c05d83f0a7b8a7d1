//! What the engine counts for its metrics.

use std::collections::HashMap;
use std::sync::Mutex;

/// What the engine counts for its metrics, since it started.
#[derive(Debug, Default)]
pub struct EngineCounters {
    crossings: Mutex<HashMap<String, u64>>,
}

impl EngineCounters {
    pub(super) fn crossed(&self, volume: &str) {
        let mut crossings = self.crossings.lock().unwrap_or_else(|p| p.into_inner());
        *crossings.entry(volume.to_owned()).or_default() += 1;
    }

    /// Write threshold crossings, by volume ID.
    pub fn crossings(&self) -> HashMap<String, u64> {
        self.crossings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
