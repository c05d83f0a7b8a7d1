//! The command line's settings for the node library: the engine's (every mode that runs one)
//! and the node agent's TLS. The library takes the plain configurations these build; only the
//! binary knows clap.

use std::path::PathBuf;

use qsd_node::engine::{EngineConfig, PoolConfig, DEFAULT_MAX_CHAIN_DEPTH};
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Mode};
use qsd_node::Result;

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
    /// The address other nodes reach this node at, where copies of its volumes are served
    /// (the Kubernetes node's IP). Default: the agent's listen address when it names one;
    /// standalone: 127.0.0.1.
    #[arg(long, env = "QSD_CSI_COPY_ADDRESS", value_name = "IP")]
    pub copy_address: Option<std::net::IpAddr>,
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
        let node = self.node.clone().unwrap_or_else(qsd_node::pool::id::host_node_name);
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
            copy_address: self.copy_address,
        })
    }
}

/// How a node agent gets its certificate, and whom it obeys.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentTlsArgs {
    /// The cluster's CA certificate(s) (PEM): the controller's certificate must chain to it.
    #[arg(long = "tls-ca", value_name = "FILE")]
    pub ca: PathBuf,
    /// This node's certificate (PEM), its DNS name the node's name; unless --tls-bootstrap.
    #[arg(
        long = "tls-cert",
        value_name = "FILE",
        requires = "key",
        required_unless_present = "bootstrap"
    )]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Obtain this node's certificate from the controller, and renew it before it expires,
    /// through a Kubernetes CertificateSigningRequest (signer qsd.csi.dev/node-agent) made with
    /// the node plugin pod's service account. Key and certificate are kept in
    /// <state-dir>/tls.
    #[arg(long = "tls-bootstrap", conflicts_with_all = ["cert", "key"])]
    pub bootstrap: bool,
    /// The only identity (client certificate CN) the agent serves.
    #[arg(long, value_name = "NAME", default_value = qsd_csi_proto::identity::DEFAULT_CONTROLLER_IDENTITY)]
    pub controller_identity: String,
}

/// This side's certificate and key, and the CA that signs the other side's (the controller's
/// TLS settings).
#[derive(Debug, Clone, clap::Args)]
pub struct TlsFileArgs {
    /// This side's certificate (PEM).
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE")]
    pub key: PathBuf,
    /// The cluster's CA certificate (PEM): the other side's certificate must chain to it.
    #[arg(long = "tls-ca", value_name = "FILE")]
    pub ca: PathBuf,
}

impl TlsFileArgs {
    /// The files, as the library takes them.
    pub fn files(&self) -> qsd_csi_proto::tls::TlsFiles {
        qsd_csi_proto::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }
}
