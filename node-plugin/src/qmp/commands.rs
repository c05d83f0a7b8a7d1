//! Typed QMP commands and replies: exactly the subset of the QAPI schema the node plugin uses.
//!
//! Each command is a struct whose serde form is the command's `arguments`; its associated
//! [`Command::Reply`] is the decoded `return` value. Field names follow the QAPI spelling.

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

/// A QMP command with its reply type.
pub trait Command: Serialize {
    /// The `execute` name.
    const NAME: &'static str;
    /// The decoded `return` value.
    type Reply: DeserializeOwned;
}

macro_rules! command {
    ($ty:ty, $name:literal, $reply:ty) => {
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

/// Leaves command mode negotiation (`qmp_capabilities`).
#[derive(Debug, Serialize)]
pub struct QmpCapabilities {}
command!(QmpCapabilities, "qmp_capabilities", IgnoredAny);

/// `query-version`.
#[derive(Debug, Serialize)]
pub struct QueryVersion {}
command!(QueryVersion, "query-version", VersionInfo);

/// The daemon's version.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// Numeric version.
    pub qemu: VersionTriple,
    /// Distribution package string.
    #[serde(default)]
    pub package: String,
}

/// QEMU's major.minor.micro.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl VersionInfo {
    /// True when the daemon is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.qemu.major, self.qemu.minor) >= (major, minor)
    }
}

/// A block node definition for `blockdev-add`, or nested as a child.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum BlockdevOptions {
    /// The `file` protocol driver.
    File {
        /// Node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// Path of the image file.
        filename: String,
        /// Open read-only.
        #[serde(rename = "read-only", skip_serializing_if = "Option::is_none")]
        read_only: Option<bool>,
        /// `unmap` passes discards down (thin provisioning gives space back); default ignore.
        #[serde(skip_serializing_if = "Option::is_none")]
        discard: Option<&'static str>,
        /// Cache modes; default: through the host's page cache.
        #[serde(skip_serializing_if = "Option::is_none")]
        cache: Option<FileCache>,
    },
    /// The `qcow2` format driver.
    Qcow2 {
        /// Node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// The protocol child.
        file: Box<BlockdevRef>,
        /// The backing child: absent = open from the image header; `Some(None)` = no backing.
        #[serde(skip_serializing_if = "Option::is_none")]
        backing: Option<Option<Box<BlockdevRef>>>,
        /// Open read-only.
        #[serde(rename = "read-only", skip_serializing_if = "Option::is_none")]
        read_only: Option<bool>,
        /// `unmap` frees clusters on discard; default ignore.
        #[serde(skip_serializing_if = "Option::is_none")]
        discard: Option<&'static str>,
        /// The L2 table cache in bytes; default: enough for the whole image, up to 32 MiB.
        #[serde(rename = "l2-cache-size", skip_serializing_if = "Option::is_none")]
        l2_cache_size: Option<u64>,
    },
    /// The `throttle` filter driver.
    Throttle {
        /// Node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// The throttle-group object id.
        #[serde(rename = "throttle-group")]
        throttle_group: String,
        /// The filtered child.
        file: Box<BlockdevRef>,
        /// `unmap` lets discards through the filter; default ignore drops them here.
        #[serde(skip_serializing_if = "Option::is_none")]
        discard: Option<&'static str>,
    },
}

/// `BlockdevCacheOptions` of a file node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FileCache {
    /// O_DIRECT: bypass the host's page cache.
    pub direct: bool,
}

impl BlockdevOptions {
    /// The node name of this definition.
    pub fn node_name(&self) -> &str {
        match self {
            BlockdevOptions::File { node_name, .. }
            | BlockdevOptions::Qcow2 { node_name, .. }
            | BlockdevOptions::Throttle { node_name, .. } => node_name,
        }
    }
}

/// A child given by reference to an existing node or by a nested definition.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An existing node's name.
    Node(String),
    /// A new node defined inline.
    Definition(BlockdevOptions),
}

/// `blockdev-add`.
#[derive(Debug, Serialize)]
pub struct BlockdevAdd(pub BlockdevOptions);
command!(BlockdevAdd, "blockdev-add", IgnoredAny);

/// `blockdev-del`.
#[derive(Debug, Serialize)]
pub struct BlockdevDel {
    /// Node to delete (must be monitor-owned and unused).
    #[serde(rename = "node-name")]
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", IgnoredAny);

/// Image preallocation mode.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Preallocation {
    /// Thin: nothing allocated up front.
    #[default]
    Off,
    /// qcow2 metadata allocated, data thin.
    Metadata,
    /// posix_fallocate the whole file.
    Falloc,
    /// Write zeroes over the whole file.
    Full,
}

/// What `blockdev-create` should make.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum BlockdevCreateOptions {
    /// An empty file.
    File {
        /// Path to create.
        filename: String,
        /// Size in bytes (0 for a format driver to fill in).
        size: u64,
    },
    /// A qcow2 image on an already opened protocol node.
    Qcow2 {
        /// The protocol node to format.
        file: String,
        /// Virtual size in bytes.
        size: u64,
        /// Backing file string written into the header (relative to the image).
        #[serde(rename = "backing-file", skip_serializing_if = "Option::is_none")]
        backing_file: Option<String>,
        /// Format of the backing file.
        #[serde(rename = "backing-fmt", skip_serializing_if = "Option::is_none")]
        backing_fmt: Option<String>,
        /// Preallocation mode.
        #[serde(skip_serializing_if = "Option::is_none")]
        preallocation: Option<Preallocation>,
        /// Cluster size in bytes; default 64 KiB.
        #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
        cluster_size: Option<u64>,
        /// Extended L2 entries (subclusters); default off.
        #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
        extended_l2: Option<bool>,
    },
}

/// `blockdev-create` (a job).
#[derive(Debug, Serialize)]
pub struct BlockdevCreate {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}
command!(BlockdevCreate, "blockdev-create", IgnoredAny);

/// Options shared by the block jobs we start with manual finalize and dismiss.
#[derive(Debug, Clone, Serialize)]
pub struct ManualJob {
    /// Always false: we finalize when the job is pending.
    #[serde(rename = "auto-finalize")]
    pub auto_finalize: bool,
    /// Always false: we read the job's error before dismissing it.
    #[serde(rename = "auto-dismiss")]
    pub auto_dismiss: bool,
}

impl ManualJob {
    /// Manual finalize and dismiss.
    pub const MANUAL: ManualJob = ManualJob { auto_finalize: false, auto_dismiss: false };
}

/// `blockdev-backup` (a job).
#[derive(Debug, Serialize)]
pub struct BlockdevBackup {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// Source node.
    pub device: String,
    /// Target node.
    pub target: String,
    /// Always `full` for clones.
    pub sync: &'static str,
    /// Bytes per second; 0 = unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockdevBackup, "blockdev-backup", IgnoredAny);

/// `block-stream` (a job): copy the data of the layers between `base-node` and `device` into
/// `device`, then make `base-node` its backing.
#[derive(Debug, Serialize)]
pub struct BlockStream {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The node that receives the data.
    pub device: String,
    /// The new backing node (none: stream everything).
    #[serde(rename = "base-node", skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// Backing string to write into `device`'s header.
    #[serde(rename = "backing-file", skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockStream, "block-stream", IgnoredAny);

/// `block-commit` (a job): merge `top-node` into `base-node`. We always pass `top-node`.
#[derive(Debug, Serialize)]
pub struct BlockCommit {
    /// Job id.
    #[serde(rename = "job-id")]
    pub job_id: String,
    /// The root node of the graph containing the chain.
    pub device: String,
    /// The layer whose data moves down.
    #[serde(rename = "top-node")]
    pub top_node: String,
    /// The layer that receives it.
    #[serde(rename = "base-node")]
    pub base_node: String,
    /// Backing string to write into the overlay of `top-node`.
    #[serde(rename = "backing-file", skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Finalize / dismiss mode.
    #[serde(flatten)]
    pub manual: ManualJob,
}
command!(BlockCommit, "block-commit", IgnoredAny);

/// `block-job-set-speed`.
#[derive(Debug, Serialize)]
pub struct BlockJobSetSpeed {
    /// Job id.
    pub device: String,
    /// Bytes per second; 0 = unlimited.
    pub speed: u64,
}
command!(BlockJobSetSpeed, "block-job-set-speed", IgnoredAny);

/// `job-finalize`.
#[derive(Debug, Serialize)]
pub struct JobFinalize {
    /// Job id.
    pub id: String,
}
command!(JobFinalize, "job-finalize", IgnoredAny);

/// `job-dismiss`.
#[derive(Debug, Serialize)]
pub struct JobDismiss {
    /// Job id.
    pub id: String,
}
command!(JobDismiss, "job-dismiss", IgnoredAny);

/// `job-cancel`.
#[derive(Debug, Serialize)]
pub struct JobCancel {
    /// Job id.
    pub id: String,
}
command!(JobCancel, "job-cancel", IgnoredAny);

/// `query-jobs`.
#[derive(Debug, Serialize)]
pub struct QueryJobs {}
command!(QueryJobs, "query-jobs", Vec<JobInfo>);

/// One job as reported by `query-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Status (created, running, pending, concluded, ...).
    pub status: String,
    /// Work done.
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Work in total.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Set when the job failed.
    pub error: Option<String>,
}

/// `blockdev-snapshot`: make `overlay` (opened with `backing: null`) the new top of `node`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshot {
    /// The current top layer.
    pub node: String,
    /// The new overlay.
    pub overlay: String,
}
command!(BlockdevSnapshot, "blockdev-snapshot", IgnoredAny);

/// One action of a `transaction`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// A `blockdev-snapshot`.
    BlockdevSnapshot(BlockdevSnapshot),
}

/// `transaction`: all actions or none.
#[derive(Debug, Serialize)]
pub struct Transaction {
    /// The actions.
    pub actions: Vec<TransactionAction>,
}
command!(Transaction, "transaction", IgnoredAny);

/// `block_resize`.
#[derive(Debug, Serialize)]
pub struct BlockResize {
    /// The node to resize.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// New size in bytes.
    pub size: u64,
}
command!(BlockResize, "block_resize", IgnoredAny);

/// Throttle limits; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ThrottleLimits {
    /// Total I/O operations per second.
    #[serde(default)]
    pub iops_total: u64,
    /// Read operations per second.
    #[serde(default)]
    pub iops_read: u64,
    /// Write operations per second.
    #[serde(default)]
    pub iops_write: u64,
    /// Total bytes per second.
    #[serde(default)]
    pub bps_total: u64,
    /// Read bytes per second.
    #[serde(default)]
    pub bps_read: u64,
    /// Written bytes per second.
    #[serde(default)]
    pub bps_write: u64,
}

/// `object-add` of a throttle group.
#[derive(Debug, Serialize)]
pub struct ObjectAddThrottleGroup {
    /// Always `throttle-group`.
    #[serde(rename = "qom-type")]
    pub qom_type: &'static str,
    /// Object id.
    pub id: String,
    /// Initial limits.
    pub limits: ThrottleLimits,
}
command!(ObjectAddThrottleGroup, "object-add", IgnoredAny);

/// `object-del`.
#[derive(Debug, Serialize)]
pub struct ObjectDel {
    /// Object id.
    pub id: String,
}
command!(ObjectDel, "object-del", IgnoredAny);

/// `qom-set` of a throttle group's limits.
#[derive(Debug, Serialize)]
pub struct QomSetLimits {
    /// Object path (its id resolves under /objects).
    pub path: String,
    /// Always `limits`.
    pub property: &'static str,
    /// New limits.
    pub value: ThrottleLimits,
}
command!(QomSetLimits, "qom-set", IgnoredAny);

/// `qom-get` of a throttle group's limits.
#[derive(Debug, Serialize)]
pub struct QomGetLimits {
    /// Object path.
    pub path: String,
    /// Always `limits`.
    pub property: &'static str,
}
command!(QomGetLimits, "qom-get", ThrottleLimits);

/// `qom-list`.
#[derive(Debug, Serialize)]
pub struct QomList {
    /// Object path, e.g. `/objects`.
    pub path: String,
}
command!(QomList, "qom-list", Vec<ObjectPropertyInfo>);

/// One property (child object) from `qom-list`.
#[derive(Debug, Clone, Deserialize)]
pub struct ObjectPropertyInfo {
    /// Property name (the object id for children of /objects).
    pub name: String,
    /// Type, e.g. `child<throttle-group>`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A unix socket address in the modern (flat) QAPI form.
#[derive(Debug, Clone, Serialize)]
pub struct UnixSocketAddress {
    /// Always `unix`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Socket path.
    pub path: String,
}

/// `block-export-add`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BlockExportAdd {
    /// An export on the daemon's NBD server.
    Nbd {
        /// Export id.
        id: String,
        /// Exported node.
        #[serde(rename = "node-name")]
        node_name: String,
        /// NBD export name.
        name: String,
        /// Allow writes.
        writable: bool,
        /// Flush every write before acknowledging it.
        writethrough: bool,
    },
    /// A FUSE export onto a regular file.
    Fuse {
        /// Export id.
        id: String,
        /// Exported node.
        #[serde(rename = "node-name")]
        node_name: String,
        /// Existing regular file to mount over.
        mountpoint: String,
        /// Allow writes.
        writable: bool,
    },
    /// A vhost-user-blk socket.
    VhostUserBlk {
        /// Export id.
        id: String,
        /// Exported node.
        #[serde(rename = "node-name")]
        node_name: String,
        /// Listening socket.
        addr: UnixSocketAddress,
        /// Allow writes.
        writable: bool,
    },
}
command!(BlockExportAdd, "block-export-add", IgnoredAny);

/// `block-export-del`.
#[derive(Debug, Serialize)]
pub struct BlockExportDel {
    /// Export id.
    pub id: String,
    /// `hard` disconnects clients; `safe` (default) refuses while clients are connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
}
command!(BlockExportDel, "block-export-del", IgnoredAny);

/// `query-block-exports`.
#[derive(Debug, Serialize)]
pub struct QueryBlockExports {}
command!(QueryBlockExports, "query-block-exports", Vec<BlockExportInfo>);

/// One export.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockExportInfo {
    /// Export id.
    pub id: String,
    /// Export type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Being torn down.
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

/// `query-named-block-nodes` (always flat).
#[derive(Debug, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Always true: do not nest backing images.
    pub flat: bool,
}
command!(QueryNamedBlockNodes, "query-named-block-nodes", Vec<BlockNodeInfo>);

/// One block node.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockNodeInfo {
    /// Node name.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Driver name.
    pub drv: String,
    /// Read-only.
    pub ro: bool,
    /// Armed write threshold; 0 = none.
    #[serde(default)]
    pub write_threshold: u64,
    /// Image information.
    pub image: ImageInfo,
}

/// Image information of a node.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Host bytes allocated, when known.
    #[serde(rename = "actual-size")]
    pub actual_size: Option<u64>,
}

/// `block-set-write-threshold`; 0 disarms.
#[derive(Debug, Serialize)]
pub struct BlockSetWriteThreshold {
    /// The node to watch (we use the protocol node: host offsets).
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Threshold in bytes.
    #[serde(rename = "write-threshold")]
    pub write_threshold: u64,
}
command!(BlockSetWriteThreshold, "block-set-write-threshold", IgnoredAny);

/// `nbd-server-start` on a unix socket (this command keeps the legacy address form).
#[derive(Debug, Serialize)]
pub struct NbdServerStart {
    /// `{type: unix, data: {path}}`.
    pub addr: LegacyUnixAddress,
}
command!(NbdServerStart, "nbd-server-start", IgnoredAny);

/// The legacy (`type` + `data`) socket address form.
#[derive(Debug, Serialize)]
pub struct LegacyUnixAddress {
    /// Always `unix`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The socket path.
    pub data: LegacyUnixData,
}

/// Payload of [`LegacyUnixAddress`].
#[derive(Debug, Serialize)]
pub struct LegacyUnixData {
    /// The socket path.
    pub path: String,
}

/// `query-block-exports` cannot tell whether the NBD server runs; `nbd-server-stop` errors if not.
#[derive(Debug, Serialize)]
pub struct NbdServerStop {}
command!(NbdServerStop, "nbd-server-stop", IgnoredAny);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_chain_serializes_with_explicit_null_backing_at_the_bottom() {
        let opts = BlockdevOptions::Qcow2 {
            node_name: "q1".into(),
            file: Box::new(BlockdevRef::Definition(BlockdevOptions::File {
                node_name: "f1".into(),
                filename: "/p/a.qcow2".into(),
                read_only: None,
                discard: None,
                cache: None,
            })),
            backing: Some(None),
            read_only: Some(true),
            discard: None,
            l2_cache_size: None,
        };
        assert_eq!(
            serde_json::to_value(BlockdevAdd(opts)).ok(),
            Some(json!({"driver": "qcow2", "node-name": "q1", "read-only": true, "backing": null,
                "file": {"driver": "file", "node-name": "f1", "filename": "/p/a.qcow2"}}))
        );
    }

    #[test]
    fn jobs_and_transactions_use_qapi_spelling() {
        let b = BlockdevBackup {
            job_id: "j".into(),
            device: "a".into(),
            target: "b".into(),
            sync: "full",
            speed: None,
            manual: ManualJob::MANUAL,
        };
        assert_eq!(
            serde_json::to_value(b).ok(),
            Some(json!({"job-id": "j", "device": "a", "target": "b", "sync": "full",
                "auto-finalize": false, "auto-dismiss": false}))
        );
        let t = Transaction {
            actions: vec![TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: "a".into(),
                overlay: "b".into(),
            })],
        };
        assert_eq!(
            serde_json::to_value(t).ok(),
            Some(
                json!({"actions": [{"type": "blockdev-snapshot", "data": {"node": "a", "overlay": "b"}}]})
            )
        );
        let nbd = NbdServerStart {
            addr: LegacyUnixAddress { kind: "unix", data: LegacyUnixData { path: "/s".into() } },
        };
        assert_eq!(
            serde_json::to_value(nbd).ok(),
            Some(json!({"addr": {"type": "unix", "data": {"path": "/s"}}}))
        );
    }

    #[test]
    fn version_comparison_orders_major_then_minor() {
        let v = |major, minor| VersionInfo {
            qemu: VersionTriple { major, minor, micro: 0 },
            package: String::new(),
        };
        assert!(v(7, 2).at_least(7, 2));
        assert!(!v(7, 2).at_least(10, 1));
        assert!(v(10, 1).at_least(10, 1));
        assert!(v(11, 0).at_least(10, 1));
    }
}
