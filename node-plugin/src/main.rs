//! `qsd-csi-node`: runs the block-graph engine on this host.
//!
//! Starts (or adopts) qemu-storage-daemon, opens the pools, rebuilds the graph of every attached
//! volume from the journal, and supervises the daemon until SIGINT / SIGTERM. Stopping leaves the
//! daemon and its exports running, so volumes in use survive a restart of this process.
//! (The cluster node plugin, which also serves CSI Node and the agent, is `qsd-csi node`.)

use anyhow::Context;
use clap::Parser;
use qsd_node::engine::{Engine, EngineArgs};

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi node plugin: qcow2 volumes on qemu-storage-daemon")]
struct Args {
    #[command(flatten)]
    engine: EngineArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    qsd_node::init_logging();
    let config = Args::parse().engine.config()?;
    let engine = Engine::open(config).await.context("starting the engine")?;
    let version = engine.daemon().version().qemu;
    tracing::info!(
        node = engine.config().node.as_str(),
        pools = ?engine.config().pools.iter().map(|p| p.path.display().to_string()).collect::<Vec<_>>(),
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
