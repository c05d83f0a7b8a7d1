//! The in-memory index of a pool's records, and the one derivation of a layer's reference
//! count from it.

use std::collections::BTreeMap;

use super::{LayerId, LayerRecord, ObjectName, SnapshotRecord, VolumeRecord};

#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) layers: BTreeMap<LayerId, LayerRecord>,
    pub(super) volumes: BTreeMap<ObjectName, VolumeRecord>,
    pub(super) snapshots: BTreeMap<ObjectName, SnapshotRecord>,
}

impl Index {
    /// Who refers to `layer`: the one derivation of a layer's reference count.
    pub(super) fn referrers(&self, layer: LayerId) -> Referrers {
        Referrers {
            volumes: self.volumes.values().filter(|v| v.head == layer).count(),
            snapshots: self.snapshots.values().filter(|s| s.layer == layer).count(),
            children: self
                .layers
                .values()
                .filter(|l| l.backing == Some(layer))
                .map(|l| l.id)
                .collect(),
        }
    }

    pub(super) fn refcount(&self, layer: LayerId) -> usize {
        let r = self.referrers(layer);
        r.volumes + r.snapshots + r.children.len()
    }
}

/// Who refers to a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Referrers {
    /// Volumes whose head it is.
    pub volumes: usize,
    /// Snapshots that pin it.
    pub snapshots: usize,
    /// Layers backed by it.
    pub children: Vec<LayerId>,
}
