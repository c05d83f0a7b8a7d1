//! Block nodes: definitions, add and delete, image creation, snapshots and transactions,
//! resize, the named-node listing and write thresholds.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Command;

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
    /// The `nbd` protocol driver: an NBD client.
    Nbd {
        /// Node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// The server.
        server: InetServer,
        /// The export's name.
        export: String,
        /// The TLS credentials object.
        #[serde(rename = "tls-creds")]
        tls_creds: String,
        /// Open read-only.
        #[serde(rename = "read-only", skip_serializing_if = "Option::is_none")]
        read_only: Option<bool>,
    },
}

/// A TCP server address (`SocketAddress` of type `inet`; QAPI spells the port as a string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InetServer {
    /// Always `inet`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// Host name or address.
    host: String,
    /// The port.
    port: String,
}

impl InetServer {
    /// `host`:`port`.
    pub fn new(host: &str, port: u16) -> Self {
        InetServer { kind: "inet", host: host.to_owned(), port: port.to_string() }
    }
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
            | BlockdevOptions::Throttle { node_name, .. }
            | BlockdevOptions::Nbd { node_name, .. } => node_name,
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
