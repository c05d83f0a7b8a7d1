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
    /// Cluster node plugin: Identity + Node on the endpoint, the node agent over mutual TLS.
    Node(NodeMode),
    /// Cluster controller: Identity + Controller on the endpoint, node agents over mutual TLS.
    Controller(ControllerMode),
    /// Create, list or delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Create, list or delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Certificates for node agents on hosts without Kubernetes.
    #[command(subcommand)]
    Certs(CertsCmd),
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
        /// The volume context the CO would pass (a PersistentVolume's volumeAttributes), e.g.
        /// writeThresholdPercent=80. Repeatable.
        #[arg(long = "context", value_name = "KEY=VALUE")]
        context: Vec<String>,
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

#[derive(Debug, clap::Args)]
struct NodeMode {
    #[command(flatten)]
    node: Standalone,
    /// Where the node agent listens for the controller (mutual TLS).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9443")]
    agent_listen: std::net::SocketAddr,
    #[command(flatten)]
    tls: qsd_node::tls::AgentTlsArgs,
    #[command(flatten)]
    health: HealthArgs,
}

#[derive(Debug, clap::Args)]
struct HealthArgs {
    /// Serve the gRPC health service (grpc.health.v1, for Kubernetes' gRPC probes) here:
    /// SERVING while CSI Probe would answer ready.
    #[arg(long, value_name = "ADDR")]
    health_listen: Option<std::net::SocketAddr>,
}

impl HealthArgs {
    /// Serves health until a stop signal, if asked to; `identity` answers readiness.
    async fn serve(&self, identity: IdentityService) -> anyhow::Result<()> {
        use qsd_csi_proto::csi::identity_server::Identity;
        let Some(addr) = self.health_listen else { return Ok(()) };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for health checks on {addr}"))?;
        let ready = move || {
            let identity = identity.clone();
            async move {
                // A daemon that does not answer within a period is not ready (it may hang).
                let probe = identity.probe(tonic::Request::new(Default::default()));
                let probe = tokio::time::timeout(qsd_node::grpc::HEALTH_PERIOD, probe).await;
                probe.ok().and_then(Result::ok).and_then(|r| r.into_inner().ready).unwrap_or(false)
            }
        };
        qsd_node::grpc::serve_health(listener, ready, stop_signal()).await?;
        Ok(())
    }
}

#[derive(Debug, clap::Args)]
struct ControllerMode {
    /// A node agent: NAME=HOST:PORT (its certificate must name NAME). Repeat for each node.
    #[arg(long = "agent", value_name = "NAME=ADDR", required_unless_present = "discover_agents")]
    agents: Vec<String>,
    /// Find the node agents from the Kubernetes API instead: node plugin pods matching this
    /// label selector (in --namespace), listed at start and every 30 s.
    #[arg(long, value_name = "SELECTOR", conflicts_with = "agents")]
    discover_agents: Option<String>,
    /// The node plugin pods' namespace (discovery).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The agents' port (discovery).
    #[arg(long, default_value_t = 9443)]
    agent_port: u16,
    /// Where volumes go when a request names no pool.
    #[arg(long, default_value = "default")]
    default_pool: String,
    /// Where volumes go when a request names no node (default: the first agent).
    #[arg(long)]
    default_node: Option<String>,
    /// The name every agent's certificate carries (for one certificate shared by all nodes);
    /// by default each agent's certificate must name its node.
    #[arg(long)]
    agent_server_name: Option<String>,
    /// Run with replicas: only the holder of the Lease (in --namespace) relays node events to
    /// the claims. Every replica serves CSI.
    #[arg(long)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, default_value = "qsd-csi-controller")]
    lease_name: String,
    /// This replica's name in the Lease and in the Events it posts.
    #[arg(long, env = "POD_NAME", default_value_t = qsd_node::pool::NodeName::host_default())]
    identity: String,
    #[command(flatten)]
    tls: qsd_node::tls::TlsFiles,
    /// Sign the node agents' certificate requests (Kubernetes CSRs, signer
    /// qsd.csi.dev/node-agent) with this CA key, after checking each comes from a node plugin
    /// pod (--node-pod-selector) running on the node it names.
    #[arg(long, value_name = "FILE")]
    signing_ca_key: Option<PathBuf>,
    /// The signing CA's certificate (default: --tls-ca).
    #[arg(long, value_name = "FILE", requires = "signing_ca_key")]
    signing_ca_cert: Option<PathBuf>,
    /// The node plugin pods' service account (in --namespace): only it may ask for agent
    /// certificates.
    #[arg(long, value_name = "NAME", default_value = "qsd-csi-node")]
    node_service_account: String,
    /// The node plugin pods' labels, for the signer (default: the --discover-agents selector).
    #[arg(long, value_name = "SELECTOR")]
    node_pod_selector: Option<String>,
    #[command(flatten)]
    health: HealthArgs,
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Sign a node agent's certificate with the cluster CA, for nodes that cannot ask through
    /// Kubernetes: a new key, the node's name as CN and DNS name, server auth only. Writes
    /// OUT_DIR/NODE.crt and OUT_DIR/NODE.key (0600).
    SignNode {
        /// The node's name.
        #[arg(long)]
        node: String,
        /// The cluster CA's certificate (PEM).
        #[arg(long, value_name = "FILE")]
        ca_cert: PathBuf,
        /// The cluster CA's key (PEM).
        #[arg(long, value_name = "FILE")]
        ca_key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Where to write the certificate and key.
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
}

/// Stops on SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}

/// Serves `router` on the endpoint's unix socket until a stop signal.
async fn serve_csi(endpoint: &str, router: tonic::transport::server::Router) -> anyhow::Result<()> {
    let socket = qsd_csi_controller::client::socket_path(endpoint).map_err(anyhow::Error::msg)?;
    let listener = qsd_node::grpc::listen_unix(&socket)?;
    tracing::info!(endpoint = %socket.display(), "serving CSI");
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop_signal(),
        )
        .await?;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped; qemu-storage-daemon and staged volumes keep running");
    Ok(())
}

/// Opens the engine and the Node service of a standalone or node plugin.
async fn open_node(args: &Standalone) -> anyhow::Result<(Engine, NodeService, String)> {
    let config = args.engine.config()?;
    let default_pool = config.pools[0].name.as_str().to_owned();
    let engine = Engine::open(config).await.context("starting the block-graph engine")?;
    let node = NodeService::new(
        engine.core_arc(),
        NodeConfig { device: args.device.parse()?, max_volumes: args.max_volumes },
    )?;
    tracing::info!(node = engine.config().node.as_str(), default_pool, "engine ready");
    Ok((engine, node, default_pool))
}

async fn standalone(endpoint: &str, args: Standalone) -> anyhow::Result<()> {
    let (engine, node, default_pool) = open_node(&args).await?;
    let core = engine.core_arc();
    let agents = Agents::local(
        core.config().node.as_str(),
        qsd_node::agent::AgentService::new(core.clone()),
    );
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(Some(core.clone()), true)))
        .add_service(ControllerServer::new(ControllerService::new(agents, default_pool)))
        .add_service(NodeServer::new(node));
    serve_csi(endpoint, router).await
}

async fn node_mode(endpoint: &str, args: NodeMode) -> anyhow::Result<()> {
    let (engine, node, _) = open_node(&args.node).await?;
    let core = engine.core_arc();
    let listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .with_context(|| format!("listening for the agent on {}", args.agent_listen))?;
    let agent = {
        let core = core.clone();
        let node_name = core.config().node.as_str().to_owned();
        let tls_dir = args.node.engine.state_dir.join("tls");
        async move {
            let tls = tokio::select! {
                tls = agent_tls(&args.tls, &node_name, &tls_dir) => tls?,
                () = stop_signal() => return Ok(()),
            };
            tracing::info!(addr = %args.agent_listen, controller = tls.controller_identity, "serving the node agent over mutual TLS");
            qsd_node::tls::serve_agent(core, listener, &tls, stop_signal()).await?;
            anyhow::Ok(())
        }
    };
    let identity = IdentityService::new(Some(core), false);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity.clone()))
        .add_service(NodeServer::new(node));
    // The first to fail ends the node plugin (its pod restarts); all end on a stop signal.
    tokio::try_join!(serve_csi(endpoint, router), agent, args.health.serve(identity))?;
    Ok(())
}

/// The agent's TLS: from files, or (bootstrap) from the cluster, waiting until the controller
/// signs a certificate for this node and renewing it in the background.
async fn agent_tls(
    args: &qsd_node::tls::AgentTlsArgs,
    node: &str,
    dir: &Path,
) -> anyhow::Result<qsd_node::tls::AgentTls> {
    use qsd_node::tls::{bootstrap::Bootstrap, AgentTls, ServingCert, TlsFiles};
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let files = TlsFiles { cert: cert.clone(), key: key.clone(), ca: args.ca.clone() };
        return Ok(files.agent(&args.controller_identity)?);
    }
    let client_ca = qsd_node::tls::read_certificates(&args.ca)?;
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    let bootstrap = Bootstrap::new(client, node, dir)?;
    let (chain, key) = bootstrap.initial().await;
    let cert = ServingCert::new(chain, key)?;
    tokio::spawn(bootstrap.keep_renewed(cert.clone()));
    Ok(AgentTls { cert, client_ca, controller_identity: args.controller_identity.clone() })
}

async fn controller_mode(endpoint: &str, args: ControllerMode) -> anyhow::Result<()> {
    use qsd_csi_controller::agents;
    let server_name = args.agent_server_name.clone();
    let tls = args.tls.clone();
    let connect = move |node: &str, addr: std::net::SocketAddr| {
        Ok(agents::remote(addr, server_name.as_deref().unwrap_or(node), &tls)?)
    };
    let agents = Agents::new(Default::default(), args.default_node.clone());
    // The API server is needed for discovery and the Lease; with it, notices become Events.
    let client = match args.discover_agents.is_some()
        || args.leader_elect
        || args.signing_ca_key.is_some()
    {
        true => Some(kube::Client::try_default().await.context("connecting to Kubernetes")?),
        false => None,
    };
    match (&args.discover_agents, &client) {
        (Some(selector), Some(client)) => {
            let discovery = qsd_csi_controller::discovery::Discovery {
                namespace: args.namespace.clone(),
                selector: selector.clone(),
                port: args.agent_port,
            };
            let mut known = Default::default();
            discovery.refresh(client.clone(), &agents, &mut known, &connect).await?;
            let (agents, client) = (agents.clone(), client.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(qsd_csi_controller::discovery::REFRESH).await;
                    if let Err(e) =
                        discovery.refresh(client.clone(), &agents, &mut known, &connect).await
                    {
                        tracing::warn!(error = %e, "listing the node agents failed; keeping the last list");
                    }
                }
            });
        }
        _ => {
            let mut nodes = std::collections::BTreeMap::new();
            for spec in &args.agents {
                let (name, addr) = spec
                    .split_once('=')
                    .with_context(|| format!("--agent {spec:?} is not NAME=HOST:PORT"))?;
                let addr =
                    addr.parse().with_context(|| format!("--agent {spec:?}: bad address"))?;
                nodes.insert(name.to_owned(), connect(name, addr)?);
            }
            agents.replace(nodes);
        }
    }
    let events = match &client {
        Some(client) => qsd_csi_controller::events::Events::kubernetes(
            client.clone(),
            qsd_csi_controller::events::Reporter {
                controller: qsd_csi_controller::PLUGIN_NAME.to_owned(),
                instance: args.identity.clone(),
            },
        ),
        None => qsd_csi_controller::events::Events::log_only(),
    };
    let (leading_tx, leading) = tokio::sync::watch::channel(!args.leader_elect);
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    let election = match (args.leader_elect, &client) {
        (true, Some(client)) => {
            let config = qsd_csi_controller::lease::LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: args.identity.clone(),
            };
            let election = qsd_csi_controller::lease::Election::new(client.clone(), config);
            Some(tokio::spawn(election.run(leading_tx, async {
                let _ = stopped.await;
            })))
        }
        _ => None,
    };
    let selector = args.node_pod_selector.as_ref().or(args.discover_agents.as_ref());
    let signer = match (&args.signing_ca_key, &client) {
        (Some(key), Some(client)) => {
            let selector = selector.context(
                "signing node certificates needs --node-pod-selector (or --discover-agents)",
            )?;
            use qsd_csi_controller::signer::{Signer, SignerConfig, SigningCa, MAX_LIFETIME};
            let ca =
                SigningCa::from_files(args.signing_ca_cert.as_ref().unwrap_or(&args.tls.ca), key)
                    .context("loading the CA that signs node agent certificates")?;
            let identity = qsd_node::tls::read_certificates(&args.tls.cert)?
                .first()
                .and_then(|c| qsd_node::tls::common_name(c))
                .context("the controller's certificate has no common name (its identity)")?;
            let config = SignerConfig {
                namespace: args.namespace.clone(),
                service_account: args.node_service_account.clone(),
                pod_selector: selector.clone(),
                controller_identity: identity,
                max_lifetime: MAX_LIFETIME,
            };
            let (stop_signing, stopped) = tokio::sync::oneshot::channel::<()>();
            let signer = Signer::new(client.clone(), ca, config);
            let task = tokio::spawn(signer.run(leading.clone(), async {
                let _ = stopped.await;
            }));
            Some((stop_signing, task))
        }
        _ => None,
    };
    tokio::spawn(qsd_csi_controller::relay::run(agents.clone(), events.clone(), leading));
    tracing::info!(nodes = ?agents.nodes().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "controller ready");
    let identity = IdentityService::new(None, true);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity.clone()))
        .add_service(ControllerServer::new(
            ControllerService::new(agents, args.default_pool).with_events(events),
        ));
    let (served, health) = tokio::join!(serve_csi(endpoint, router), args.health.serve(identity));
    health?;
    if let Some((stop_signing, task)) = signer {
        let _ = stop_signing.send(());
        let _ = task.await;
    }
    // Hand the Lease over at once rather than letting it expire.
    let _ = stopped_tx.send(());
    if let Some(election) = election {
        let _ = election.await;
    }
    served
}

/// `qsd-csi certs sign-node`: the signer's certificate for a node, its key made here.
fn sign_node(
    node: &str,
    ca_cert: &Path,
    ca_key: &Path,
    days: u64,
    out: &Path,
) -> anyhow::Result<()> {
    use qsd_csi_controller::signer::SigningCa;
    anyhow::ensure!(
        qsd_csi_proto::identity::valid_node_name(node),
        "{node:?} cannot be named by a certificate (a lowercase DNS name)"
    );
    let ca = SigningCa::from_files(ca_cert, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let chain = ca.issue(node, &key, std::time::Duration::from_secs(days * 24 * 3600))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    qsd_node::pool::store::write_bytes(
        out,
        &format!("{node}.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    qsd_node::pool::store::write_bytes(out, &format!("{node}.crt"), chain.as_bytes(), 0o644)?;
    println!("{}", out.join(format!("{node}.crt")).display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    qsd_node::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone(args) => standalone(&cli.endpoint, args).await,
        Command::Node(args) => node_mode(&cli.endpoint, args).await,
        Command::Controller(args) => controller_mode(&cli.endpoint, args).await,
        Command::Certs(CertsCmd::SignNode { node, ca_cert, ca_key, days, out_dir }) => {
            sign_node(&node, &ca_cert, &ca_key, days, &out_dir)
        }
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
        Command::Standalone(_) | Command::Node(_) | Command::Controller(_) | Command::Certs(_) => {
            unreachable!("handled by main")
        }
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
        Command::Publish { volume, path, block, fs_type, read_only, context, staging_dir } => {
            let context = context
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| format!("--context {kv:?} is not KEY=VALUE"))
                })
                .collect::<Result<_, String>>()?;
            let options = cli::PublishOptions { block, fs_type, read_only, context };
            cli::publish(&mut c, &staging_dir, &volume, &path, &options)
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
