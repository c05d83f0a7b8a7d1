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
    let temp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| Error::io("create", &temp, e))?;
    file.write_all(bytes).map_err(|e| Error::io("write", &temp, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    drop(file);
    std::fs::rename(&temp, &target).map_err(|e| Error::io("rename into place", &target, e))?;
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
    fn an_interrupted_write_is_ignored_and_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_json(dir.path(), "a.json", &1u32).expect("write");
        std::fs::write(dir.path().join(".a.json.tmp"), b"{truncated").expect("temp");
        let all: Vec<u32> = read_all(dir.path(), true).expect("read");
        assert_eq!(all, vec![1]);
        assert!(!dir.path().join(".a.json.tmp").exists());
    }
}
