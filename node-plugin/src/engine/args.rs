//! Command-line settings of the engine, shared by `qsd-csi-node` and `qsd-csi standalone`.

use std::path::PathBuf;

use super::{EngineConfig, PoolConfig, DEFAULT_MAX_CHAIN_DEPTH};
use crate::error::Result;
use crate::pool::{NodeName, PoolKind, PoolName};
use crate::qsd::{DaemonConfig, Mode};

/// Where the engine keeps its state, which pools it serves, and how it reaches the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Node-local state: daemon sockets, journals, and the default pool.
    #[arg(long, env = "QSD_CSI_STATE_DIR", default_value = "/var/lib/qsd-csi")]
    pub state_dir: PathBuf,
    /// A pool as NAME=PATH or NAME=PATH,shared (repeatable). Default: `default` in the state dir.
    #[arg(long = "pool", value_name = "NAME=PATH[,shared]")]
    pub pools: Vec<String>,
    /// This node's name (a DNS subdomain). Default: the host name.
    #[arg(long, env = "KUBE_NODE_NAME")]
    pub node: Option<String>,
    /// Connect to a daemon managed elsewhere (the Kubernetes sidecar) instead of starting one.
    #[arg(long)]
    pub external_daemon: bool,
    /// The qemu-storage-daemon executable.
    #[arg(long, default_value = "qemu-storage-daemon")]
    pub qsd_binary: PathBuf,
    /// Default chain-depth limit for new volumes.
    #[arg(long, default_value_t = DEFAULT_MAX_CHAIN_DEPTH)]
    pub max_chain_depth: u32,
}

impl EngineArgs {
    /// The engine configuration these settings describe.
    pub fn config(&self) -> Result<EngineConfig> {
        let mut pools =
            self.pools.iter().map(|p| PoolConfig::parse_spec(p)).collect::<Result<Vec<_>>>()?;
        if pools.is_empty() {
            pools.push(PoolConfig {
                name: PoolName::parse("default")?,
                path: self.state_dir.join("pools/default"),
                kind: PoolKind::Local,
            });
        }
        let node = self.node.clone().unwrap_or_else(crate::pool::id::host_node_name);
        Ok(EngineConfig {
            node: NodeName::parse(&node)?,
            state_dir: self.state_dir.clone(),
            daemon: DaemonConfig {
                binary: self.qsd_binary.clone(),
                run_dir: self.state_dir.join("run"),
                mode: if self.external_daemon { Mode::External } else { Mode::Managed },
            },
            pools,
            default_max_chain_depth: self.max_chain_depth,
        })
    }
}
