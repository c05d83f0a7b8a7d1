//! Property tests of the records on disk: a record file with any bytes in it (a valid record
//! with bytes changed, cut short, or noise) is read or refused with an error naming the file,
//! never a panic, and a pool holding it does not open on a guess.

use proptest::prelude::*;
use qsd_node::pool::store;
use qsd_node::pool::{LayerRecord, Pool, PoolKind, PoolName, SnapshotRecord, VolumeRecord};

const VOLUME: &str = r#"{"name":"v","uid":"0123456789abcdef0123456789abcdef","size":16777216,
"head":"0123456789abcdef0123456789abcdef","max_chain_depth":8,"labels":{"a":"b"}}"#;
const SNAPSHOT: &str = r#"{"name":"s","source_volume":"v","layer":"0123456789abcdef0123456789abcdef",
"size":16777216,"created_unix":1}"#;
const LAYER: &str = r#"{"id":"0123456789abcdef0123456789abcdef","backing":null}"#;

/// A valid record with bytes replaced, removed or inserted, or cut short; or noise.
fn damaged(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6);
    prop_oneof![
        (edits, any::<prop::sample::Index>()).prop_map(move |(edits, cut)| {
            let mut bytes = valid.as_bytes().to_vec();
            for (at, byte, how) in edits {
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => drop(bytes.remove(i)),
                    _ => bytes.insert(i, byte),
                }
            }
            let keep = cut.index(bytes.len() + 1);
            bytes.truncate(keep.max(bytes.len() / 2));
            bytes
        }),
        prop::collection::vec(any::<u8>(), 0..200),
    ]
}

fn refused_naming_the_file(dir: &std::path::Path, e: qsd_node::Error) -> Result<(), TestCaseError> {
    let text = e.with_causes();
    prop_assert!(text.contains(&dir.display().to_string()), "{text}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_record_with_any_bytes_is_read_or_refused_naming_its_file(
        volume in damaged(VOLUME), snapshot in damaged(SNAPSHOT), layer in damaged(LAYER),
    ) {
        let dir = tempfile::tempdir().expect("dir");
        for (sub, bytes) in [("volumes", &volume), ("snapshots", &snapshot), ("layers", &layer)] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
            std::fs::write(dir.path().join(sub).join("x.json"), bytes).expect("write");
        }
        let read = [
            store::read_all::<VolumeRecord>(&dir.path().join("volumes"), false).map(drop),
            store::read_all::<SnapshotRecord>(&dir.path().join("snapshots"), false).map(drop),
            store::read_all::<LayerRecord>(&dir.path().join("layers"), false).map(drop),
        ];
        let mut any_refused = false;
        for answer in read {
            if let Err(e) = answer {
                any_refused = true;
                refused_naming_the_file(dir.path(), e)?;
            }
        }
        let pool = Pool::open(dir.path(), PoolName::parse("p").expect("name"), PoolKind::Local);
        if any_refused {
            let e = pool.expect_err("a pool with an unreadable record does not open");
            refused_naming_the_file(dir.path(), e)?;
        }
    }
}
