//! What the engine is started with: its node, state directory, daemon and pools.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::pool::{NodeName, PoolKind, PoolName};
use crate::qsd::DaemonConfig;

/// One pool the engine serves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Its name (part of every ID).
    pub name: PoolName,
    /// Its directory.
    pub path: PathBuf,
    /// Local or shared.
    pub kind: PoolKind,
}

impl PoolConfig {
    /// Parses `NAME=PATH` (a local pool) or `NAME=PATH,shared`.
    pub fn parse_spec(spec: &str) -> Result<PoolConfig> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| Error::invalid("pool", format!("{spec:?} is not NAME=PATH[,shared]")))?;
        let (path, kind) = match rest.strip_suffix(",shared") {
            Some(path) => (path, PoolKind::Shared),
            None => (rest, PoolKind::Local),
        };
        if path.is_empty() {
            return Err(Error::invalid("pool", format!("{spec:?} has no path")));
        }
        Ok(PoolConfig { name: PoolName::parse(name)?, path: PathBuf::from(path), kind })
    }
}

/// Everything the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's name (part of local volumes' IDs).
    pub node: NodeName,
    /// Node-local state: the attachment journal and export files. Created 0700.
    pub state_dir: PathBuf,
    /// The daemon.
    pub daemon: DaemonConfig,
    /// The pools.
    pub pools: Vec<PoolConfig>,
    /// Default chain-depth limit for new volumes.
    pub default_max_chain_depth: u32,
    /// The address other nodes reach this node at for copies of its volumes (their copy
    /// servers listen there); `None`: this node serves no copies.
    pub copy_address: Option<std::net::IpAddr>,
}
