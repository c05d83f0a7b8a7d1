//! The cluster controller as a library entry point: [`ControllerConfig`] in, CSI Identity and
//! Controller served until the stop future resolves, and every background task stopped and
//! joined before [`run`] returns.
//!
//! ```text
//!   run ─┬─ CSI server (Identity + Controller) on the unix socket ─┐
//!        ├─ health server (optional)                               ├─ until stop
//!        └─ Background ─┬─ discovery   (list agents every REFRESH) │
//!                       ├─ relay       (node events → Events, while leading)
//!                       ├─ election    (the Lease; released on stop)
//!                       ├─ signer      (node agent CSRs, while leading)
//!                       └─ follower    (volumes following their pods, while leading)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use qsd_csi_proto::csi::identity_server::IdentityServer;
use qsd_csi_proto::tls::TlsFiles;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agents::{self, Agents, NodeAgent};
use crate::discovery::{self, Discovery};
use crate::error::ControllerError;
use crate::events::{Events, Reporter};
use crate::grow::{AutoGrow, GrowMetrics};
use crate::identity::{AlwaysReady, IdentityService};
use crate::lease::{Election, LeaseConfig};
use crate::serve::Latch;
use crate::signer::Signer;
use crate::{relay, ControllerService, PLUGIN_NAME};

/// Where the controller finds its node agents.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// A fixed list: node name and agent address.
    Static(Vec<(String, SocketAddr)>),
    /// Node plugin pods found through the Kubernetes API.
    Discover(Discovery),
}

/// Everything the cluster controller runs with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The CSI socket.
    pub socket: PathBuf,
    /// Where volumes go when a request names no pool.
    pub default_pool: String,
    /// Where volumes go when a request names no node (default: the first agent).
    pub default_node: Option<String>,
    /// The node agents.
    pub agents: AgentSource,
    /// The name every agent's certificate carries; by default each names its node.
    pub agent_server_name: Option<String>,
    /// The controller's client certificate, key, and the agents' CA.
    pub tls: TlsFiles,
    /// With replicas: the Lease that picks the one relaying node events and signing.
    pub lease: Option<LeaseConfig>,
    /// This replica's name in the Events it posts.
    pub identity: String,
    /// Where to serve the gRPC health service, if anywhere.
    pub health_listen: Option<SocketAddr>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// The controller's metrics: every gRPC call, and auto-expansions.
#[derive(Debug, Clone, Default)]
pub struct ControllerMetrics {
    /// Auto-expansions made and refused.
    pub grow: GrowMetrics,
}

impl ControllerMetrics {
    /// A registry with every family of the controller.
    pub fn registry(&self) -> Result<prometheus::Registry, RunError> {
        let registry = qsd_csi_proto::metrics::registry();
        self.grow.register(&registry).map_err(|e| RunError::Metrics(e.to_string()))?;
        Ok(registry)
    }
}

impl ControllerConfig {
    /// Whether the Kubernetes API is needed (discovery, the Lease).
    pub fn needs_kubernetes(&self) -> bool {
        matches!(self.agents, AgentSource::Discover(_)) || self.lease.is_some()
    }

    /// How a node's agent is reached: over mutual TLS, its certificate naming the node (or
    /// the one shared server name).
    pub fn connector(&self) -> impl Fn(&str, SocketAddr) -> Result<NodeAgent, ControllerError> {
        let (server_name, tls) = (self.agent_server_name.clone(), self.tls.clone());
        move |node, addr| agents::remote(addr, server_name.as_deref().unwrap_or(node), &tls)
    }
}

type Connect = Arc<dyn Fn(&str, SocketAddr) -> Result<NodeAgent, ControllerError> + Send + Sync>;

/// The controller's background tasks, owned: [`Background::stop`] ends and joins them all.
#[derive(Debug)]
pub struct Background {
    stop: Latch,
    /// Held while no election runs: the relay runs while this says true, and ends when it is
    /// dropped.
    leading: Option<watch::Sender<bool>>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    /// Nothing running yet.
    pub fn new() -> Self {
        Background { stop: Latch::new(), leading: None, tasks: Vec::new() }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Lists the agents every [`discovery::REFRESH`] after the first listing (`known`).
    pub fn discover(
        &mut self,
        discovery: Discovery,
        client: kube::Client,
        agents: Agents,
        known: BTreeMap<String, SocketAddr>,
        connect: Connect,
    ) {
        let stop = self.stop.wait();
        self.spawn("discovery", async move {
            let mut known = known;
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(discovery::REFRESH) => {}
                    () = &mut stop => return,
                }
                if let Err(e) = discovery.refresh(client.clone(), &agents, &mut known, &|n: &str, a| connect(n, a)).await {
                    tracing::warn!(error = %e.with_causes(), "listing the node agents failed; keeping the last list");
                }
                agents.find_moved().await;
            }
        });
    }

    /// Campaigns for the Lease; returns whether this replica leads, as it changes.
    pub fn elect(&mut self, client: kube::Client, lease: LeaseConfig) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let stop = self.stop.wait();
        self.spawn("election", Election::new(client, lease).run(tx, stop));
        rx
    }

    /// Leads without an election (one replica).
    pub fn lead_alone(&mut self) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(true);
        self.leading = Some(tx);
        rx
    }

    /// Relays node events to `events` (and auto-expanding volumes' crossings to `grow`) while
    /// `leading`.
    pub fn relay(
        &mut self,
        agents: Agents,
        events: Events,
        grow: Option<AutoGrow>,
        leading: watch::Receiver<bool>,
    ) {
        let stop = self.stop.wait();
        self.spawn("relay", async move {
            tokio::select! {
                () = relay::run(agents, events, grow, leading) => {}
                () = stop => {}
            }
        });
    }

    /// Serves `registry` at `GET /metrics` on `addr` until stopped.
    pub async fn serve_metrics(
        &mut self,
        addr: SocketAddr,
        registry: prometheus::Registry,
    ) -> Result<(), RunError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| {
            qsd_csi_proto::transport::TransportError::Io {
                op: "listen for metrics scrapes on",
                path: addr.to_string().into(),
                source,
            }
        })?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let stop = self.stop.wait();
        self.spawn("metrics", async move {
            if let Err(e) = qsd_csi_proto::metrics::serve(listener, registry, stop).await {
                tracing::error!(error = %e, "the metrics server failed");
            }
        });
        Ok(())
    }

    /// Signs node agent certificates while `leading`.
    pub fn sign(&mut self, signer: Signer, leading: watch::Receiver<bool>) {
        let stop = self.stop.wait();
        self.spawn("signer", signer.run(leading, stop));
    }

    /// Moves volumes that follow their pods while `leading`.
    pub fn follow(&mut self, follower: crate::follow::Follower, leading: watch::Receiver<bool>) {
        let stop = self.stop.wait();
        self.spawn("follower", follower.run(leading, stop));
    }

    /// The names of the tasks running.
    pub fn running(&self) -> Vec<&'static str> {
        self.tasks.iter().filter(|(_, t)| !t.is_finished()).map(|(n, _)| *n).collect()
    }

    /// Stops every task and waits for each to end (the election releases the Lease first).
    pub async fn stop(mut self) {
        self.stop.set();
        self.leading = None;
        for (name, task) in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::warn!(task = name, error = %e, "a background task ended abnormally");
            }
        }
    }
}

impl Default for Background {
    fn default() -> Self {
        Background::new()
    }
}

/// Serves the cluster controller until `stop` resolves; `client` is the Kubernetes API (needed
/// when [`ControllerConfig::needs_kubernetes`]; with it, notices become Events). Node
/// certificates are signed by `signer`, if given.
pub async fn run(
    config: ControllerConfig,
    client: Option<kube::Client>,
    signer: Option<Signer>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let metrics = ControllerMetrics::default();
    let connect: Connect = Arc::new(config.connector());
    let agents = Agents::new(BTreeMap::new(), config.default_node.clone());
    let mut background = Background::new();
    match (&config.agents, &client) {
        (AgentSource::Discover(discovery), Some(client)) => {
            let mut known = BTreeMap::new();
            discovery
                .refresh(client.clone(), &agents, &mut known, &|n: &str, a| connect(n, a))
                .await?;
            background.discover(
                discovery.clone(),
                client.clone(),
                agents.clone(),
                known,
                connect.clone(),
            );
        }
        (AgentSource::Discover(_), None) => return Err(RunError::NeedsKubernetes("discovery")),
        (AgentSource::Static(list), _) => {
            let mut nodes = BTreeMap::new();
            for (name, addr) in list {
                nodes.insert(name.clone(), connect(name, *addr)?);
            }
            agents.replace(nodes);
        }
    }
    let events = match &client {
        Some(client) => Events::kubernetes(
            client.clone(),
            Reporter { controller: PLUGIN_NAME.to_owned(), instance: config.identity.clone() },
        ),
        None => Events::log_only(),
    };
    let leading = match (&config.lease, &client) {
        (Some(lease), Some(client)) => background.elect(client.clone(), lease.clone()),
        (Some(_), None) => return Err(RunError::NeedsKubernetes("leader election")),
        (None, _) => background.lead_alone(),
    };
    if let Some(signer) = signer {
        background.sign(signer, leading.clone());
    }
    let grow = client.as_ref().map(|client| {
        let grower = Arc::new(crate::grow::ClaimGrower::new(client.clone()));
        AutoGrow::new(grower, events.clone(), metrics.grow.clone())
    });
    background.relay(agents.clone(), events.clone(), grow, leading.clone());
    agents.find_moved().await;
    if let Some(addr) = config.metrics_listen {
        background.serve_metrics(addr, metrics.registry()?).await?;
    }
    tracing::info!(nodes = ?agents.nodes().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), "controller ready");
    let identity = IdentityService::new(Arc::new(AlwaysReady), true);
    let router =
        tonic::transport::Server::builder().add_service(IdentityServer::new(identity.clone()));
    let controller = ControllerService::new(agents.clone(), config.default_pool.clone())
        .with_events(events.clone());
    if let Some(client) = &client {
        let follower = crate::follow::Follower::new(
            client.clone(),
            agents.clone(),
            controller.clone(),
            events,
        );
        background.follow(follower, leading);
    }
    let router = crate::serve::controller_services(router, controller, agents);
    let served =
        crate::serve::csi_and_health(&config.socket, router, config.health_listen, identity, stop)
            .await;
    background.stop().await;
    served
}

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A feature that needs the Kubernetes API was asked for without it.
    #[error("{0} needs the Kubernetes API")]
    NeedsKubernetes(&'static str),
    /// Setting up the agents failed.
    #[error(transparent)]
    Controller(#[from] ControllerError),
    /// A server failed.
    #[error(transparent)]
    Transport(#[from] qsd_csi_proto::transport::TransportError),
    /// The metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(String),
}
