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

fn parse_pool(spec: &str) -> anyhow::Result<PoolConfig> {
    let (name, rest) = spec.split_once('=').context("a pool is NAME=PATH[,shared]")?;
    let (path, kind) = match rest.strip_suffix(",shared") {
        Some(path) => (path, PoolKind::Shared),
        None => (rest, PoolKind::Local),
    };
    Ok(PoolConfig { name: PoolName::parse(name)?, path: PathBuf::from(path), kind })
}

fn host_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.').to_owned();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut pools = args.pools.iter().map(|p| parse_pool(p)).collect::<anyhow::Result<Vec<_>>>()?;
    if pools.is_empty() {
        pools.push(PoolConfig {
            name: PoolName::parse("default")?,
            path: args.state_dir.join("pools/default"),
            kind: PoolKind::Local,
        });
    }
    let node = NodeName::parse(&args.node.unwrap_or_else(host_node_name))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_as_name_equals_path_with_an_optional_shared_flag() {
        let p = parse_pool("fast=/srv/fast").expect("local");
        assert_eq!((p.name.as_str(), p.kind), ("fast", PoolKind::Local));
        let p = parse_pool("nfs=/mnt/nfs/qsd,shared").expect("shared");
        assert_eq!((p.path, p.kind), (PathBuf::from("/mnt/nfs/qsd"), PoolKind::Shared));
        assert!(parse_pool("no-equals").is_err());
        assert!(parse_pool("Bad=/x").is_err());
    }

    #[test]
    fn the_host_name_becomes_a_valid_node_name() {
        assert!(NodeName::parse(&host_node_name()).is_ok());
    }
}
