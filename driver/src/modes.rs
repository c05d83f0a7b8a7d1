//! The modes of `qsd-csi`, each a library entry point with its configuration, serving until a
//! stop future resolves:
//!
//! ```text
//!   standalone   engine + Node + Controller (agent in-process) + Identity   one unix socket
//!   node         engine + Node + Identity on the socket; the agent over mutual TLS
//!   controller   Identity + Controller; agents over mutual TLS   (qsd_csi_controller::run)
//! ```
//! This crate is where the controller and the node plugin meet: the controller reaches the
//! engine only through `agent.proto`'s `Agent` trait, and learns readiness through
//! [`EngineProbe`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::engine_args::AgentTlsArgs;
use anyhow::Context;
use qsd_csi_controller::agents::Agents;
use qsd_csi_controller::events::Events;
use qsd_csi_controller::grow::{AutoGrow, GrowMetrics};
use qsd_csi_controller::run::{AgentSource, Background, ControllerConfig};
use qsd_csi_controller::serve::Latch;
use qsd_csi_controller::{ControllerService, IdentityService, Probe};
use qsd_csi_proto::csi::identity_server::IdentityServer;
use qsd_csi_proto::csi::node_server::NodeServer;
use qsd_node::agent::AgentService;
use qsd_node::csi::{NodeConfig, NodeService};
use qsd_node::engine::{Engine, EngineConfig, EngineCore};

use crate::args;
use crate::grow::InPlaceGrower;

/// Readiness of a process that runs the engine: the daemon answers on its monitor.
#[derive(Debug, Clone)]
pub struct EngineProbe(pub Arc<EngineCore>);

#[tonic::async_trait]
impl Probe for EngineProbe {
    async fn ready(&self) -> bool {
        self.0.daemon_answers().await
    }

    fn manifest(&self) -> HashMap<String, String> {
        [("qemu".to_owned(), self.0.qemu_version())].into()
    }
}

/// The engine and Node service of a standalone or node plugin.
#[derive(Debug, Clone)]
pub struct NodePart {
    /// The engine.
    pub engine: EngineConfig,
    /// The Node service.
    pub node: NodeConfig,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl NodePart {
    /// From the command line.
    pub fn from_args(args: &args::Standalone) -> anyhow::Result<Self> {
        Ok(NodePart {
            engine: args.engine.config()?,
            node: NodeConfig { device: args.device.parse()?, max_volumes: args.max_volumes },
            metrics_listen: args.metrics_listen,
        })
    }

    async fn open(self) -> anyhow::Result<(Engine, Arc<NodeService>)> {
        let engine = Engine::open(self.engine).await.context("starting the block-graph engine")?;
        let node = NodeService::new(engine.core_arc(), self.node)?;
        node.undo_unfinished_stages().await;
        tracing::info!(node = engine.config().node.as_str(), "engine ready");
        Ok((engine, Arc::new(node)))
    }
}

/// The node's metrics registry: every gRPC call, the engine's volumes, pools and daemon, and
/// (standalone) `grow`'s auto-expansions. The collector's catalog is kept refreshed while it
/// lives.
fn node_registry(
    core: &Arc<EngineCore>,
    grow: Option<&GrowMetrics>,
) -> anyhow::Result<prometheus::Registry> {
    let registry = qsd_csi_proto::metrics::registry();
    let collector = qsd_node::metrics::NodeMetrics::new(core.clone())?;
    collector.keep_refreshed();
    registry.register(collector.collector())?;
    if let Some(grow) = grow {
        grow.register(&registry)?;
    }
    Ok(registry)
}

/// `qsd-csi standalone`.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// The CSI socket.
    pub socket: PathBuf,
    /// Engine and Node service.
    pub node: NodePart,
}

/// Serves Identity, Controller and Node on one socket with the engine in-process; relays the
/// engine's events (auto-expanding volumes grow here) and serves metrics when asked.
pub async fn standalone(
    config: StandaloneConfig,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let default_pool = config.node.engine.pools[0].name.as_str().to_owned();
    let metrics_listen = config.node.metrics_listen;
    let mut part = config.node;
    part.engine.copy_address.get_or_insert(std::net::Ipv4Addr::LOCALHOST.into());
    let (engine, node) = part.open().await?;
    let core = engine.core_arc();
    let agents =
        Agents::local(core.config().node.as_str(), Arc::new(AgentService::new(core.clone())));
    let controller = ControllerService::new(agents.clone(), default_pool);
    let mut background = Background::new();
    let grow_metrics = GrowMetrics::new();
    let grower = InPlaceGrower { controller: controller.clone(), node: node.clone() };
    let grow = AutoGrow::new(Arc::new(grower), Events::log_only(), grow_metrics.clone());
    let leading = background.lead_alone();
    background.relay(agents.clone(), Events::log_only(), Some(grow), leading);
    if let Some(addr) = metrics_listen {
        background.serve_metrics(addr, node_registry(&core, Some(&grow_metrics))?).await?;
    }
    let identity = IdentityService::new(Arc::new(EngineProbe(core)), true);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity.clone()))
        .add_service(qsd_csi_proto::failures::logged(NodeServer::from_arc(node)));
    let router = qsd_csi_controller::serve::controller_services(router, controller, agents);
    let served =
        qsd_csi_controller::serve::csi_and_health(&config.socket, router, None, identity, stop)
            .await;
    background.stop().await;
    served?;
    tracing::info!("stopped; qemu-storage-daemon and staged volumes keep running");
    Ok(())
}

/// `qsd-csi node`.
#[derive(Debug, Clone)]
pub struct NodePluginConfig {
    /// The CSI socket (the kubelet's).
    pub socket: PathBuf,
    /// Engine and Node service.
    pub node: NodePart,
    /// Where the agent listens for the controller.
    pub agent_listen: SocketAddr,
    /// How the agent gets its certificate, and whom it obeys.
    pub tls: AgentTlsArgs,
    /// Where to serve the gRPC health service, if anywhere.
    pub health_listen: Option<SocketAddr>,
}

/// Serves Identity and Node on the socket and the agent over mutual TLS. The first server to
/// fail ends the node plugin (its pod restarts); all end when `stop` resolves.
pub async fn node(
    config: NodePluginConfig,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tls_dir = config.node.engine.state_dir.join("tls");
    let metrics_listen = config.node.metrics_listen;
    let mut part = config.node;
    if part.engine.copy_address.is_none() && !config.agent_listen.ip().is_unspecified() {
        part.engine.copy_address = Some(config.agent_listen.ip());
    }
    let (engine, node) = part.open().await?;
    let core = engine.core_arc();
    let listener = tokio::net::TcpListener::bind(config.agent_listen)
        .await
        .with_context(|| format!("listening for the agent on {}", config.agent_listen))?;
    let latch = Latch::new();
    let agent = {
        let core = core.clone();
        let node_name = core.config().node.as_str().to_owned();
        let (tls_args, listen, stop) = (config.tls.clone(), config.agent_listen, latch.wait());
        async move {
            tokio::pin!(stop);
            let tls = tokio::select! {
                tls = agent_tls(&tls_args, &node_name, &tls_dir) => tls?,
                () = &mut stop => return Ok(()),
            };
            tracing::info!(addr = %listen, controller = tls.controller_identity, "serving the node agent over mutual TLS");
            qsd_node::tls::serve_agent(core, listener, &tls, stop).await?;
            anyhow::Ok(())
        }
    };
    let mut background = Background::new();
    if let Some(addr) = metrics_listen {
        background.serve_metrics(addr, node_registry(&core, None)?).await?;
    }
    let identity = IdentityService::new(Arc::new(EngineProbe(core)), false);
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity.clone()))
        .add_service(qsd_csi_proto::failures::logged(NodeServer::from_arc(node)));
    let csi = qsd_csi_controller::serve::csi_and_health(
        &config.socket,
        router,
        config.health_listen,
        identity,
        latch.wait(),
    );
    let (csi, agent, ()) = tokio::join!(
        latch.on_end(async { csi.await.map_err(anyhow::Error::from) }),
        latch.on_end(agent),
        latch.follow(stop),
    );
    background.stop().await;
    csi.and(agent)
}

/// The agent's TLS: from files, or (bootstrap) from the cluster, waiting until the controller
/// signs a certificate for this node and renewing it in the background.
async fn agent_tls(
    args: &AgentTlsArgs,
    node: &str,
    dir: &std::path::Path,
) -> anyhow::Result<qsd_node::tls::AgentTls> {
    use qsd_node::tls::{bootstrap::Bootstrap, AgentTls, ServingCert, TlsFiles};
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let files = TlsFiles { cert: cert.clone(), key: key.clone(), ca: args.ca.clone() };
        return Ok(qsd_node::tls::agent_from_files(&files, &args.controller_identity)?);
    }
    let client_ca = qsd_node::tls::read_certificates(&args.ca)?;
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    let bootstrap = Bootstrap::new(client, node, dir)?;
    let (chain, key) = bootstrap.initial().await;
    let cert = ServingCert::new(chain, key)?;
    tokio::spawn(bootstrap.keep_renewed(cert.clone()));
    Ok(AgentTls { cert, client_ca, controller_identity: args.controller_identity.clone() })
}

/// `qsd-csi controller`: the command line made into the controller's configuration, and the
/// signer when asked for.
pub async fn controller(
    socket: PathBuf,
    args: args::ControllerMode,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use qsd_csi_controller::discovery::Discovery;
    use qsd_csi_controller::lease::LeaseConfig;
    use qsd_csi_controller::signer::{Signer, SignerConfig, SigningCa, MAX_LIFETIME};
    let agents = match &args.discover_agents {
        Some(selector) => AgentSource::Discover(Discovery {
            namespace: args.namespace.clone(),
            selector: selector.clone(),
            port: args.agent_port,
        }),
        None => AgentSource::Static(
            args.agents
                .iter()
                .map(|spec| {
                    let (name, addr) = spec
                        .split_once('=')
                        .with_context(|| format!("--agent {spec:?} is not NAME=HOST:PORT"))?;
                    let addr =
                        addr.parse().with_context(|| format!("--agent {spec:?}: bad address"))?;
                    anyhow::Ok((name.to_owned(), addr))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    let config = ControllerConfig {
        socket,
        default_pool: args.default_pool.clone(),
        default_node: args.default_node.clone(),
        agents,
        agent_server_name: args.agent_server_name.clone(),
        tls: args.tls.files(),
        lease: args.leader_elect.then(|| LeaseConfig {
            namespace: args.namespace.clone(),
            name: args.lease_name.clone(),
            identity: args.identity.clone(),
        }),
        identity: args.identity.clone(),
        health_listen: args.health.health_listen,
        metrics_listen: args.metrics_listen,
    };
    // The API server is needed for discovery, the Lease and signing; with it, notices
    // become Events.
    let client = match config.needs_kubernetes() || args.signing_ca_key.is_some() {
        true => Some(kube::Client::try_default().await.context("connecting to Kubernetes")?),
        false => None,
    };
    let signer = match (&args.signing_ca_key, &client) {
        (Some(key), Some(client)) => {
            let selector =
                args.node_pod_selector.as_ref().or(args.discover_agents.as_ref()).context(
                    "signing node certificates needs --node-pod-selector (or --discover-agents)",
                )?;
            let ca =
                SigningCa::from_files(args.signing_ca_cert.as_ref().unwrap_or(&args.tls.ca), key)
                    .context("loading the CA that signs node agent certificates")?;
            let identity = args
                .tls
                .files()
                .common_name()?
                .context("the controller's certificate has no common name (its identity)")?;
            let config = SignerConfig {
                namespace: args.namespace.clone(),
                service_account: args.node_service_account.clone(),
                pod_selector: selector.clone(),
                controller_identity: identity,
                max_lifetime: MAX_LIFETIME,
            };
            Some(Signer::new(client.clone(), ca, config))
        }
        _ => None,
    };
    qsd_csi_controller::run::run(config, client, signer, stop).await?;
    Ok(())
}
