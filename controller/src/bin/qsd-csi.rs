//! `qsd-csi`: the qsd-csi driver's command.
//!
//! `qsd-csi standalone` serves CSI Identity, Controller and Node on one unix socket, with the
//! block-graph engine in-process: the shape for plain hosts, Nomad and the conformance suite.
//! The bare command works with defaults: state and the `default` pool under /var/lib/qsd-csi,
//! qemu-storage-daemon started (or adopted) for you.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use qsd_csi_controller::{ControllerService, IdentityService};
use qsd_csi_proto::csi::controller_server::ControllerServer;
use qsd_csi_proto::csi::identity_server::IdentityServer;
use qsd_csi_proto::csi::node_server::NodeServer;
use qsd_node::csi::{NodeConfig, NodeService};
use qsd_node::engine::{Engine, EngineConfig, PoolConfig, DEFAULT_MAX_CHAIN_DEPTH};
use qsd_node::pool::{NodeName, PoolKind, PoolName};
use qsd_node::qsd::{DaemonConfig, Mode};

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi: Kubernetes CSI volumes on QEMU's block layer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Identity, Controller and Node on one unix socket, engine in-process.
    Standalone(Standalone),
}

#[derive(Debug, clap::Args)]
struct Standalone {
    /// Where to listen: unix:///path/to/csi.sock (or a plain path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///var/lib/qsd-csi/csi.sock")]
    endpoint: String,
    /// Node-local state: daemon sockets, journals, and the default pool.
    #[arg(long, env = "QSD_CSI_STATE_DIR", default_value = "/var/lib/qsd-csi")]
    state_dir: PathBuf,
    /// A pool as NAME=PATH or NAME=PATH,shared (repeatable). Default: `default` in the state dir.
    #[arg(long = "pool", value_name = "NAME=PATH[,shared]")]
    pools: Vec<String>,
    /// This node's name. Default: the host name.
    #[arg(long, env = "KUBE_NODE_NAME")]
    node: Option<String>,
    /// Kernel device backend: auto, ublk, nbd or fuse.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Connect to a daemon managed elsewhere instead of starting one.
    #[arg(long)]
    external_daemon: bool,
    /// The qemu-storage-daemon executable.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd_binary: PathBuf,
    /// Default chain-depth limit for new volumes.
    #[arg(long, default_value_t = DEFAULT_MAX_CHAIN_DEPTH)]
    max_chain_depth: u32,
    /// Volumes this node advertises it can hold.
    #[arg(long, default_value_t = 256)]
    max_volumes: i64,
}

fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    anyhow::ensure!(
        path.starts_with('/'),
        "endpoint {endpoint:?} is not an absolute unix socket path"
    );
    Ok(PathBuf::from(path))
}

fn listen(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn standalone(args: Standalone) -> anyhow::Result<()> {
    let socket = socket_path(&args.endpoint)?;
    let mut pools =
        args.pools.iter().map(|p| PoolConfig::parse_spec(p)).collect::<Result<Vec<_>, _>>()?;
    if pools.is_empty() {
        pools.push(PoolConfig {
            name: PoolName::parse("default")?,
            path: args.state_dir.join("pools/default"),
            kind: PoolKind::Local,
        });
    }
    let default_pool = pools[0].name.as_str().to_owned();
    let config = EngineConfig {
        node: NodeName::parse(&args.node.unwrap_or_else(NodeName::host_default))?,
        state_dir: args.state_dir.clone(),
        daemon: DaemonConfig {
            binary: args.qsd_binary,
            run_dir: args.state_dir.join("run"),
            mode: if args.external_daemon { Mode::External } else { Mode::Managed },
        },
        pools,
        default_max_chain_depth: args.max_chain_depth,
    };
    let engine = Engine::open(config).await.context("starting the block-graph engine")?;
    let core = engine.core_arc();
    let node = NodeService::new(
        core.clone(),
        NodeConfig { device: args.device.parse()?, max_volumes: args.max_volumes },
    )?;
    let listener = listen(&socket)?;
    tracing::info!(
        endpoint = %socket.display(),
        node = core.config().node.as_str(),
        default_pool,
        "qsd-csi standalone serving Identity, Controller and Node"
    );
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
        tracing::info!("stopping; qemu-storage-daemon and staged volumes keep running");
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(core.clone())))
        .add_service(ControllerServer::new(ControllerService::new(core.clone(), default_pool)))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    let _ = std::fs::remove_file(&socket);
    drop(engine);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Standalone(args) => standalone(args).await,
    }
}
