//! `qsd-csi`: the qsd-csi driver's command.
//!
//! `qsd-csi standalone` serves CSI Identity, Controller and Node on one unix socket, with the
//! block-graph engine in-process: the shape for plain hosts, Nomad and the conformance suite.
//! The bare command works with defaults: state and the `default` pool under /var/lib/qsd-csi,
//! qemu-storage-daemon started (or adopted) for you.
//!
//! Across a cluster the same binary splits in two:
//! - `qsd-csi node`: Identity + Node for the kubelet, and the node agent over mutual TLS;
//! - `qsd-csi controller`: Identity + Controller, calling each node's agent over mutual TLS.
//!
//! Everything else drives a running endpoint. This file only parses and dispatches: the modes
//! are `qsd_csi::modes`, the client commands `qsd_csi::client`.

use clap::Parser;
use qsd_csi::args::{CertsCmd, Cli, Command, PoolCmd};
use qsd_csi::{client, modes, pool_check};
use qsd_csi_proto::transport::socket_path;

/// Logs to standard error, filtered by `RUST_LOG` (default: info, libublk's chatter at warn).
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libublk=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    let socket = || socket_path(&cli.endpoint).map_err(anyhow::Error::msg);
    match cli.command {
        Command::Standalone(args) => {
            let config = modes::StandaloneConfig {
                socket: socket()?,
                node: modes::NodePart::from_args(&args)?,
            };
            modes::standalone(config, stop_signal()).await
        }
        Command::Node(args) => {
            let config = modes::NodePluginConfig {
                socket: socket()?,
                node: modes::NodePart::from_args(&args.node)?,
                agent_listen: args.agent_listen,
                tls: args.tls,
                health_listen: args.health.health_listen,
            };
            modes::node(config, stop_signal()).await
        }
        Command::Controller(args) => modes::controller(socket()?, args, stop_signal()).await,
        Command::Pool(PoolCmd::Check { engine, repair, records_only, output }) => {
            let clean = pool_check::run(&engine, repair, records_only, output).await?;
            std::process::exit(if clean { 0 } else { 2 });
        }
        Command::Certs(CertsCmd::SignNode { node, ca_cert, ca_key, days, out_dir }) => {
            client::sign_node(&node, &ca_cert, &ca_key, days, &out_dir)
        }
        command => {
            if let Err(message) = client::run(&cli.endpoint, command).await {
                eprintln!("qsd-csi: {message}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
