//! `qsd-csi pool check [--repair]`: a pool's records checked against its images and chains,
//! offline (reading the directory, never through an engine).
//!
//! ```text
//!   records (volumes/, snapshots/, layers/*.json) ──┐
//!                                                   ├─► references: every head, snapshot and
//!   images (layers/*.qcow2) ────────────────────────┘   backing names a layer with a record,
//!        │                                              no chain loops, every record has its
//!        └─► qemu-img info / check (with images)        image; and the reverse: images no
//!            format, backing = the record's, damage     record names, layers nothing uses
//! ```
//!
//! What a repair may do is only what loses nothing: remove an image no record names, a layer
//! (record, then image) that no volume, snapshot or layer uses, and a record write's leftover
//! temp file. It never touches a volume's or snapshot's data, a record it cannot read, a
//! dangling reference, a loop, or a damaged image (not even leaked clusters: `qemu-img check -r`
//! rewrites metadata): those are reported for a person to decide. In a shared pool, where other
//! nodes create images and records, only what has sat unchanged for an hour counts as left
//! over (as at open, [`super::Pool::open`]); in a local pool, a minute.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{LayerId, LayerRecord, Pool, PoolKind, SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};

/// What the check found wrong with a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Finding {
    /// A record that cannot be read or parsed, or whose content names another object than its
    /// file name does. Never repaired.
    BadRecord {
        /// The record's file.
        path: PathBuf,
        /// Why it is bad.
        error: String,
    },
    /// A layer record whose image is gone: every volume and snapshot on it lost data.
    MissingImage {
        /// The layer.
        layer: LayerId,
    },
    /// A volume, snapshot or layer that refers to a layer with no record.
    Dangling {
        /// Who refers (`volume NAME`, `snapshot NAME`, `layer ID`).
        from: String,
        /// The layer it names.
        layer: LayerId,
    },
    /// A chain that leads back to itself.
    Loop {
        /// A layer on the loop.
        layer: LayerId,
    },
    /// An image `qemu-img` finds damaged, that is not a qcow2 image, or whose backing file is
    /// not the one its record says.
    Damaged {
        /// The layer.
        layer: LayerId,
        /// What is wrong.
        detail: String,
    },
    /// An image that no record names. Repairable.
    OrphanImage {
        /// Its file name in `layers/`.
        file: String,
    },
    /// A layer, record and image, that no volume, snapshot or layer uses. Repairable.
    Unreferenced {
        /// The layer.
        layer: LayerId,
    },
    /// A record write's temp file, left by an interrupted write. Repairable.
    LeftoverTemp {
        /// The file.
        path: PathBuf,
    },
}

impl Finding {
    /// Whether `--repair` removes it.
    pub fn repairable(&self) -> bool {
        matches!(
            self,
            Finding::OrphanImage { .. }
                | Finding::Unreferenced { .. }
                | Finding::LeftoverTemp { .. }
        )
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::BadRecord { path, error } => {
                write!(f, "unreadable record {}: {error}", path.display())
            }
            Finding::MissingImage { layer } => {
                write!(f, "layer {layer} has a record but no image: its data is lost")
            }
            Finding::Dangling { from, layer } => {
                write!(f, "{from} refers to layer {layer}, which has no record")
            }
            Finding::Loop { layer } => write!(f, "the chain through layer {layer} loops"),
            Finding::Damaged { layer, detail } => write!(f, "layer {layer}'s image: {detail}"),
            Finding::OrphanImage { file } => write!(f, "image {file} has no record"),
            Finding::Unreferenced { layer } => write!(f, "layer {layer} is used by nothing"),
            Finding::LeftoverTemp { path } => {
                write!(f, "{} is an interrupted record write", path.display())
            }
        }
    }
}

/// How deep a check goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Records, references and which images exist (what a start-up can afford).
    Records,
    /// And every image opened with `qemu-img` (format, backing, damage).
    Images,
}

/// What a check saw.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Volumes, snapshots and layers read.
    pub volumes: usize,
    /// Snapshot records read.
    pub snapshots: usize,
    /// Layer records read.
    pub layers: usize,
    /// Clusters `qemu-img check` counts as leaked (allocated, used by nothing: space, not
    /// damage), over all images.
    pub leaked_clusters: u64,
    /// What is wrong.
    pub findings: Vec<Finding>,
}

/// How long something must have sat unchanged to count as left over, by pool kind.
fn grace(kind: PoolKind) -> Duration {
    match kind {
        PoolKind::Local => Duration::from_secs(60),
        PoolKind::Shared => super::SHARED_LEFTOVER_AGE,
    }
}

fn settled(path: &Path, kind: PoolKind) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= grace(kind)))
}

/// The names in `dir`, sorted; none when it does not exist (a pool not yet made).
fn sorted_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    Ok(names)
}

/// The records of one directory that parse and match their file name; the others as findings.
fn read_records<T: DeserializeOwned>(
    dir: &Path,
    kind: PoolKind,
    key: impl Fn(&T) -> String,
    findings: &mut Vec<Finding>,
) -> Result<Vec<T>> {
    let mut records = Vec::new();
    for name in sorted_names(dir)? {
        let path = dir.join(&name);
        if name.starts_with('.') && name.ends_with(".tmp") {
            if settled(&path, kind) {
                findings.push(Finding::LeftoverTemp { path });
            }
            continue;
        }
        let Some(stem) = name.strip_suffix(".json") else { continue };
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string()))
            .and_then(|record| match key(&record) {
                k if k == stem => Ok(record),
                k => Err(format!("it describes {k:?}, not {stem:?}")),
            });
        match parsed {
            Ok(record) => records.push(record),
            Err(error) => findings.push(Finding::BadRecord { path, error }),
        }
    }
    Ok(records)
}

/// Checks the pool at `root` (of kind `kind`) to `depth`.
pub async fn check(root: &Path, kind: PoolKind, depth: Depth) -> Result<Report> {
    let mut findings = Vec::new();
    let layers_dir = root.join("layers");
    let layers: BTreeMap<LayerId, LayerRecord> =
        read_records(&layers_dir, kind, |l: &LayerRecord| l.id.to_string(), &mut findings)?
            .into_iter()
            .map(|l| (l.id, l))
            .collect();
    let volumes = read_records(
        &root.join("volumes"),
        kind,
        |v: &VolumeRecord| v.name.to_string(),
        &mut findings,
    )?;
    let snapshots = read_records(
        &root.join("snapshots"),
        kind,
        |s: &SnapshotRecord| s.name.to_string(),
        &mut findings,
    )?;
    let mut used = BTreeSet::new();
    let mut refer = |from: String, layer: LayerId, findings: &mut Vec<Finding>| {
        used.insert(layer);
        if !layers.contains_key(&layer) {
            findings.push(Finding::Dangling { from, layer });
        }
    };
    for v in &volumes {
        refer(format!("volume {}", v.name), v.head, &mut findings);
    }
    for s in &snapshots {
        refer(format!("snapshot {}", s.name), s.layer, &mut findings);
    }
    for l in layers.values() {
        if let Some(backing) = l.backing {
            refer(format!("layer {}", l.id), backing, &mut findings);
        }
    }
    findings.extend(loops(&layers));
    let mut report = Report {
        volumes: volumes.len(),
        snapshots: snapshots.len(),
        layers: layers.len(),
        ..Report::default()
    };
    for (id, record) in &layers {
        let image = layers_dir.join(Pool::layer_file_name(*id));
        if !image.exists() {
            findings.push(Finding::MissingImage { layer: *id });
            continue;
        }
        let record_file = layers_dir.join(format!("{id}.json"));
        if !used.contains(id) && settled(&record_file, kind) {
            findings.push(Finding::Unreferenced { layer: *id });
        }
        if depth == Depth::Images {
            match inspect(&image, record).await {
                Ok(leaked) => report.leaked_clusters += leaked,
                Err(detail) => findings.push(Finding::Damaged { layer: *id, detail }),
            }
        }
    }
    findings.extend(orphan_images(&layers_dir, kind, &layers)?);
    report.findings = findings;
    Ok(report)
}

/// Images in `layers/` that no layer record names (settled ones only).
fn orphan_images(
    dir: &Path,
    kind: PoolKind,
    layers: &BTreeMap<LayerId, LayerRecord>,
) -> Result<Vec<Finding>> {
    let mut found = Vec::new();
    for name in sorted_names(dir)? {
        let Some(stem) = name.strip_suffix(".qcow2") else { continue };
        let known = LayerId::parse(stem).is_ok_and(|id| layers.contains_key(&id));
        if !known && settled(&dir.join(&name), kind) {
            found.push(Finding::OrphanImage { file: name });
        }
    }
    Ok(found)
}

/// Every chain that loops, once per loop.
fn loops(layers: &BTreeMap<LayerId, LayerRecord>) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut cleared: BTreeSet<LayerId> = BTreeSet::new();
    for start in layers.keys() {
        let mut path = Vec::new();
        let mut at = Some(*start);
        while let Some(id) = at {
            if cleared.contains(&id) {
                break;
            }
            if path.contains(&id) {
                if !found
                    .iter()
                    .any(|f| matches!(f, Finding::Loop { layer } if path.contains(layer)))
                {
                    found.push(Finding::Loop { layer: id });
                }
                break;
            }
            path.push(id);
            at = layers.get(&id).and_then(|l| l.backing);
        }
        cleared.extend(path);
    }
    found
}

/// Opens an image with `qemu-img`: it must be qcow2 with the record's backing file, and
/// `qemu-img check` must find no corruption. Returns its leaked clusters.
async fn inspect(image: &Path, record: &LayerRecord) -> std::result::Result<u64, String> {
    let path = image.as_os_str();
    let args = [OsStr::new("info"), OsStr::new("-U"), OsStr::new("--output=json"), path];
    let info = crate::command::run("qemu-img", &args).await.map_err(|e| e.with_causes())?;
    let info: serde_json::Value =
        serde_json::from_str(&info).map_err(|e| format!("qemu-img info: {e}"))?;
    if info["format"] != "qcow2" {
        return Err(format!("it is {}, not qcow2", info["format"]));
    }
    let backing = info["backing-filename"].as_str().map(str::to_owned);
    let expected = record.backing.map(Pool::layer_file_name);
    if backing != expected {
        return Err(format!(
            "its backing file is {}, its record says {}",
            backing.as_deref().unwrap_or("none"),
            expected.as_deref().unwrap_or("none")
        ));
    }
    // The image alone, its backing chain not opened: a chain that loops would hang
    // `qemu-img check` (seen on 7.2), and each backing layer is checked on its own.
    let alone = serde_json::json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": image},
        "backing": null,
    });
    // qemu-img check exits 2 on corruption and 3 on leaks alone, with its JSON on stdout
    // either way: read the JSON, not the status.
    let args = ["check".to_owned(), "-U".into(), "--output=json".into(), format!("json:{alone}")];
    let checked =
        crate::command::run_for_status("qemu-img", &args).await.map_err(|e| e.with_causes())?;
    let report: serde_json::Value = serde_json::from_slice(&checked.stdout).map_err(|_| {
        format!("qemu-img check: {}", String::from_utf8_lossy(&checked.stderr).trim())
    })?;
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    match (count("corruptions"), count("check-errors")) {
        (0, 0) => Ok(count("leaks")),
        (corruptions, errors) => Err(format!(
            "qemu-img check: {corruptions} corruptions, {errors} errors while checking"
        )),
    }
}

/// What a repair removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repaired {
    /// The findings acted on.
    pub removed: Vec<Finding>,
}

/// Removes what `report` found repairable (see the module documentation), then, as removing a
/// layer can leave its backing layer unused, checks again and repeats until nothing
/// repairable is left. Refused while any process holds a file of the pool open: a running
/// driver's daemon does, and it may be between writing an image and its record.
pub async fn repair(root: &Path, kind: PoolKind, depth: Depth) -> Result<(Repaired, Report)> {
    if let Some(pid) = holder(&root.join("layers")) {
        return Err(Error::FailedPrecondition(format!(
            "process {pid} has images of {} open: stop the driver (and its qemu-storage-daemon) before repairing",
            root.display()
        )));
    }
    let mut repaired = Repaired::default();
    loop {
        // What is repairable is read from the records and listings alone: the images are
        // opened once, for the report after the last removal.
        let report = check(root, kind, Depth::Records).await?;
        let fixable: Vec<Finding> =
            report.findings.iter().filter(|f| f.repairable()).cloned().collect();
        if fixable.is_empty() {
            let report = match depth {
                Depth::Records => report,
                Depth::Images => check(root, kind, depth).await?,
            };
            return Ok((repaired, report));
        }
        for finding in fixable {
            remove(root, &finding)?;
            tracing::warn!(pool = %root.display(), %finding, "repaired: removed");
            repaired.removed.push(finding);
        }
    }
}

fn remove(root: &Path, finding: &Finding) -> Result<()> {
    let layers = root.join("layers");
    match finding {
        Finding::LeftoverTemp { path } => match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => super::store::remove(dir, &name.to_string_lossy()),
            _ => Ok(()),
        },
        Finding::OrphanImage { file } => super::store::remove(&layers, file),
        Finding::Unreferenced { layer } => {
            // The record first: a crash in between leaves an image with no record, which the
            // next check (or open) removes.
            super::store::remove(&layers, &format!("{layer}.json"))?;
            super::store::remove(&layers, &Pool::layer_file_name(*layer))
        }
        _ => Ok(()),
    }
}

/// A process that has a file under `dir` open, if any (read from `/proc`).
fn holder(dir: &Path) -> Option<u32> {
    let dir = std::fs::canonicalize(dir).ok()?;
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&dir)) {
                return Some(pid);
            }
        }
    }
    None
}
