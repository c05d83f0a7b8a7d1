//! Throttle groups: their limits, adding and removing them, and QOM access to them.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::Command;

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

/// `object-add` of TLS credentials from a pre-shared key file (`dir/keys.psk`).
#[derive(Debug, Serialize)]
pub struct ObjectAddTlsPsk {
    /// Always `tls-creds-psk`.
    #[serde(rename = "qom-type")]
    pub qom_type: &'static str,
    /// Object id.
    pub id: String,
    /// `client` or `server`.
    pub endpoint: &'static str,
    /// The directory holding `keys.psk`.
    pub dir: String,
    /// The identity (a client's).
    pub username: String,
    /// gnutls priority string: the TLS versions and ciphers allowed.
    pub priority: &'static str,
}
command!(ObjectAddTlsPsk, "object-add", IgnoredAny);

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
