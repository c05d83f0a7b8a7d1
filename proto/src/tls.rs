//! The PEM files each side of the agent's mutual TLS is configured with, and the client side
//! of it: what the controller (or a test) needs to call a node agent. The agent's server side,
//! with its authorization, is the node plugin's (`qsd_node::tls`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tonic::transport::{Channel, Endpoint};

use crate::agent::agent_client::AgentClient;

/// How long connecting to an agent may take: a node that is down (its address silent) fails
/// the call in this time, not after the kernel's minutes of SYN retries.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("read TLS file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable certificate or key.
    #[error("{} holds no readable {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// The parse error, when there is one.
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    /// The files do not make a TLS configuration (a key that does not match its certificate,
    /// a CA certificate rustls cannot use).
    #[error("{what}")]
    Config {
        /// What was being configured.
        what: String,
        /// Why rustls refused it.
        #[source]
        source: rustls::Error,
    },
    /// A node name that cannot be a TLS server name.
    #[error("{name:?} cannot name a TLS server")]
    ServerName {
        /// The name.
        name: String,
        /// Why not.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// A channel to an agent could not be configured or connected.
    #[error("{what}")]
    Transport {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: tonic::transport::Error,
    },
}

/// This side's certificate and key, and the CA that signs the other side's, all PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate (PEM).
    pub cert: PathBuf,
    /// This side's private key (PEM).
    pub key: PathBuf,
    /// The cluster's CA certificate (PEM): the other side's certificate must chain to it.
    pub ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Every certificate in a PEM file (a chain: leaf first; or a CA bundle).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { path: path.to_owned(), what: "certificate", source };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(Some(e)))?;
    if certs.is_empty() {
        return Err(pem(None));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        source: Some(e),
    })
}

/// The common name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(name)
}

/// The crypto provider of both sides of the agent's TLS (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What shows that a file was replaced or rewritten: its device, inode, size and modification
/// time (a Secret volume swaps a symbolic link to new files; a renewal may rewrite in place).
type Stamp = (u64, u64, u64, Option<SystemTime>);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.len(), m.modified().ok()))
}

/// This side's certificate and key as their files hold them now: read again when either file
/// has changed, so every new connection presents the current certificate (a renewal by
/// cert-manager or Helm replaces the files, and a connection made later with the old, expired
/// certificate would be refused). A connection made before keeps its own.
#[derive(Debug)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<([Option<Stamp>; 2], Arc<CertifiedKey>)>,
}

impl FileCert {
    fn open(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = [stamp(cert), stamp(key)];
        let loaded = Self::load(cert, key)?;
        Ok(FileCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            loaded: Mutex::new((stamps, loaded)),
        })
    }

    fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = read_certificates(cert)?;
        let config = |source| TlsError::Config {
            what: format!("{} and {} are not a usable pair", cert.display(), key.display()),
            source,
        };
        CertifiedKey::from_der(chain, read_key(key)?, &provider()).map(Arc::new).map_err(config)
    }

    /// The pair to present now: read again if a file changed. A pair that cannot be read
    /// (a renewal half written) leaves the last good one in use, and is tried again next time.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamps = [stamp(&self.cert), stamp(&self.key)];
        if stamps != loaded.0 {
            match Self::load(&self.cert, &self.key) {
                Ok(pair) => {
                    tracing::info!(cert = %self.cert.display(), "presenting the renewed certificate from now on");
                    *loaded = (stamps, pair);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the certificate's files changed but cannot be used yet; the previous one stays")
                }
            }
        }
        loaded.1.clone()
    }
}

impl rustls::client::ResolvesClientCert for FileCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl TlsFiles {
    /// The client's TLS configuration: servers verified against the CA file, this side's
    /// certificate from its files as they are at each handshake.
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certificates(&self.ca)? {
            roots.add(ca).map_err(|source| TlsError::Config {
                what: format!("the CA certificate in {} is unusable", self.ca.display()),
                source,
            })?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Config { what: "TLS protocol versions".into(), source })?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(FileCert::open(&self.cert, &self.key)?));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The common name of this side's certificate (the controller's identity).
    pub fn common_name(&self) -> Result<Option<String>, TlsError> {
        Ok(read_certificates(&self.cert)?.first().and_then(|c| common_name(c)))
    }

    /// The endpoint of the agent at `addr`, and the connector that makes each of its
    /// connections: TCP (bounded by [`AGENT_CONNECT_TIMEOUT`]), then TLS verifying that the
    /// agent's certificate names `server_name` and presenting this side's current one. (tonic's
    /// own TLS takes the certificate once, as bytes: a renewal would need a new channel.)
    fn endpoint(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<(Endpoint, AgentConnector), TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|source| TlsError::ServerName { name: server_name.to_owned(), source })?;
        let tls = tokio_rustls::TlsConnector::from(self.client_config()?);
        let connector = AgentConnector { addr, name, tls };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| TlsError::Transport { what: format!("agent at {addr}"), source })?;
        Ok((endpoint, connector))
    }

    /// A channel to the agent at `addr` whose certificate must name `server_name`, connected
    /// on first use (a node that is down must not keep its caller from starting).
    pub fn lazy_channel(&self, addr: SocketAddr, server_name: &str) -> Result<Channel, TlsError> {
        let (endpoint, connector) = self.endpoint(addr, server_name)?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

/// Makes a channel's connections to one agent (see [`TlsFiles::endpoint`]).
#[derive(Clone)]
struct AgentConnector {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<http::Uri> for AgentConnector {
    type Response = Connected;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Connected>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = tokio::net::TcpStream::connect(this.addr);
            let tcp =
                tokio::time::timeout(AGENT_CONNECT_TIMEOUT, connect).await.map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {} timed out", this.addr),
                    )
                })??;
            tcp.set_nodelay(true)?;
            let stream = this.tls.connect(this.name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Connects to a node's agent at `addr` now, verifying that its certificate names
/// `server_name`.
pub async fn connect_agent(
    addr: SocketAddr,
    server_name: &str,
    tls: &TlsFiles,
) -> Result<AgentClient<Channel>, TlsError> {
    let (endpoint, connector) = tls.endpoint(addr, server_name)?;
    let channel = endpoint.connect_with_connector(connector).await.map_err(|source| {
        TlsError::Transport { what: format!("connect to the agent at {addr}"), source }
    })?;
    Ok(AgentClient::new(channel))
}
