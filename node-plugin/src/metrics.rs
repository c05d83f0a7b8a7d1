//! The node's Prometheus metrics: per volume, per pool and per daemon.
//!
//! ```text
//!   every REFRESH: pools' index + attachment journal + staging journal ─► Catalog (cached)
//!   scrape: Catalog ─► per volume: stat(head) (allocation), /sys/block/<dev>/stat (I/O)
//!                      per pool:   statvfs(root)
//!                      daemon:     connection up, restarts, QMP latency histogram
//! ```
//! A scrape reads the cached catalog and a few files per volume: it never waits on QMP or on
//! a lock a volume operation holds, and costs O(volumes). The catalog is rebuilt in the
//! background, so a volume appears (or goes) in the metrics within [`REFRESH`].
//!
//! Per-volume I/O comes from the kernel device (QSD's `query-blockstats` has no per-export
//! accounting); a volume staged nowhere on this node has no I/O series.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::csi::staging;
use crate::device::Backend;
use crate::engine::{EngineCore, PoolFacts, VolumeFacts};
use crate::graph::ExportKind;

/// How often the catalog of volumes and pools is rebuilt.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Labels of every per-volume family.
pub const VOLUME_LABELS: [&str; 4] = ["volume", "pool", "namespace", "claim"];

/// A volume as the catalog knows it.
#[derive(Debug, Clone)]
struct Volume {
    facts: VolumeFacts,
    /// The claim's namespace and name, where known.
    claim: (String, String),
    /// `loop`, `nbd`, `ublk`, or the export kind when attached but not staged here.
    backend: Option<&'static str>,
    /// The kernel device's name under /sys/block.
    device: Option<String>,
}

#[derive(Debug, Default)]
struct Catalog {
    volumes: Vec<Volume>,
    pools: Vec<PoolFacts>,
}

/// The node's collector: register it in the mode's registry and keep it refreshed with
/// [`NodeMetrics::keep_refreshed`].
#[derive(Debug)]
pub struct NodeMetrics {
    engine: Arc<EngineCore>,
    staging: staging::Journal,
    catalog: RwLock<Arc<Catalog>>,
    /// The families' descriptions (what `desc()` returns); values are made at each scrape.
    template: Families,
}

impl NodeMetrics {
    /// The metrics of `engine`'s volumes, with the Node service's staging journal (under the
    /// engine's state directory) naming their kernel devices. The catalog is built once now.
    pub fn new(engine: Arc<EngineCore>) -> crate::error::Result<Arc<Self>> {
        let staging = staging::Journal::open(engine.config().state_dir.join("staging"))?;
        let metrics = Arc::new(NodeMetrics {
            engine,
            staging,
            catalog: RwLock::default(),
            template: Families::new(),
        });
        metrics.refresh();
        Ok(metrics)
    }

    /// Rebuilds the catalog every [`REFRESH`] (on a blocking thread: it reads the staging
    /// journal) until the collector is dropped.
    pub fn keep_refreshed(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tick.tick().await;
                let Some(metrics) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || metrics.refresh()).await;
            }
        })
    }

    /// A collector to register (the catalog's refresh task keeps its own handle).
    pub fn collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(Shared(self.clone()))
    }

    /// Rebuilds the catalog now (the refresh task does it every [`REFRESH`]).
    pub fn refresh(&self) {
        let (pools, facts) = self.engine.facts();
        let staged: HashMap<String, staging::Staged> =
            self.staging.all().into_iter().map(|s| (s.volume_id.clone(), s)).collect();
        let volumes = facts
            .into_iter()
            .map(|facts| {
                let label = |key: &str| facts.labels.get(key).cloned().unwrap_or_default();
                let claim = (
                    label(qsd_csi_model::params::CLAIM_LABELS[1]),
                    label(qsd_csi_model::params::CLAIM_LABELS[0]),
                );
                let staged = staged.get(&facts.id.to_string()).filter(|_| facts.export.is_some());
                let backend = match (staged.map(|s| s.backend), facts.export) {
                    (Some(Backend::Fuse), _) => Some("loop"),
                    (Some(Backend::Nbd), _) => Some("nbd"),
                    (Some(Backend::Ublk), _) => Some("ublk"),
                    (None, Some(ExportKind::Nbd)) => Some("nbd-export"),
                    (None, Some(ExportKind::Fuse)) => Some("fuse-export"),
                    (None, Some(ExportKind::VhostUserBlk)) => Some("vhost-user-blk"),
                    (None, None) => None,
                };
                let device = staged.and_then(|s| device_name(&s.device));
                Volume { facts, claim, backend, device }
            })
            .collect();
        let catalog = Arc::new(Catalog { volumes, pools });
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `/dev/loop3` → `loop3` (a symlink such as `/dev/disk/...` resolved).
fn device_name(device: &Path) -> Option<String> {
    let resolved = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_owned());
    resolved.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// A kernel block device's counters (Documentation/block/stat.rst).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStat {
    /// Reads completed.
    pub read_ops: u64,
    /// Bytes read (sectors × 512).
    pub read_bytes: u64,
    /// Milliseconds spent reading.
    pub read_millis: u64,
    /// Writes completed.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Milliseconds spent writing.
    pub write_millis: u64,
}

impl DeviceStat {
    /// Parses `/sys/block/<dev>/stat`.
    pub fn parse(text: &str) -> Option<Self> {
        let fields: Vec<u64> =
            text.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
        let field = |i: usize| fields.get(i).copied();
        Some(DeviceStat {
            read_ops: field(0)?,
            read_bytes: field(2)?.saturating_mul(512),
            read_millis: field(3)?,
            write_ops: field(4)?,
            write_bytes: field(6)?.saturating_mul(512),
            write_millis: field(7)?,
        })
    }

    fn read(device: &str) -> Option<Self> {
        let path = PathBuf::from("/sys/block").join(device).join("stat");
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }
}

/// Host bytes allocated to a file.
fn allocated(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks().saturating_mul(512))
}

/// Every family the node exports, made fresh at each scrape.
#[derive(Debug, Clone)]
struct Families {
    size: GaugeVec,
    allocated: GaugeVec,
    threshold: GaugeVec,
    depth: GaugeVec,
    attached: GaugeVec,
    crossings: IntCounterVec,
    ops: [IntCounterVec; 2],
    bytes: [IntCounterVec; 2],
    seconds: [CounterVec; 2],
    pool_capacity: GaugeVec,
    pool_free: GaugeVec,
    pool_objects: IntGaugeVec,
    daemon_up: IntGauge,
    daemon_restarts: IntCounter,
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter")
}

impl Families {
    fn new() -> Self {
        let v = &VOLUME_LABELS;
        let with_backend = [VOLUME_LABELS.as_slice(), &["backend"]].concat();
        let io = |what: &str| {
            [
                counter(
                    &format!("qsd_csi_volume_read_{what}_total"),
                    &format!("Read {what} completed by the volume's kernel device."),
                    v,
                ),
                counter(
                    &format!("qsd_csi_volume_write_{what}_total"),
                    &format!("Write {what} completed by the volume's kernel device."),
                    v,
                ),
            ]
        };
        let seconds = |op: &str| {
            CounterVec::new(
                Opts::new(
                    format!("qsd_csi_volume_{op}_seconds_total"),
                    format!("Time the volume's kernel device spent on {op}s."),
                ),
                v,
            )
            .expect("a valid counter")
        };
        Families {
            size: gauge("qsd_csi_volume_size_bytes", "The volume's virtual size.", v),
            allocated: gauge(
                "qsd_csi_volume_allocated_bytes",
                "Host bytes allocated by the volume's own (head) image: its thin allocation.",
                v,
            ),
            threshold: gauge(
                "qsd_csi_volume_write_threshold_bytes",
                "Host bytes of the head image at which the next thin-provisioning alert fires (0: not armed).",
                v,
            ),
            depth: gauge("qsd_csi_volume_chain_depth", "Layers in the volume's chain, head included.", v),
            attached: gauge(
                "qsd_csi_volume_attached",
                "1 when the volume is attached on this node, by backend (0, backend=\"none\": it is not).",
                &with_backend,
            ),
            crossings: counter(
                "qsd_csi_volume_write_threshold_crossings_total",
                "Thin-provisioning alerts (write threshold crossings) since the node plugin started.",
                v,
            ),
            ops: io("ops"),
            bytes: io("bytes"),
            seconds: [seconds("read"), seconds("write")],
            pool_capacity: gauge("qsd_csi_pool_capacity_bytes", "Size of the pool's filesystem.", &["pool"]),
            pool_free: gauge(
                "qsd_csi_pool_free_bytes",
                "Bytes free for new allocation in the pool's filesystem.",
                &["pool"],
            ),
            pool_objects: IntGaugeVec::new(
                Opts::new("qsd_csi_pool_objects", "Objects in the pool, by kind (volume, snapshot, layer)."),
                &["pool", "kind"],
            )
            .expect("a valid gauge"),
            daemon_up: IntGauge::with_opts(Opts::new("qsd_csi_daemon_up", "1 while the node plugin is connected to qemu-storage-daemon."))
                .expect("a valid gauge"),
            daemon_restarts: IntCounter::with_opts(Opts::new(
                "qsd_csi_daemon_restarts_total",
                "Times the connection to qemu-storage-daemon was lost and made again (the daemon died or its container restarted).",
            ))
            .expect("a valid counter"),
        }
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        let [read_ops, write_ops] = &self.ops;
        let [read_bytes, write_bytes] = &self.bytes;
        let [read_s, write_s] = &self.seconds;
        vec![
            &self.size,
            &self.allocated,
            &self.threshold,
            &self.depth,
            &self.attached,
            &self.crossings,
            read_ops,
            write_ops,
            read_bytes,
            write_bytes,
            read_s,
            write_s,
            &self.pool_capacity,
            &self.pool_free,
            &self.pool_objects,
            &self.daemon_up,
            &self.daemon_restarts,
        ]
    }

    fn volume(&self, volume: &Volume, crossings: u64) {
        let f = &volume.facts;
        let id = f.id.to_string();
        let labels =
            [id.as_str(), f.pool.as_str(), volume.claim.0.as_str(), volume.claim.1.as_str()];
        self.size.with_label_values(&labels).set(f.size as f64);
        if let Some(bytes) = allocated(&f.head) {
            self.allocated.with_label_values(&labels).set(bytes as f64);
        }
        self.threshold.with_label_values(&labels).set(f.threshold.unwrap_or(0) as f64);
        self.depth.with_label_values(&labels).set(f.chain_depth as f64);
        let backend = volume.backend.unwrap_or("none");
        let with_backend = [&labels[..], &[backend]].concat();
        let attached = if volume.backend.is_some() { 1.0 } else { 0.0 };
        self.attached.with_label_values(&with_backend).set(attached);
        self.crossings.with_label_values(&labels).inc_by(crossings);
        let Some(stat) = volume.device.as_deref().and_then(DeviceStat::read) else { return };
        let [read_ops, write_ops] = &self.ops;
        let [read_bytes, write_bytes] = &self.bytes;
        let [read_s, write_s] = &self.seconds;
        read_ops.with_label_values(&labels).inc_by(stat.read_ops);
        write_ops.with_label_values(&labels).inc_by(stat.write_ops);
        read_bytes.with_label_values(&labels).inc_by(stat.read_bytes);
        write_bytes.with_label_values(&labels).inc_by(stat.write_bytes);
        read_s.with_label_values(&labels).inc_by(stat.read_millis as f64 / 1000.0);
        write_s.with_label_values(&labels).inc_by(stat.write_millis as f64 / 1000.0);
    }

    fn pool(&self, pool: &PoolFacts) {
        let name = pool.name.as_str();
        if let Ok(usage) = crate::mount::usage(&pool.root) {
            self.pool_capacity.with_label_values(&[name]).set(usage.bytes_total as f64);
            self.pool_free.with_label_values(&[name]).set(usage.bytes_available as f64);
        }
        for (kind, n) in
            [("volume", pool.volumes), ("snapshot", pool.snapshots), ("layer", pool.layers)]
        {
            self.pool_objects.with_label_values(&[name, kind]).set(n as i64);
        }
    }
}

/// The collector, shared with its refresh task.
#[derive(Debug)]
struct Shared(Arc<NodeMetrics>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Collector for NodeMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs: Vec<&Desc> =
            self.template.collectors().into_iter().flat_map(|c| c.desc()).collect();
        descs.extend(self.engine.daemon().latency().desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = Families::new();
        let catalog = self.catalog();
        let crossings = self.engine.counters().crossings();
        for volume in &catalog.volumes {
            families.volume(volume, crossings.get(&volume.facts.id).copied().unwrap_or(0));
        }
        for pool in &catalog.pools {
            families.pool(pool);
        }
        let daemon = self.engine.daemon();
        families.daemon_up.set(i64::from(daemon.is_up()));
        families.daemon_restarts.inc_by(daemon.restarts());
        let mut out: Vec<MetricFamily> =
            families.collectors().into_iter().flat_map(|c| c.collect()).collect();
        out.extend(daemon.latency().collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_devices_stat_file_reads_as_counters_in_base_units() {
        // Linux 6.x: 17 fields; older kernels have 11 — both read.
        let six = "    1200 5 96000 340 800 7 204800 1500 0 900 1840 0 0 0 0 12 30\n";
        let stat = DeviceStat::parse(six).expect("parses");
        assert_eq!(
            stat,
            DeviceStat {
                read_ops: 1200,
                read_bytes: 96000 * 512,
                read_millis: 340,
                write_ops: 800,
                write_bytes: 204800 * 512,
                write_millis: 1500,
            }
        );
        assert!(DeviceStat::parse("1 2 3 4 5 6 7 8 9 10 11").is_some());
        assert_eq!(DeviceStat::parse("1 2 3"), None);
        assert_eq!(DeviceStat::parse("garbage"), None);
    }
}
