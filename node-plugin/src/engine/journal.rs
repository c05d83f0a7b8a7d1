//! The journal of attached volumes: what the daemon's graph must contain.
//!
//! One JSON file per attached volume under `<state>/attachments/`, written atomically before the
//! graph is built and removed after it is torn down. After a daemon restart (or our own), the
//! graph is rebuilt from these records and the pool records they name.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::graph::ExportEndpoint;
use crate::pool::id::ObjectId;
use crate::pool::{store, LayerId, ObjectName, PoolName};

/// An armed write threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThresholdRecord {
    /// Host offset (bytes) of the head's file at which the daemon fires.
    pub armed_at: u64,
    /// How far above the highest written offset to re-arm after it fires.
    pub step: u64,
    /// Armed at this percentage of the volume's size (`None`: at a number of bytes), and so
    /// re-armed at the same percentage of the new size when the volume grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u64>,
}

impl ThresholdRecord {
    /// Armed at `percent` of `size`, re-armed in steps of [`STEP_PERCENT`] of it (at least
    /// 1 MiB).
    pub fn at_percent(size: u64, percent: u64) -> Self {
        let part = |p: u64| (u128::from(size) * u128::from(p) / 100) as u64;
        ThresholdRecord {
            armed_at: part(percent),
            step: part(STEP_PERCENT).max(1 << 20),
            percent: Some(percent),
        }
    }
}

/// After an alert, the threshold is re-armed this percentage of the size above the highest
/// write, so a volume that keeps filling alerts again.
pub const STEP_PERCENT: u64 = 5;

/// One attached volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// The volume's ID.
    pub volume_id: ObjectId,
    /// Its pool.
    pub pool: PoolName,
    /// Its name in the pool.
    pub name: ObjectName,
    /// Its uid (names the nodes).
    pub uid: LayerId,
    /// How it is exported.
    pub endpoint: ExportEndpoint,
    /// The write threshold, if armed.
    pub threshold: Option<ThresholdRecord>,
}

/// The attachment journal.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    entries: Mutex<BTreeMap<LayerId, AttachmentRecord>>,
}

impl Journal {
    /// Loads the journal from `dir`.
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io("create journal", &dir, e))?;
        let entries = store::read_all::<AttachmentRecord>(&dir, true)?
            .into_iter()
            .map(|r| (r.uid, r))
            .collect();
        Ok(Journal { dir, entries: Mutex::new(entries) })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<LayerId, AttachmentRecord>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of an attached volume.
    pub fn get(&self, uid: LayerId) -> Option<AttachmentRecord> {
        self.entries().get(&uid).cloned()
    }

    /// Every attached volume.
    pub fn all(&self) -> Vec<AttachmentRecord> {
        self.entries().values().cloned().collect()
    }

    /// Writes (or replaces) a record.
    pub fn put(&self, record: AttachmentRecord) -> Result<()> {
        store::write_json(&self.dir, &format!("{}.json", record.uid), &record)?;
        self.entries().insert(record.uid, record);
        Ok(())
    }

    /// Removes a record.
    pub fn remove(&self, uid: LayerId) -> Result<()> {
        store::remove(&self.dir, &format!("{uid}.json"))?;
        self.entries().remove(&uid);
        Ok(())
    }
}
