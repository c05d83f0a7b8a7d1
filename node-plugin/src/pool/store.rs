//! Atomic metadata files: write a temp file, fsync it, rename it over the target, fsync the
//! directory. A reader sees the old record or the new one, never a torn one.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// Writes `value` as JSON to `dir/name` atomically.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|source| Error::Metadata { path: dir.join(name), source })?;
    write_bytes(dir, name, &bytes, 0o644)
}

/// Writes `bytes` to `dir/name` atomically, the file readable as `mode` allows from its
/// creation on (a key never exists with wider permissions, not even as the temp file).
pub fn write_bytes(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = dir.join(name);
    // A temp name of this write's own: two writes of one record never share (and remove) each
    // other's temp file; the last rename wins, whole.
    let temp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| Error::io("create", &temp, e))?;
    let written = file
        .write_all(bytes)
        .map_err(|e| Error::io("write", &temp, e))
        .and_then(|()| file.sync_all().map_err(|e| Error::io("fsync", &temp, e)))
        .and_then(|()| {
            std::fs::rename(&temp, &target).map_err(|e| Error::io("rename into place", &target, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&temp); // (a full disk must not keep the space)
    }
    written?;
    sync_dir(dir)
}

/// Removes `dir/name` durably; a missing file is not an error.
pub fn remove(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &path, e)),
    }
}

/// Reads every `*.json` record in `dir`. Temp files are skipped, and removed when
/// `sweep_temp` (only the directory's single writer may: on shared storage a temp file can be
/// another node's write in progress).
pub fn read_all<T: DeserializeOwned>(dir: &Path, sweep_temp: bool) -> Result<Vec<T>> {
    let mut records = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // An interrupted write: the record it was replacing is still in place.
            if sweep_temp {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let record =
            serde_json::from_slice(&bytes).map_err(|source| Error::Metadata { path, source })?;
        records.push(record);
    }
    Ok(records)
}

/// How long after a directory's last change a record in it counts as possibly rewritten
/// unseen: a rewrite within the same timestamp tick could carry the same stamp. One second is
/// far above any tick Linux filesystems use.
const RACY: std::time::Duration = std::time::Duration::from_secs(1);

/// A record file's identity as a scan sees it. Records are replaced by renaming a new file over
/// them, so a rewrite gets a new inode or, when the filesystem reuses the inode (ext4 does,
/// promptly), new timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    fn mtime_nanos(&self) -> i128 {
        nanos(self.mtime)
    }
}

fn nanos((seconds, nanoseconds): (i64, i64)) -> i128 {
    i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds)
}

/// What one scan of a record directory found different from the scan before it, by file stem.
#[derive(Debug)]
pub struct Changes<T> {
    /// Records new or rewritten since the last scan, read now.
    pub changed: Vec<(String, T)>,
    /// Records gone since the last scan.
    pub removed: Vec<String>,
}

/// Incremental reading of a directory of records that other nodes write too (a shared pool):
/// each scan lists the directory and reads only the files whose stamp differs from the last
/// scan's, so a scan of an unchanged pool costs a `stat` per record instead of a read and a
/// parse. Files the directory changed around within [`RACY`] are read again on the next scan,
/// since a rewrite in the same timestamp tick may not change their stamp.
#[derive(Debug)]
pub struct DirScan {
    /// Stem → stamp at the last scan (`None`: read it again next time).
    known: std::collections::HashMap<String, Option<Stamp>>,
    racy: std::time::Duration,
}

impl Default for DirScan {
    fn default() -> Self {
        DirScan { known: Default::default(), racy: RACY }
    }
}

impl DirScan {
    /// Lists `dir` and reads what changed. Temp files (writes in progress) are left alone.
    pub fn scan<T: DeserializeOwned>(&mut self, dir: &Path) -> Result<Changes<T>> {
        let mut now = std::collections::HashMap::with_capacity(self.known.len());
        let mut changed = Vec::new();
        let mut ctimes = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json").filter(|_| !name.starts_with('.')) else {
                continue;
            };
            let path = entry.path();
            let stamp = match std::fs::symlink_metadata(&path) {
                Ok(meta) => Stamp::of(&meta),
                // Removed since the listing: absent from this scan.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &path, e)),
            };
            if self.known.get(stem) != Some(&Some(stamp)) {
                let bytes = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io("read", &path, e)),
                };
                let record = serde_json::from_slice(&bytes)
                    .map_err(|source| Error::Metadata { path, source })?;
                changed.push((stem.to_owned(), record));
            }
            ctimes.push((stem.to_owned(), stamp.ctime));
            now.insert(stem.to_owned(), Some(stamp));
        }
        // The directory's mtime, taken after the listing, is at least every entry's ctime; a
        // rewrite after this scan gets a later time, so only entries within a tick of it can
        // be rewritten with an equal stamp.
        let dir_meta = std::fs::metadata(dir).map_err(|e| Error::io("stat", dir, e))?;
        let settled = Stamp::of(&dir_meta).mtime_nanos() - self.racy.as_nanos() as i128;
        for (stem, ctime) in ctimes {
            if nanos(ctime) >= settled {
                now.insert(stem, None);
            }
        }
        let removed = self.known.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
        self.known = now;
        Ok(Changes { changed, removed })
    }
}

/// fsyncs a directory so that renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_replaced_atomically_reads_back_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), "a.json", &1u32).expect("write");
        write_json(dir.path(), "a.json", &2u32).expect("rewrite");
        let all: Vec<u32> = read_all(dir.path(), true).expect("read");
        assert_eq!(all, vec![2]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn concurrent_writes_of_one_record_and_a_reader_listing_it_all_succeed() {
        // Writers of one record used to share a temp name (one removed the other's before its
        // rename), and a listing swept temp files in progress: both failed writes.
        let dir = tempfile::tempdir().expect("tempdir");
        std::thread::scope(|scope| {
            for writer in 0..4u32 {
                let dir = dir.path();
                scope.spawn(move || {
                    for i in 0..100 {
                        write_json(dir, "r.json", &(writer * 1000 + i)).expect("every write lands");
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..200 {
                    let _ = read_all::<u32>(dir.path(), false);
                }
            });
        });
        let all: Vec<u32> = read_all(dir.path(), true).expect("read");
        assert_eq!(all.len(), 1, "one record, whole");
    }

    #[test]
    fn an_interrupted_write_is_ignored_and_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), "a.json", &1u32).expect("write");
        std::fs::write(dir.path().join(".a.json.tmp"), b"{truncated").expect("temp");
        let all: Vec<u32> = read_all(dir.path(), true).expect("read");
        assert_eq!(all, vec![1]);
        assert!(!dir.path().join(".a.json.tmp").exists());
    }

    fn stems<T>(changes: &Changes<T>) -> Vec<&str> {
        let mut stems: Vec<&str> = changes.changed.iter().map(|(s, _)| s.as_str()).collect();
        stems.sort();
        stems
    }

    /// Writes throwaway files until the directory's mtime has moved past `file`'s ctime, so a
    /// zero racy window treats `file` as settled (filesystems with coarse ticks need a new tick).
    fn settle(dir: &Path, file: &str) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.join(file)).expect("stat");
        let target = nanos((m.ctime(), m.ctime_nsec()));
        while nanos({
            let m = std::fs::metadata(dir).expect("stat dir");
            (m.mtime(), m.mtime_nsec())
        }) <= target
        {
            write_bytes(dir, "tick", b"", 0o644).expect("tick");
        }
    }

    #[test]
    fn a_scan_reads_only_records_written_or_rewritten_since_the_last_and_names_the_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut scan = DirScan { racy: std::time::Duration::ZERO, ..DirScan::default() };
        write_json(dir.path(), "a.json", &1u32).expect("write");
        write_json(dir.path(), "b.json", &2u32).expect("write");
        std::fs::write(dir.path().join(".c.json.tmp"), b"{").expect("a write in progress");
        settle(dir.path(), "b.json");
        let first = scan.scan::<u32>(dir.path()).expect("scan");
        assert_eq!(stems(&first), ["a", "b"]);
        assert!(first.removed.is_empty());

        let quiet = scan.scan::<u32>(dir.path()).expect("scan");
        assert!(quiet.changed.is_empty(), "nothing was rewritten: {:?}", stems(&quiet));

        // Rewritten twice: ext4 hands the first rewrite's freed inode back to the second, so
        // the inode alone would say "unchanged".
        write_json(dir.path(), "a.json", &10u32).expect("rewrite");
        write_json(dir.path(), "a.json", &11u32).expect("rewrite again");
        std::fs::remove_file(dir.path().join("b.json")).expect("remove");
        let next = scan.scan::<u32>(dir.path()).expect("scan");
        assert_eq!(next.changed, vec![("a".to_owned(), 11)]);
        assert_eq!(next.removed, vec!["b".to_owned()]);
    }

    #[test]
    fn a_record_rewritten_within_the_racy_window_is_read_again_on_every_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut scan = DirScan::default();
        write_json(dir.path(), "a.json", &1u32).expect("write");
        assert_eq!(stems(&scan.scan::<u32>(dir.path()).expect("scan")), ["a"]);
        assert_eq!(stems(&scan.scan::<u32>(dir.path()).expect("scan")), ["a"], "still racy");
    }
}
