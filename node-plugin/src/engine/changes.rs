//! Changed-block tracking from the qcow2 chain itself (CSI `SnapshotMetadata`).
//!
//! ```text
//!   target snapshot's layer T ─► … ─► base snapshot's layer B ─► … (older)
//!   depth:                  0          d = position of B in T's chain
//!
//!   allocated(T)    = every cluster some layer of T's chain holds   (qemu-img map: present)
//!   delta(B, T)     = every cluster held by a layer above B         (present, depth < d)
//! ```
//! Each layer above B holds exactly the clusters written after B was taken (a snapshot turns
//! the head read-only and writes go to a new overlay), so the delta never misses a write and
//! over-reports only by rounding each written range out to whole clusters. Chain shortening
//! keeps this: it commits a layer into a layer that no snapshot pins, or streams it into its
//! child, so data moves only between layers on the same side of every snapshot's layer. A base
//! that is not in the target's chain (another volume's, a copy clone's, a later snapshot)
//! has no answer from the chain: FAILED_PRECONDITION, never a guess.
//!
//! `qemu-img map` reads the chain with shared locks (`-U`): snapshot layers are read-only in
//! the daemon. Its JSON output is one entry per line; it is read line by line and sent in
//! batches through a bounded channel, so memory stays bounded for any volume size, and a
//! caller that hangs up kills the process.

use std::path::PathBuf;

use serde::Deserialize;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::EngineCore;
use crate::error::{Error, Result};
use crate::pool::id::{IdKind, ObjectId};
use crate::pool::{LayerId, Pool};

/// One range of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Its first byte.
    pub offset: u64,
    /// Its length.
    pub length: u64,
}

impl ByteRange {
    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The answer to a changes query: the target's size, then ranges in offset order, in batches.
#[derive(Debug)]
pub struct ChangeStream {
    /// The target snapshot's virtual size.
    pub volume_size: u64,
    /// Batches of ranges, strictly increasing and not overlapping (at least one batch, empty
    /// when nothing changed); an error ends the stream.
    pub batches: mpsc::Receiver<Result<Vec<ByteRange>>>,
}

/// Ranges per batch when the caller does not say.
pub const DEFAULT_BATCH: usize = 1024;

/// One line of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
}

/// Parses one line of the map's JSON array (`[{…},`, `{…},` or `{…}]`); `None` for lines
/// that carry no entry.
fn map_entry(line: &str) -> Result<Option<MapEntry>> {
    let entry = line.trim().trim_start_matches('[').trim_end_matches([',', ']']).trim();
    if entry.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(entry)
        .map(Some)
        .map_err(|e| Error::Inconsistent(format!("qemu-img map printed {line:?}: {e}")))
}

/// Adds `next` to the ranges being built, joining it to the last one when they touch.
fn push_joined(ranges: &mut Vec<ByteRange>, next: ByteRange) {
    match ranges.last_mut() {
        Some(last) if last.end() == next.offset => last.length += next.length,
        _ => ranges.push(next),
    }
}

/// How many bytes of the chain topped by `top` hold data.
pub(super) async fn allocated_bytes(top: PathBuf) -> Result<u64> {
    let mut batches = stream_map(top, 0, None, DEFAULT_BATCH).await?;
    let mut total = 0;
    while let Some(batch) = batches.recv().await {
        total += batch?.iter().map(|r| r.length).sum::<u64>();
    }
    Ok(total)
}

impl EngineCore {
    /// The ranges of snapshot `target` holding data (`base` = `None`), or written after
    /// `base` (an older snapshot of the same chain), from `start` on.
    pub async fn snapshot_changes(
        &self,
        base: Option<&ObjectId>,
        target: &ObjectId,
        start: u64,
        per_batch: usize,
    ) -> Result<ChangeStream> {
        let (pool, parsed) = self.resolve(IdKind::Snapshot, target)?;
        let record = pool
            .snapshot(&parsed.name)
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: target.to_string() })?;
        let chain = pool.chain(record.layer)?;
        let depth = match base {
            None => None,
            Some(base_id) => Some(self.base_depth(&pool, &chain, base_id, target)?),
        };
        if start > record.size {
            return Err(Error::OutOfRange {
                requested: start.try_into().unwrap_or(i64::MAX),
                reason: format!(
                    "starting_offset is past the snapshot's size, {} bytes",
                    record.size
                ),
            });
        }
        let batches = stream_map(pool.layer_path(record.layer), start, depth, per_batch).await?;
        Ok(ChangeStream { volume_size: record.size, batches })
    }

    /// How deep in `chain` (the target's, in `pool`) the older snapshot `base_id` sits: what
    /// changed since it is what the layers above it hold.
    fn base_depth(
        &self,
        pool: &Pool,
        chain: &[LayerId],
        base_id: &ObjectId,
        target: &ObjectId,
    ) -> Result<u32> {
        if base_id == target {
            return Err(Error::invalid(
                "base_snapshot_id",
                "is the target itself; the base must be an older snapshot",
            ));
        }
        let (base_pool, base_parsed) = self.resolve(IdKind::Snapshot, base_id)?;
        let base_record = base_pool
            .snapshot(&base_parsed.name)
            .ok_or_else(|| Error::NotFound { what: "snapshot", id: base_id.to_string() })?;
        let position = (base_pool.name() == pool.name())
            .then(|| chain.iter().position(|l| *l == base_record.layer))
            .flatten();
        Ok(position.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{base_id} is not an older snapshot in the chain of {target} (taken of \
                 another volume, of a copy, or later): the chain has no record of what \
                 changed between them; take a full backup"
            ))
        })? as u32)
    }
}

/// Streams `qemu-img map` of the image at `path` from `start`, in batches of `per_batch`
/// joined ranges: those present above `depth` (every present range without one). The reading
/// task ends, and the child with it, when the receiver is dropped.
async fn stream_map(
    path: PathBuf,
    start: u64,
    depth: Option<u32>,
    per_batch: usize,
) -> Result<mpsc::Receiver<Result<Vec<ByteRange>>>> {
    let start_at = format!("--start-offset={start}");
    let mut child = crate::command::spawn_piped(
        "qemu-img",
        &[
            "map".as_ref(),
            "-U".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
            start_at.as_ref(),
            path.as_os_str(),
        ],
    )
    .await?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, batches) = mpsc::channel(4);
    let per_batch = per_batch.max(1);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut pending: Vec<ByteRange> = Vec::new();
        let mut sent = false;
        let result: Result<()> = async {
            while let Some(line) =
                lines.next_line().await.map_err(|e| Error::io("read qemu-img map", &path, e))?
            {
                let Some(entry) = map_entry(&line)? else { continue };
                let changed = entry.present && depth.is_none_or(|d| entry.depth < d);
                if !changed || entry.length == 0 {
                    continue;
                }
                push_joined(&mut pending, ByteRange { offset: entry.start, length: entry.length });
                // The last range may still grow: send all but it.
                if pending.len() > per_batch {
                    let rest = pending.split_off(per_batch);
                    let full = std::mem::replace(&mut pending, rest);
                    if tx.send(Ok(full)).await.is_err() {
                        return Ok(()); // the caller hung up: the child is killed on drop
                    }
                    sent = true;
                }
            }
            let output = child
                .wait_with_output()
                .await
                .map_err(|e| Error::io("wait for qemu-img", &path, e))?;
            if !output.status.success() {
                return Err(Error::Command {
                    program: "qemu-img map".into(),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
            Ok(())
        }
        .await;
        match result {
            // The last ranges; or, when nothing changed, one empty batch, so that the
            // caller still learns the volume's size.
            Ok(()) if !pending.is_empty() || !sent => {
                let _ = tx.send(Ok(pending)).await;
            }
            Ok(()) => {}
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_lines_parse_whatever_their_place_in_the_array() {
        let lines = [
            r#"[{ "start": 0, "length": 131072, "depth": 1, "present": true, "zero": false, "data": true, "offset": 327680},"#,
            r#"{ "start": 131072, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false},"#,
            r#"{ "start": 196608, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false}]"#,
            "",
            "[]",
        ];
        let parsed: Vec<_> = lines.iter().map(|l| map_entry(l).expect("parses")).collect();
        let got: Vec<_> =
            parsed.iter().map(|e| e.as_ref().map(|e| (e.start, e.depth, e.present))).collect();
        assert_eq!(
            got,
            [Some((0, 1, true)), Some((131072, 0, false)), Some((196608, 0, true)), None, None]
        );
        assert!(map_entry("{ not json").is_err());
    }

    #[test]
    fn touching_ranges_join_and_gaps_stay() {
        let r = |offset, length| ByteRange { offset, length };
        let mut ranges = Vec::new();
        for next in [r(0, 10), r(10, 5), r(20, 5), r(25, 5), r(40, 1)] {
            push_joined(&mut ranges, next);
        }
        assert_eq!(ranges, [r(0, 15), r(20, 10), r(40, 1)]);
    }
}
