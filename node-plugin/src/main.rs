//! `qsd-csi-node`: runs the block-graph engine on this host.
//!
//! Starts (or adopts) qemu-storage-daemon, opens the pools, rebuilds the graph of every attached
//! volume from the journal, and supervises the daemon until SIGINT / SIGTERM. Stopping leaves the
//! daemon and its exports running, so volumes in use survive a restart of this process.
//! With `--agent-listen`, it also serves the node agent (`agent.proto`) to the controller over
//! mutual TLS; the TLS files are then required.

use anyhow::Context;
use clap::Parser;
use qsd_node::engine::{Engine, EngineArgs};
use qsd_node::tls::TlsFiles;

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi node plugin: qcow2 volumes on qemu-storage-daemon")]
struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Serve the node agent to the controller on this address (mutual TLS).
    #[arg(long, value_name = "ADDR", requires_all = ["cert", "key", "ca"])]
    agent_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    tls: Option<TlsFiles>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    qsd_node::init_logging();
    let args = Args::parse();
    let config = args.engine.config()?;
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
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match (args.agent_listen, &args.tls) {
        (Some(addr), Some(tls)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for the agent on {addr}"))?;
            tracing::info!(%addr, "serving the node agent over mutual TLS");
            qsd_node::tls::serve_agent(engine.core_arc(), listener, tls, stop).await?;
        }
        _ => stop.await,
    }
    tracing::info!("stopping; qemu-storage-daemon and its exports keep running");
    Ok(())
}
