//! The node agent's TLS server: mutual TLS, then authorization on the client's identity.
//!
//! ```text
//!   TCP accept ─► TLS handshake (own task, HANDSHAKE_TIMEOUT)
//!                  · client certificate must chain to the cluster CA, for client auth
//!                  · our certificate comes from ServingCert: replaced on renewal, used from the
//!                    next handshake on (open connections keep theirs)
//!              ─► tonic ─► Authorize: the certificate's CN must be the controller identity,
//!                                      else PERMISSION_DENIED (every RPC, streaming included)
//!              ─► AgentService
//! ```
//! A node's own certificate is for server auth only, so it fails the handshake as a client. The
//! name check stands behind that for certificates of the same CA made for client auth: only the
//! controller's name gets in.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use qsd_csi_proto::agent::agent_server::AgentServer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use crate::agent::AgentService;
use crate::engine::EngineCore;
use crate::error::{Error, Result};

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (e.g. out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The certificate the agent presents; replaceable while the agent serves (renewal).
#[derive(Debug, Clone)]
pub struct ServingCert(Arc<RwLock<Arc<CertifiedKey>>>);

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>> {
    if chain.is_empty() {
        return Err(Error::Tls {
            what: "the agent's certificate file is empty".into(),
            source: None,
        });
    }
    CertifiedKey::from_der(chain, key, &qsd_csi_proto::tls::provider())
        .map(Arc::new)
        .map_err(|e| Error::tls("the agent's certificate and key do not make a usable pair", e))
}

impl ServingCert {
    /// Serves `chain` (leaf first) with `key`; refused if the key does not match the leaf.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self> {
        Ok(ServingCert(Arc::new(RwLock::new(certified(chain, key)?))))
    }

    /// Serves `chain` and `key` from the next handshake on.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<()> {
        let fresh = certified(chain, key)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The leaf certificate served now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current().cert[0].clone()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the agent serves with.
#[derive(Debug, Clone)]
pub struct AgentTls {
    /// This node's certificate.
    pub cert: ServingCert,
    /// The CA certificates a client's certificate must chain to.
    pub client_ca: Vec<CertificateDer<'static>>,
    /// The one identity (certificate CN) allowed to call: the controller's.
    pub controller_identity: String,
}

impl AgentTls {
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.client_ca {
            roots
                .add(ca.clone())
                .map_err(|e| Error::tls("the cluster CA certificate is unusable", e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            qsd_csi_proto::tls::provider(),
        )
        .build()
        .map_err(|e| Error::tls("the cluster CA cannot verify clients", e))?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(qsd_csi_proto::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::tls("TLS protocol versions", e))?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(self.cert.clone()));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The common name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(name)
}

/// Lets a call through only when the client's certificate names the controller.
#[derive(Debug, Clone)]
pub struct Authorize {
    controller: Arc<str>,
}

impl Authorize {
    /// Admits `controller_identity` only.
    pub fn new(controller_identity: &str) -> Self {
        Authorize { controller: controller_identity.into() }
    }

    /// Why the caller of `request` is refused, or `None` when it is the controller.
    fn refusal<T>(&self, request: &Request<T>) -> Option<(String, Option<std::net::SocketAddr>)> {
        let peer = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr());
        let presented = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| common_name(c)))
            .map(|cn| cn.unwrap_or_else(|| "(no common name)".into()));
        match presented {
            Some(name) if *name == *self.controller => None,
            Some(name) => Some((name, peer)),
            None => Some(("(no client certificate)".into(), peer)),
        }
    }
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.refusal(&request) {
            None => Ok(request),
            Some((presented, peer)) => {
                tracing::warn!(presented, ?peer, allowed = %self.controller, "refused a call to the node agent: the client is not the controller");
                Err(Status::permission_denied(format!(
                    "the node agent serves only {:?}; the client certificate names {presented:?}",
                    self.controller
                )))
            }
        }
    }
}

/// Aborts the task when dropped (the accept loop ends with the server).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Handshaken = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepts connections and hands over those whose handshake completes; a slow or refused
/// handshake holds up nobody else.
async fn accept(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ready: tokio::sync::mpsc::Sender<std::io::Result<Handshaken>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a node agent connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = ready.send(Ok(stream)).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused a TLS connection to the node agent")
                }
                Err(_) => tracing::warn!(%peer, "a TLS handshake with the node agent timed out"),
            }
        });
    }
}

/// Serves the agent on `listener` with mutual TLS and authorization until `shutdown` resolves.
pub async fn serve_agent(
    engine: Arc<EngineCore>,
    listener: tokio::net::TcpListener,
    tls: &AgentTls,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
    let (ready, incoming) = tokio::sync::mpsc::channel(32);
    let _accepting = AbortOnDrop(tokio::spawn(accept(listener, acceptor, ready)));
    // The stop ends the event watches too: a graceful stop waits for every open stream.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let agent = AgentService::ending_with(engine, stopping);
    let service = tonic::service::interceptor::InterceptedService::new(
        qsd_csi_proto::failures::logged(AgentServer::new(agent)),
        Authorize::new(&tls.controller_identity),
    );
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            shutdown,
        )
        .await
        .map_err(|source| {
            qsd_csi_proto::transport::TransportError::Server { what: "agent server", source }.into()
        })
}
