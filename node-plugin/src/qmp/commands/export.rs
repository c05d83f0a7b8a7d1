//! Exports and the NBD server.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Command;

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
