//! The in-memory index of a pool's records, and the one derivation of a layer's reference
//! count from it.
//!
//! Who refers to each layer is kept beside the three maps and changed by the same calls that
//! change them, so a reference count is a lookup, not a walk over every record: a pool of
//! 10,000 objects answered each count by reading 30,000 records before.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{LayerId, LayerRecord, ObjectName, SnapshotRecord, VolumeRecord};

#[derive(Debug, Default)]
pub(super) struct Index {
    layers: BTreeMap<LayerId, LayerRecord>,
    volumes: BTreeMap<ObjectName, VolumeRecord>,
    snapshots: BTreeMap<ObjectName, SnapshotRecord>,
    /// Who refers to each layer that anything refers to; derived from the maps above.
    refs: HashMap<LayerId, Refs>,
}

/// The referrers of one layer, as kept in the index.
#[derive(Debug, Default, PartialEq, Eq)]
struct Refs {
    volumes: usize,
    snapshots: usize,
    children: BTreeSet<LayerId>,
}

impl Refs {
    fn is_empty(&self) -> bool {
        self.volumes == 0 && self.snapshots == 0 && self.children.is_empty()
    }
}

impl Index {
    pub(super) fn layers(&self) -> &BTreeMap<LayerId, LayerRecord> {
        &self.layers
    }

    pub(super) fn volumes(&self) -> &BTreeMap<ObjectName, VolumeRecord> {
        &self.volumes
    }

    pub(super) fn snapshots(&self) -> &BTreeMap<ObjectName, SnapshotRecord> {
        &self.snapshots
    }

    /// Who refers to `layer`: the one derivation of a layer's reference count.
    pub(super) fn referrers(&self, layer: LayerId) -> Referrers {
        self.refs.get(&layer).map_or_else(Referrers::default, |r| Referrers {
            volumes: r.volumes,
            snapshots: r.snapshots,
            children: r.children.iter().copied().collect(),
        })
    }

    pub(super) fn refcount(&self, layer: LayerId) -> usize {
        self.refs.get(&layer).map_or(0, |r| r.volumes + r.snapshots + r.children.len())
    }

    /// Records `layer` under `id` (its own, unless a file was renamed by hand).
    pub(super) fn put_layer(&mut self, id: LayerId, layer: LayerRecord) {
        let backing = layer.backing;
        self.remove_layer(&id);
        if let Some(parent) = backing {
            self.change(parent, |r| r.children.insert(id));
        }
        self.layers.insert(id, layer);
    }

    pub(super) fn remove_layer(&mut self, id: &LayerId) -> Option<LayerRecord> {
        let old = self.layers.remove(id)?;
        if let Some(parent) = old.backing {
            self.change(parent, |r| r.children.remove(id));
        }
        Some(old)
    }

    /// Records `volume` under `name` (its own, unless a file was renamed by hand).
    pub(super) fn put_volume(&mut self, name: ObjectName, volume: VolumeRecord) {
        self.remove_volume(&name);
        self.change(volume.head, |r| r.volumes += 1);
        self.volumes.insert(name, volume);
    }

    pub(super) fn remove_volume(&mut self, name: &ObjectName) -> Option<VolumeRecord> {
        let old = self.volumes.remove(name)?;
        self.change(old.head, |r| r.volumes -= 1);
        Some(old)
    }

    /// Records `snapshot` under `name` (its own, unless a file was renamed by hand).
    pub(super) fn put_snapshot(&mut self, name: ObjectName, snapshot: SnapshotRecord) {
        self.remove_snapshot(&name);
        self.change(snapshot.layer, |r| r.snapshots += 1);
        self.snapshots.insert(name, snapshot);
    }

    pub(super) fn remove_snapshot(&mut self, name: &ObjectName) -> Option<SnapshotRecord> {
        let old = self.snapshots.remove(name)?;
        self.change(old.layer, |r| r.snapshots -= 1);
        Some(old)
    }

    /// Changes what is known of `layer`'s referrers; a layer nothing refers to has no entry.
    fn change<T>(&mut self, layer: LayerId, f: impl FnOnce(&mut Refs) -> T) {
        let refs = self.refs.entry(layer).or_default();
        f(refs);
        if refs.is_empty() {
            self.refs.remove(&layer);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The referrers walked out of the maps, record by record: what the kept ones must equal.
    fn walked(index: &Index, layer: LayerId) -> Referrers {
        Referrers {
            volumes: index.volumes.values().filter(|v| v.head == layer).count(),
            snapshots: index.snapshots.values().filter(|s| s.layer == layer).count(),
            children: index
                .layers
                .values()
                .filter(|l| l.backing == Some(layer))
                .map(|l| l.id)
                .collect(),
        }
    }

    fn layer_id(n: u64) -> LayerId {
        LayerId::parse(&format!("{n:012x}")).expect("layer id")
    }

    fn name(n: u64) -> ObjectName {
        ObjectName::parse(&format!("o{n}")).expect("name")
    }

    #[test]
    fn kept_referrers_equal_the_walked_ones_through_any_sequence_of_changes() {
        let mut index = Index::default();
        // A small linear congruential sequence: every kind of change, over few enough layers
        // and names that replacements, repeats and removals of missing entries all happen.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        for _ in 0..5_000 {
            let (a, b, op) = (layer_id(next(12)), layer_id(next(12)), next(7));
            match op {
                0 => index.put_layer(a, LayerRecord { id: a, backing: (next(3) > 0).then_some(b) }),
                1 => drop(index.remove_layer(&a)),
                2 => index.put_volume(name(next(6)), volume(next(6), a)),
                3 => drop(index.remove_volume(&name(next(6)))),
                4 => index.put_snapshot(name(next(6)), snapshot(next(6), a)),
                5 => drop(index.remove_snapshot(&name(next(6)))),
                _ => {
                    for n in 0..12 {
                        let id = layer_id(n);
                        assert_eq!(index.referrers(id), walked(&index, id), "layer {n}");
                        assert_eq!(index.refcount(id), {
                            let w = walked(&index, id);
                            w.volumes + w.snapshots + w.children.len()
                        });
                    }
                    let referred = (0..12).filter(|n| index.refcount(layer_id(*n)) > 0).count();
                    assert_eq!(index.refs.len(), referred, "no entry for a layer nothing uses");
                }
            }
        }
    }

    fn volume(n: u64, head: LayerId) -> VolumeRecord {
        serde_json::from_value(serde_json::json!({
            "name": format!("o{n}"), "uid": format!("{:012x}", n + 100), "head": head.to_string(),
            "size": 1048576, "max_chain_depth": 8,
        }))
        .expect("volume record")
    }

    fn snapshot(n: u64, layer: LayerId) -> SnapshotRecord {
        serde_json::from_value(serde_json::json!({
            "name": format!("o{n}"), "layer": layer.to_string(), "size": 1048576,
            "source_volume": "v", "created_unix": 0,
        }))
        .expect("snapshot record")
    }
}
