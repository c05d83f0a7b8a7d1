//! The volume operations' decisions, apart from their effects (validate → plan → apply): each
//! function takes what its operation has read — the record, the request, the pool's free space
//! — and says what the operation will do, or why it will not, before anything changes. Pure,
//! so each is a table test below; the effects stay in `volume.rs`, `clone.rs` and `copy.rs`.

use crate::error::{Error, Result};
use crate::pool::{RecordedSource, VolumeRecord};
use qsd_csi_model::volume::Preallocation;

/// Whether an existing volume of `size` bytes satisfies a repeated CreateVolume asking for
/// at least `required` and at most `limit` bytes (CSI: "compatible with the capacity_range"):
/// a volume grown since it was created still answers the request that made it.
pub fn capacity_satisfies(existing: u64, required: u64, limit: Option<i64>) -> bool {
    existing >= required && limit.is_none_or(|l| existing <= l.max(0) as u64)
}

/// A CreateVolume naming a volume that exists: it answers the request when its size and its
/// source match; otherwise ALREADY_EXISTS, saying every difference.
pub fn recreate(
    existing: &VolumeRecord,
    size: u64,
    limit: Option<i64>,
    source: &Option<RecordedSource>,
) -> Result<()> {
    let mut differences = Vec::new();
    if !capacity_satisfies(existing.size, size, limit) {
        let limit = limit.map_or("no limit".to_owned(), |l| format!("at most {l}"));
        differences.push(format!("size {} (requested at least {size}, {limit})", existing.size));
    }
    if *source != existing.source {
        differences.push(format!("source {:?} (requested {source:?})", existing.source));
    }
    if differences.is_empty() {
        return Ok(());
    }
    Err(Error::AlreadyExists {
        what: "volume",
        name: existing.name.to_string(),
        difference: differences.join(", "),
    })
}

/// Whether a new head of `size` bytes can be made in pool `pool` now. A thin one always can
/// (thin volumes may overcommit; `free` is not even read); a preallocated one must fit in
/// the pool's `free` bytes, or the create is RESOURCE_EXHAUSTED before any file is made.
pub fn room_for(
    pool: &str,
    preallocation: Preallocation,
    size: u64,
    free: impl FnOnce() -> Result<u64>,
) -> Result<()> {
    if !matches!(preallocation, Preallocation::Falloc | Preallocation::Full) {
        return Ok(());
    }
    let free = free()?;
    if size > free {
        return Err(Error::ResourceExhausted(format!(
            "pool {pool} has {free} bytes free; a preallocated volume of {size} bytes does not fit"
        )));
    }
    Ok(())
}

/// What growing a volume comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// It has that size already: nothing changes.
    None,
    /// Resize the running export (the volume is attached here): its device sees the new size.
    Online,
    /// Resize the head image on disk.
    Offline,
}

/// Growing a volume of `current` bytes to `size` (`requested` as the caller asked it, for the
/// error), `attached` here or not. Volumes never shrink: OUT_OF_RANGE.
pub fn growth(current: u64, size: u64, requested: i64, attached: bool) -> Result<Growth> {
    if size < current {
        return Err(Error::OutOfRange {
            requested,
            reason: format!("volumes cannot shrink (now {current} bytes)"),
        });
    }
    Ok(match (size == current, attached) {
        (true, _) => Growth::None,
        (false, true) => Growth::Online,
        (false, false) => Growth::Offline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind as Kind;
    use crate::pool::LayerId;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_repeated_create_is_satisfied_by_any_size_between_required_and_limit() {
        let table = [
            ("same size", 64 * MIB, 64 * MIB, None, true),
            ("grown since, no limit", 96 * MIB, 64 * MIB, None, true),
            ("grown within the limit", 96 * MIB, 64 * MIB, Some(128 * MIB as i64), true),
            ("grown past the limit", 160 * MIB, 64 * MIB, Some(128 * MIB as i64), false),
            ("smaller than required", 32 * MIB, 64 * MIB, None, false),
        ];
        for (what, existing, required, limit, expected) in table {
            assert_eq!(capacity_satisfies(existing, required, limit), expected, "{what}");
        }
    }

    fn record(size: u64, source: Option<RecordedSource>) -> VolumeRecord {
        let head = LayerId::random();
        VolumeRecord {
            name: "data".parse().expect("name"),
            uid: head,
            size,
            head,
            preallocation: Preallocation::Off,
            qos: Default::default(),
            max_chain_depth: 8,
            source,
            labels: Default::default(),
            format: Default::default(),
            auto_expand: None,
            home: None,
        }
    }

    #[test]
    fn a_create_of_an_existing_name_answers_or_names_every_difference() {
        let snap = || Some(RecordedSource::Snapshot("s1".parse().expect("name")));
        let other = || Some(RecordedSource::Volume("v2".parse().expect("name")));
        // (what, existing size, its source, requested size, limit, requested source,
        //  None: answered | the differences named)
        type Source = Option<RecordedSource>;
        type Row = (&'static str, u64, Source, u64, Option<i64>);
        type Named = Option<&'static [&'static str]>;
        let table: [(Row, Source, Named); 5] = [
            (("the same request", 64 * MIB, snap(), 64 * MIB, None), snap(), None),
            (("grown within the limit", 96 * MIB, None, 64 * MIB, Some(128 << 20)), None, None),
            (
                ("grown past the limit", 160 * MIB, None, 64 * MIB, Some(128 << 20)),
                None,
                Some(&["size"]),
            ),
            (("another source", 64 * MIB, snap(), 64 * MIB, None), other(), Some(&["source"])),
            (("both", 32 * MIB, None, 64 * MIB, None), snap(), Some(&["size", "source"])),
        ];
        for ((what, size, source, requested, limit), requested_source, expected) in table {
            let got = recreate(&record(size, source), requested, limit, &requested_source);
            match (got, expected) {
                (Ok(()), None) => {}
                (Err(e), Some(named)) => {
                    assert_eq!(e.kind(), Kind::AlreadyExists, "{what}");
                    let message = e.to_string();
                    for part in ["size", "source"] {
                        let said = message.contains(&format!("{part} "));
                        assert_eq!(said, named.contains(&part), "{what}: {message}");
                    }
                }
                (got, expected) => panic!("{what}: {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn only_a_preallocated_head_needs_room_and_reads_the_free_space() {
        let unread = || -> Result<u64> { panic!("a thin head read the pool's free space") };
        assert!(room_for("p", Preallocation::Off, 1 << 40, unread).is_ok());
        assert!(room_for("p", Preallocation::Metadata, 1 << 40, unread).is_ok());
        // (preallocation, size, free, expected error kind)
        let table = [
            (Preallocation::Falloc, 64 * MIB, Ok(64 * MIB), None),
            (Preallocation::Full, 64 * MIB, Ok(64 * MIB - 1), Some(Kind::ResourceExhausted)),
            (Preallocation::Falloc, 64 * MIB, Ok(0), Some(Kind::ResourceExhausted)),
            (
                Preallocation::Full,
                1,
                Err(Error::FailedPrecondition("unreadable".into())),
                Some(Kind::FailedPrecondition),
            ),
        ];
        for (preallocation, size, free, expected) in table {
            let got = room_for("p", preallocation, size, || free);
            assert_eq!(got.err().map(|e| e.kind()), expected, "{preallocation:?} {size}");
        }
    }

    #[test]
    fn a_volume_grows_online_when_attached_offline_otherwise_and_never_shrinks() {
        // (current, size, attached, expected)
        let table = [
            (64 * MIB, 64 * MIB, true, Ok(Growth::None)),
            (64 * MIB, 64 * MIB, false, Ok(Growth::None)),
            (64 * MIB, 128 * MIB, true, Ok(Growth::Online)),
            (64 * MIB, 128 * MIB, false, Ok(Growth::Offline)),
            (128 * MIB, 64 * MIB, true, Err(Kind::OutOfRange)),
            (128 * MIB, 64 * MIB, false, Err(Kind::OutOfRange)),
        ];
        for (current, size, attached, expected) in table {
            let got = growth(current, size, size as i64, attached).map_err(|e| e.kind());
            assert_eq!(got, expected, "{current} → {size}, attached {attached}");
        }
    }
}
