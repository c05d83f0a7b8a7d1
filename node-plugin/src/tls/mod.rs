//! Mutual TLS between the controller and the node agents (rustls, through tonic).
//!
//! ```text
//!   controller ── client cert: CN = controller identity ──► node agent (server.rs)
//!              ◄── server cert: CN = DNS name = the node ──     · CA-signed, for client auth
//!      checks the agent it reached is the node it meant        · CN is the controller's, else
//!                                                                PERMISSION_DENIED
//! ```
//! There is no plaintext or server-only-TLS mode: the agent can create and delete volumes.
//! A node's certificate comes from files (`--tls-cert`/`--tls-key`, e.g. made with
//! `qsd-csi certs sign-node`) or from the cluster (`--tls-bootstrap`, [`bootstrap`]: a
//! CertificateSigningRequest the controller signs after checking the node plugin pod's token),
//! renewed into the running server before it expires. The threat model is in
//! `docs/security.md`.

pub mod bootstrap;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qsd_csi_proto::agent::agent_client::AgentClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use server::{common_name, serve_agent, AgentTls, Authorize, ServingCert, HANDSHAKE_TIMEOUT};

use crate::error::{Error, Result};

/// This side's certificate and key, and the CA that signs the other side's, all PEM files.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsFiles {
    /// This side's certificate (PEM).
    #[arg(long = "tls-cert", value_name = "FILE")]
    pub cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE")]
    pub key: PathBuf,
    /// The cluster's CA certificate (PEM): the other side's certificate must chain to it.
    #[arg(long = "tls-ca", value_name = "FILE")]
    pub ca: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io("read TLS file", path, e))
}

/// Every certificate in a PEM file (a chain: leaf first; or a CA bundle).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::tls(format!("{} holds no readable certificate", path.display()), e))?;
    if certs.is_empty() {
        return Err(Error::Tls {
            what: format!("{} holds no certificate", path.display()),
            source: None,
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(&read(path)?)
        .map_err(|e| Error::tls(format!("{} holds no readable private key", path.display()), e))
}

impl TlsFiles {
    fn identity(&self) -> Result<Identity> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }

    fn ca(&self) -> Result<Certificate> {
        Ok(Certificate::from_pem(read(&self.ca)?))
    }

    /// The agent's server side from these files: this certificate, clients from this CA,
    /// calls from `controller_identity` only.
    pub fn agent(&self, controller_identity: &str) -> Result<AgentTls> {
        Ok(AgentTls {
            cert: ServingCert::new(read_certificates(&self.cert)?, read_key(&self.key)?)?,
            client_ca: read_certificates(&self.ca)?,
            controller_identity: controller_identity.to_owned(),
        })
    }

    /// A client's configuration for a node whose certificate names `server_name`.
    pub fn client(&self, server_name: &str) -> Result<ClientTlsConfig> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }
}

/// How a node agent gets its certificate, and whom it obeys.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentTlsArgs {
    /// The cluster's CA certificate(s) (PEM): the controller's certificate must chain to it.
    #[arg(long = "tls-ca", value_name = "FILE")]
    pub ca: PathBuf,
    /// This node's certificate (PEM), its DNS name the node's name; unless --tls-bootstrap.
    #[arg(
        long = "tls-cert",
        value_name = "FILE",
        requires = "key",
        required_unless_present = "bootstrap"
    )]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Obtain this node's certificate from the controller, and renew it before it expires,
    /// through a Kubernetes CertificateSigningRequest (signer qsd.csi.dev/node-agent) made with
    /// the node plugin pod's service account. Key and certificate are kept in
    /// <state-dir>/tls.
    #[arg(long = "tls-bootstrap", conflicts_with_all = ["cert", "key"])]
    pub bootstrap: bool,
    /// The only identity (client certificate CN) the agent serves.
    #[arg(long, value_name = "NAME", default_value = qsd_csi_proto::identity::DEFAULT_CONTROLLER_IDENTITY)]
    pub controller_identity: String,
}

fn transport(what: &'static str) -> impl Fn(tonic::transport::Error) -> Error {
    move |e| Error::Transport(format!("{what}: {e}"))
}

/// Connects to a node's agent at `addr`, verifying that its certificate names `server_name`.
pub async fn connect_agent(
    addr: SocketAddr,
    server_name: &str,
    tls: &TlsFiles,
) -> Result<AgentClient<Channel>> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(transport("agent address"))?
        .tls_config(tls.client(server_name)?)
        .map_err(transport("agent TLS configuration"))?
        .connect()
        .await
        .map_err(transport("connect to agent"))?;
    Ok(AgentClient::new(channel))
}
