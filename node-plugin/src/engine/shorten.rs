//! Chain shortening: removing one layer that nothing but its single child needs, keeping every
//! visible byte.
//!
//! ```text
//!   head C ─► X ─► B ─► …        X goes:  block-commit X into B  when B is needed by X alone
//!                                          (an intermediate commit, always with top-node)
//!                                          block-stream into C    otherwise
//! ```
//! Streaming into the active layer is refused while a FUSE export holds the RESIZE permission,
//! so that case waits. [`plan`] decides, purely, from who refers to each layer; the engine runs
//! what it decides through `graph`.

use super::EngineCore;
use crate::error::{Error, Result};
use crate::graph::{self, ExportKind, Names};
use crate::pool::{LayerId, ObjectName, Pool, Referrers};

/// How a layer leaves its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Into its backing layer (`block-commit`).
    Commit,
    /// Into its child (`block-stream`).
    Stream,
}

/// One shortening step: the layer at `index` of the chain (head = 0) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Position of the layer that goes (never the head).
    pub index: usize,
    /// How.
    pub merge: Merge,
}

/// The layer to remove from a chain (head first) whose layers have `refs`, if one can go:
/// the nearest to the head that no snapshot or other volume needs, with every layer above it
/// opened by this chain alone. Committing is preferred (the base absorbs it); streaming into
/// the head is not possible when `fuse_head` (the head is exported over FUSE).
pub fn plan(chain: &[LayerId], refs: &[Referrers], fuse_head: bool) -> Option<Step> {
    debug_assert_eq!(chain.len(), refs.len());
    // Only this chain opens the layers above X (one child each; the head none).
    let exclusive_above = |i: usize| {
        (0..i).all(|j| {
            if j == 0 {
                refs[0].children.is_empty()
            } else {
                refs[j].children == [chain[j - 1]]
            }
        })
    };
    for i in 1..chain.len() {
        let x = &refs[i];
        if x.snapshots > 0 || x.volumes > 0 || x.children != [chain[i - 1]] || !exclusive_above(i) {
            continue;
        }
        let base_free = chain.get(i + 1).is_some_and(|_| {
            let b = &refs[i + 1];
            b.snapshots == 0 && b.volumes == 0 && b.children == [chain[i]]
        });
        if base_free {
            return Some(Step { index: i, merge: Merge::Commit });
        }
        if !(i == 1 && fuse_head) {
            return Some(Step { index: i, merge: Merge::Stream });
        }
    }
    None
}

impl EngineCore {
    /// Removes one layer from a volume's chain if one can go; returns false if none can.
    /// Callers hold the volume's guard and the graph read lock.
    pub(super) async fn shorten_once(&self, pool: &Pool, volume: &ObjectName) -> Result<bool> {
        let Some(record) = pool.volume(volume) else {
            return Ok(false);
        };
        let chain = pool.chain(record.head)?;
        let attachment = self.journal.get(record.uid);
        let refs: Vec<_> = chain.iter().map(|l| pool.referrers(*l)).collect();
        let fuse_head = attachment.as_ref().is_some_and(|a| a.endpoint.kind == ExportKind::Fuse);
        let Some(Step { index: i, merge }) = plan(&chain, &refs, fuse_head) else {
            return Ok(false);
        };
        let (child, layer, base) = (chain[i - 1], chain[i], chain.get(i + 1).copied());
        let qmp = self.daemon.qmp();
        let _intent = self.operations.begin(super::ops::Operation::Shorten {
            pool: pool.name().clone(),
            child,
            layer,
            base,
        })?;
        let (names, root, temporary) = match &attachment {
            Some(_) => {
                let names = Names::new(record.uid.to_string());
                let root = names.throttle();
                (names, root, false)
            }
            None => {
                let names = Names::new(graph::fresh_tag());
                let root = graph::open_chain(&qmp, pool, &names, &chain, false).await?;
                (names, root, true)
            }
        };
        let merged = match (merge, base) {
            (Merge::Commit, Some(base)) => graph::commit(&qmp, &names, root, layer, base).await,
            (Merge::Commit, None) => Err(Error::Inconsistent("commit without a base".into())),
            (Merge::Stream, base) => graph::stream(&qmp, &names, child, base).await,
        };
        if merged.is_ok() {
            // An old head stays monitor-owned after leaving the chain.
            graph::delete_node_if_owned(&qmp, &names.format(layer)).await?;
        }
        if temporary {
            let remaining: Vec<_> =
                chain.iter().copied().filter(|l| merged.is_err() || *l != layer).collect();
            graph::close_chain(&qmp, &names, &remaining).await?;
        }
        merged?;
        crate::fault_point!("shorten:after-merge");
        pool.set_backing(child, base)?;
        pool.release(layer)?;
        tracing::info!(volume = %volume, layer = %layer, how = ?merge, "shortened chain");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `n` fresh layers, head first.
    fn chain(n: usize) -> Vec<LayerId> {
        (0..n).map(|_| LayerId::random()).collect()
    }

    /// Referrers of a lone chain: the head is a volume's, each other layer has its one child.
    fn lone(chain: &[LayerId]) -> Vec<Referrers> {
        (0..chain.len())
            .map(|i| Referrers {
                volumes: usize::from(i == 0),
                snapshots: 0,
                children: if i == 0 { vec![] } else { vec![chain[i - 1]] },
            })
            .collect()
    }

    #[test]
    fn shortening_plans() {
        let step = |index, merge| Some(Step { index, merge });
        let other = LayerId::random();
        // (what, chain length, change to the lone chain's referrers, FUSE head, expected plan)
        type Edit = fn(&mut [Referrers], LayerId);
        let cases: [(&str, usize, Edit, bool, Option<Step>); 10] = [
            ("a lone head has nothing to remove", 1, |_, _| {}, false, None),
            (
                "head over a base layer: stream the base into the head",
                2,
                |_, _| {},
                false,
                step(1, Merge::Stream),
            ),
            ("…but not into a FUSE-exported head", 2, |_, _| {}, true, None),
            (
                "three layers: commit the middle into the free base",
                3,
                |_, _| {},
                false,
                step(1, Merge::Commit),
            ),
            (
                "…also under a FUSE head (commit needs no permission on the head)",
                3,
                |_, _| {},
                true,
                step(1, Merge::Commit),
            ),
            (
                "a snapshot pins the middle: the base streams into it",
                3,
                |r, _| r[1].snapshots = 1,
                false,
                step(2, Merge::Stream),
            ),
            (
                "a snapshot pins the base: the middle streams into the head",
                3,
                |r, _| r[2].snapshots = 1,
                false,
                step(1, Merge::Stream),
            ),
            ("…which a FUSE head refuses", 3, |r, _| r[2].snapshots = 1, true, None),
            (
                "another volume shares the middle: nothing below it is ours alone",
                3,
                |r, o| r[1].children.push(o),
                false,
                None,
            ),
            (
                "every layer pinned: nothing can go",
                3,
                |r, _| r.iter_mut().skip(1).for_each(|x| x.snapshots = 1),
                false,
                None,
            ),
        ];
        for (what, n, edit, fuse_head, expected) in cases {
            let c = chain(n);
            let mut refs = lone(&c);
            edit(&mut refs, other);
            assert_eq!(plan(&c, &refs, fuse_head), expected, "{what}");
        }
    }

    #[test]
    fn a_base_shared_with_a_linked_clone_is_streamed_over_not_committed_into() {
        let c = chain(4);
        let mut refs = lone(&c);
        refs[2].children.push(LayerId::random()); // a clone overlays layer 2 as well
        assert_eq!(plan(&c, &refs, false), Some(Step { index: 1, merge: Merge::Stream }));
    }
}
