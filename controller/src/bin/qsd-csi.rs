//! `qsd-csi`: the qsd-csi driver's command.
//!
//! `qsd-csi standalone` serves CSI Identity, Controller and Node on one unix socket, with the
//! block-graph engine in-process: the shape for plain hosts, Nomad and the conformance suite.
//! The bare command works with defaults: state and the `default` pool under /var/lib/qsd-csi,
//! qemu-storage-daemon started (or adopted) for you.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use qsd_csi_controller::agents::Agents;
use qsd_csi_controller::{ControllerService, IdentityService};
use qsd_csi_proto::csi::controller_server::ControllerServer;
use qsd_csi_proto::csi::identity_server::IdentityServer;
use qsd_csi_proto::csi::node_server::NodeServer;
use qsd_node::csi::{NodeConfig, NodeService};
use qsd_node::engine::{Engine, EngineArgs};

#[derive(Debug, Parser)]
#[command(version, about = "qsd-csi: Kubernetes CSI volumes on QEMU's block layer")]
struct Cli {
    /// The CSI endpoint to serve (standalone) or to drive (every other command).
    #[arg(
        long,
        global = true,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/qsd-csi/csi.sock"
    )]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Identity, Controller and Node on one unix socket, engine in-process.
    Standalone(Standalone),
    /// Create, list or delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list or delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Copy a volume into a new one (point-in-time, while the source stays in use).
    Clone {
        /// The source volume's ID.
        source: String,
        /// The new volume's name.
        name: String,
        /// Size of the clone (default: the source's), e.g. 20G.
        #[arg(long)]
        size: Option<String>,
    },
    /// Grow a volume; if `qsd-csi publish` staged it here, its device and filesystem too.
    Expand {
        /// The volume's ID.
        volume: String,
        /// The new size, e.g. 20G.
        size: String,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
    /// Attach a volume on this host and mount it at a path (or bind its device with --block).
    Publish {
        /// The volume's ID.
        volume: String,
        /// A directory to mount on, or (with --block) a file to bind the device onto.
        path: PathBuf,
        /// Publish the raw block device instead of a filesystem.
        #[arg(long)]
        block: bool,
        /// Filesystem to create on first use: ext4 or xfs.
        #[arg(long, default_value = "ext4")]
        fs_type: String,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
    /// Unmount a published volume and detach it.
    Unpublish {
        /// The volume's ID.
        volume: String,
        /// The path given to publish.
        path: PathBuf,
        /// Where the CLI stages volumes.
        #[arg(long, default_value = "/var/lib/qsd-csi/cli-staging")]
        staging_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume (empty, or from a snapshot).
    Create {
        /// Its name.
        name: String,
        /// Its size, e.g. 10G.
        #[arg(long, default_value = "1G")]
        size: String,
        /// The pool (default: the driver's default pool).
        #[arg(long)]
        pool: Option<String>,
        /// off, metadata, falloc or full.
        #[arg(long)]
        preallocation: Option<String>,
        /// Restore this snapshot into the new volume (a linked overlay).
        #[arg(long)]
        from_snapshot: Option<String>,
    },
    /// List volumes.
    List,
    /// Delete a volume (refused while it is published).
    Delete {
        /// The volume's ID.
        volume: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Take a snapshot of a volume (O(1), also while it is in use).
    Create {
        /// The volume's ID.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// List snapshots, optionally of one volume.
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a snapshot (its data stays while volumes need it).
    Delete {
        /// The snapshot's ID.
        snapshot: String,
    },
}

#[derive(Debug, clap::Args)]
struct Standalone {
    #[command(flatten)]
    engine: EngineArgs,
    /// Kernel device backend: auto, ublk, nbd or fuse.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Volumes this node advertises it can hold.
    #[arg(long, default_value_t = 256)]
    max_volumes: i64,
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

async fn standalone(endpoint: &str, args: Standalone) -> anyhow::Result<()> {
    let socket = qsd_csi_controller::client::socket_path(endpoint).map_err(anyhow::Error::msg)?;
    let config = args.engine.config()?;
    let default_pool = config.pools[0].name.as_str().to_owned();
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
        .add_service(ControllerServer::new(ControllerService::new(
            Agents::local(
                core.config().node.as_str(),
                qsd_node::agent::AgentService::new(core.clone()),
            ),
            default_pool,
        )))
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
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libublk=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone(args) => standalone(&cli.endpoint, args).await,
        command => {
            if let Err(message) = client(&cli.endpoint, command).await {
                eprintln!("qsd-csi: {message}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn client(endpoint: &str, command: Command) -> Result<(), String> {
    use qsd_csi_controller::cli::{self, NewVolume};
    use qsd_csi_proto::csi;
    use qsd_csi_proto::csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let socket = qsd_csi_controller::client::socket_path(endpoint)?;
    let mut c = qsd_csi_controller::client::Clients::connect(&socket).await.map_err(|e| {
        format!("cannot reach {endpoint}: {e}\n  hint: start the driver with `qsd-csi standalone`")
    })?;
    fn fail<'a>(what: &'a str, endpoint: &'a str) -> impl Fn(tonic::Status) -> String + 'a {
        move |s| cli::explain(what, &s, endpoint)
    }
    let size = |s: &str| cli::parse_size(s);
    match command {
        Command::Standalone(_) => unreachable!("handled by main"),
        Command::Volume(VolumeCmd::Create {
            name,
            size: sz,
            pool,
            preallocation,
            from_snapshot,
        }) => {
            let mut parameters = std::collections::HashMap::new();
            parameters.extend(pool.map(|p| ("pool".to_owned(), p)));
            parameters.extend(preallocation.map(|p| ("preallocation".to_owned(), p)));
            let source = from_snapshot.map(|id| Type::Snapshot(SnapshotSource { snapshot_id: id }));
            let v = cli::create_volume(
                &mut c,
                NewVolume { name, size: Some(size(&sz)?), parameters, source },
            )
            .await
            .map_err(fail("volume create", endpoint))?;
            println!("{}\t{}", v.volume_id, cli::human(v.capacity_bytes));
        }
        Command::Volume(VolumeCmd::List) => {
            let mut token = String::new();
            println!("ID\tSIZE\tSOURCE\tPUBLISHED");
            loop {
                let page = c
                    .controller
                    .list_volumes(csi::ListVolumesRequest {
                        max_entries: 100,
                        starting_token: token,
                    })
                    .await
                    .map_err(fail("volume list", endpoint))?
                    .into_inner();
                for e in page.entries {
                    let v = e.volume.unwrap_or_default();
                    let source = match v.content_source.and_then(|s| s.r#type) {
                        Some(Type::Snapshot(s)) => s.snapshot_id,
                        Some(Type::Volume(s)) => s.volume_id,
                        None => "-".into(),
                    };
                    let published =
                        e.status.map(|s| s.published_node_ids.join(",")).filter(|s| !s.is_empty());
                    println!(
                        "{}\t{}\t{source}\t{}",
                        v.volume_id,
                        cli::human(v.capacity_bytes),
                        published.as_deref().unwrap_or("-")
                    );
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
        }
        Command::Volume(VolumeCmd::Delete { volume }) => {
            c.controller
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: volume.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail("volume delete", endpoint))?;
            println!("deleted {volume}");
        }
        Command::Snapshot(SnapshotCmd::Create { volume, name }) => {
            let s = c
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: volume,
                    name,
                    ..Default::default()
                })
                .await
                .map_err(fail("snapshot create", endpoint))?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            println!("{}\t{}", s.snapshot_id, cli::human(s.size_bytes));
        }
        Command::Snapshot(SnapshotCmd::List { volume }) => {
            let list = c
                .controller
                .list_snapshots(csi::ListSnapshotsRequest {
                    source_volume_id: volume.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(fail("snapshot list", endpoint))?
                .into_inner();
            println!("ID\tSIZE\tSOURCE\tCREATED");
            for e in list.entries {
                let s = e.snapshot.unwrap_or_default();
                let created = s.creation_time.map(|t| t.seconds).unwrap_or_default();
                println!(
                    "{}\t{}\t{}\t{created}",
                    s.snapshot_id,
                    cli::human(s.size_bytes),
                    s.source_volume_id
                );
            }
        }
        Command::Snapshot(SnapshotCmd::Delete { snapshot }) => {
            c.controller
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: snapshot.clone(),
                    ..Default::default()
                })
                .await
                .map_err(fail("snapshot delete", endpoint))?;
            println!("deleted {snapshot}");
        }
        Command::Clone { source, name, size: sz } => {
            let size = sz.as_deref().map(size).transpose()?;
            let source = Some(Type::Volume(VolumeSource { volume_id: source }));
            let v = cli::create_volume(
                &mut c,
                NewVolume { name, size, parameters: Default::default(), source },
            )
            .await
            .map_err(fail("clone", endpoint))?;
            println!("{}\t{}", v.volume_id, cli::human(v.capacity_bytes));
        }
        Command::Expand { volume, size: sz, staging_dir } => {
            let r = c
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: size(&sz)?,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(fail("expand", endpoint))?
                .into_inner();
            let staging = cli::staging_path(&staging_dir, &volume);
            if r.node_expansion_required && qsd_node::mount::is_mountpoint(&staging) {
                c.node
                    .node_expand_volume(csi::NodeExpandVolumeRequest {
                        volume_id: volume.clone(),
                        volume_path: staging.display().to_string(),
                        ..Default::default()
                    })
                    .await
                    .map_err(fail("expand on this node", endpoint))?;
            }
            println!("{volume}\t{}", cli::human(r.capacity_bytes));
        }
        Command::Publish { volume, path, block, fs_type, read_only, staging_dir } => {
            cli::publish(&mut c, &staging_dir, &volume, &path, block, &fs_type, read_only)
                .await
                .map_err(fail("publish", endpoint))?;
            println!("published {volume} at {}", path.display());
        }
        Command::Unpublish { volume, path, staging_dir } => {
            cli::unpublish(&mut c, &staging_dir, &volume, &path)
                .await
                .map_err(fail("unpublish", endpoint))?;
            println!("unpublished {volume} from {}", path.display());
        }
    }
    Ok(())
}
