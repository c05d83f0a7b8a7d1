//! `qsd-csi-node`: runs the block-graph engine on this host.
//!
//! Starts (or adopts) qemu-storage-daemon, opens the pools, rebuilds the graph of every attached
//! volume from the journal, and supervises the daemon until SIGINT / SIGTERM. Stopping leaves the
//! daemon and its exports running, so volumes in use survive a restart of this process.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use qsd_node::engine::{Engine, EngineConfig, PoolConfig, DEFAULT_MAX_CHAIN_DEPTH};
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Mode};

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi node plugin: qcow2 volumes on qemu-storage-daemon")]
struct Args {
    /// Node-local state: the daemon's sockets, the attachment journal, the default pool.
    #[arg(long, env = "QSD_CSI_STATE_DIR", default_value = "/var/lib/qsd-csi")]
    state_dir: PathBuf,
    /// A pool as NAME=PATH (local) or NAME=PATH,shared. Default: `default` under the state dir.
    #[arg(long = "pool", value_name = "NAME=PATH[,shared]")]
    pools: Vec<String>,
    /// This node's name (a DNS subdomain). Default: the host name.
    #[arg(long, env = "KUBE_NODE_NAME")]
    node: Option<String>,
    /// Connect to a daemon managed elsewhere (the Kubernetes sidecar) instead of starting one.
    #[arg(long)]
    external_daemon: bool,
    /// The qemu-storage-daemon executable.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd_binary: PathBuf,
    /// Default chain-depth limit for new volumes.
    #[arg(long, default_value_t = DEFAULT_MAX_CHAIN_DEPTH)]
    max_chain_depth: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut pools =
        args.pools.iter().map(|p| PoolConfig::parse_spec(p)).collect::<Result<Vec<_>, _>>()?;
    if pools.is_empty() {
        pools.push(PoolConfig {
            name: PoolName::parse("default")?,
            path: args.state_dir.join("pools/default"),
            kind: PoolKind::Local,
        });
    }
    let node = NodeName::parse(&args.node.unwrap_or_else(NodeName::host_default))?;
    let daemon = DaemonConfig {
        binary: args.qsd_binary,
        run_dir: args.state_dir.join("run"),
        mode: if args.external_daemon { Mode::External } else { Mode::Managed },
    };
    let config = EngineConfig {
        node,
        state_dir: args.state_dir.clone(),
        daemon,
        pools,
        default_max_chain_depth: args.max_chain_depth,
    };
    let engine = Engine::open(config).await.context("starting the engine")?;
    let version = engine.daemon().version().qemu;
    tracing::info!(
        node = engine.config().node.as_str(),
        pools = ?engine.pools().iter().map(|p| p.root().display().to_string()).collect::<Vec<_>>(),
        qemu = %format!("{}.{}.{}", version.major, version.minor, version.micro),
        operator_monitor = %engine.daemon().config().operator_socket().display(),
        volumes = engine.list_volumes()?.len(),
        "qsd-csi node plugin ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; qemu-storage-daemon and its exports keep running");
    Ok(())
}
