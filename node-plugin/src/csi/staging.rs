//! The staging journal: one JSON record per staged volume under `<state>/staging/`, written
//! (atomically) before anything is attached and rewritten at each step (device known, mkfs
//! started, complete), so a restarted plugin knows each volume's device, can still unpublish
//! and unstage it, and undoes a stage that was killed half-way.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::Backend;
use crate::error::{Error, Result};
use crate::pool::store;

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// The volume.
    pub volume_id: String,
    /// Where it is staged.
    pub staging_path: PathBuf,
    /// Its kernel device's backend.
    pub backend: Backend,
    /// Its kernel device.
    pub device: PathBuf,
    /// The mounted filesystem; `None` for block volumes.
    pub fs_type: Option<String>,
    /// The CSI access mode it was staged with.
    pub access_mode: i32,
    /// Where it is published.
    #[serde(default)]
    pub targets: BTreeSet<PathBuf>,
    /// Staging finished. A record that is not is what a stage killed half-way left: it is
    /// undone (unmount, device, export) before the volume is staged again. Records written
    /// before this field existed were written by finished stages.
    #[serde(default = "finished")]
    pub complete: bool,
    /// This stage started mkfs on the device, which held nothing: undoing the stage wipes what
    /// a killed mkfs left on it, so the retry formats it whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub formatting: bool,
    /// The SELinux context its filesystem was mounted with (`context=`, the kubelet's
    /// SELinuxMount); every bind of it carries that label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selinux_context: Option<String>,
}

fn finished() -> bool {
    true
}

/// The journal's directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// A volume's record file name (also the freeze marker's, `csi::freeze`).
pub(super) fn file_name(volume_id: &str) -> String {
    // IDs are validated before use: no '/' can reach here.
    format!("{}.json", volume_id.replace('/', "_"))
}

impl Journal {
    /// The journal in `dir`, created if missing; the temp files of writes a killed process
    /// left are removed (here only: later, a temp file is a write in progress).
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create staging journal", &dir, e))?;
        let _ = store::read_all::<Staged>(&dir, true);
        Ok(Journal { dir })
    }

    /// The record of `id`, if it is staged.
    pub fn get(&self, id: &str) -> Result<Option<Staged>> {
        let path = self.dir.join(file_name(id));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Metadata { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Writes a record (replacing the volume's previous one).
    pub fn put(&self, record: &Staged) -> Result<()> {
        store::write_json(&self.dir, &file_name(&record.volume_id), record)
    }

    /// Forgets a volume.
    pub fn remove(&self, id: &str) -> Result<()> {
        store::remove(&self.dir, &file_name(id))
    }

    /// Every record that reads (others are skipped). Temp files are left alone: another
    /// request's write may be in progress (the metrics catalog lists the journal every 5 s,
    /// and sweeping here once removed a NodeStage's record before its rename).
    pub fn all(&self) -> Vec<Staged> {
        store::read_all::<Staged>(&self.dir, false).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_by_earlier_versions_still_read() {
        // As written before `targets` existed.
        let old = r#"{"volume_id":"vol:default@n1:a","staging_path":"/s/a","backend":"nbd",
            "device":"/dev/nbd0","fs_type":"ext4","access_mode":1}"#;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("vol:default@n1:a.json"), old).expect("write");
        let journal = Journal::open(dir.path().to_owned()).expect("journal");
        let record = journal.get("vol:default@n1:a").expect("read").expect("present");
        assert_eq!((record.backend, record.targets.len()), (Backend::Nbd, 0));
        let mut record = record;
        record.targets.insert("/t/1".into());
        journal.put(&record).expect("put");
        assert_eq!(journal.get("vol:default@n1:a").expect("read"), Some(record));
        assert_eq!(journal.all().len(), 1);
        journal.remove("vol:default@n1:a").expect("remove");
        assert_eq!(journal.get("vol:default@n1:a").expect("read"), None);
    }
}
