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

/// Implements [`Command`] for an arguments type.
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

mod blockdev;
mod export;
mod jobs;
mod throttle;

pub use blockdev::*;
pub use export::*;
pub use jobs::*;
pub use throttle::*;

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
