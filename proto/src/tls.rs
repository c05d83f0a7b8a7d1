//! The PEM files each side of the agent's mutual TLS is configured with, and the client side
//! of it: what the controller (or a test) needs to call a node agent. The agent's server side,
//! with its authorization, is the node plugin's (`qsd_node::tls`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

impl TlsFiles {
    /// A client's configuration for a node whose certificate names `server_name`.
    pub fn client(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .domain_name(server_name))
    }

    /// The common name of this side's certificate (the controller's identity).
    pub fn common_name(&self) -> Result<Option<String>, TlsError> {
        Ok(read_certificates(&self.cert)?.first().and_then(|c| common_name(c)))
    }

    /// The endpoint of the agent at `addr`, whose certificate must name `server_name`.
    fn endpoint(&self, addr: SocketAddr, server_name: &str) -> Result<Endpoint, TlsError> {
        let config = self.client(server_name)?;
        Endpoint::from_shared(format!("https://{addr}"))
            .map(|e| e.connect_timeout(AGENT_CONNECT_TIMEOUT))
            .and_then(|e| e.tls_config(config))
            .map_err(|source| TlsError::Transport { what: format!("agent at {addr}"), source })
    }

    /// A channel to the agent at `addr` whose certificate must name `server_name`, connected
    /// on first use (a node that is down must not keep its caller from starting).
    pub fn lazy_channel(&self, addr: SocketAddr, server_name: &str) -> Result<Channel, TlsError> {
        Ok(self.endpoint(addr, server_name)?.connect_lazy())
    }
}

/// Connects to a node's agent at `addr` now, verifying that its certificate names
/// `server_name`.
pub async fn connect_agent(
    addr: SocketAddr,
    server_name: &str,
    tls: &TlsFiles,
) -> Result<AgentClient<Channel>, TlsError> {
    let channel = tls.endpoint(addr, server_name)?.connect().await.map_err(|source| {
        TlsError::Transport { what: format!("connect to the agent at {addr}"), source }
    })?;
    Ok(AgentClient::new(channel))
}
