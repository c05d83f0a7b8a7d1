//! Mutual TLS for the node agent (rustls, through tonic).
//!
//! ```text
//!   controller ── client cert (cluster CA) ──► node agent :port ── server cert (cluster CA)
//!              ◄── verifies the node's cert ──            └─ refuses clients without a cert
//!                  against the same CA                       the cluster's CA signed
//! ```
//! There is no plaintext or server-only-TLS mode: the agent can create and delete volumes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qsd_csi_proto::agent::agent_client::AgentClient;
use qsd_csi_proto::agent::agent_server::AgentServer;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

use crate::agent::AgentService;
use crate::engine::EngineCore;
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

impl TlsFiles {
    fn identity(&self) -> Result<Identity> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }

    fn ca(&self) -> Result<Certificate> {
        Ok(Certificate::from_pem(read(&self.ca)?))
    }

    /// The agent server's configuration: present our certificate, require a client certificate
    /// signed by the CA.
    pub fn server(&self) -> Result<ServerTlsConfig> {
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca()?)
            .client_auth_optional(false))
    }

    /// A client's configuration for a node whose certificate names `server_name`.
    pub fn client(&self, server_name: &str) -> Result<ClientTlsConfig> {
        Ok(ClientTlsConfig::new()
            .identity(self.identity()?)
            .ca_certificate(self.ca()?)
            .domain_name(server_name))
    }
}

fn transport(what: &'static str) -> impl Fn(tonic::transport::Error) -> Error {
    move |e| Error::Transport(format!("{what}: {e}"))
}

/// Serves the agent on `listener` with mutual TLS until `shutdown` resolves.
pub async fn serve_agent(
    engine: Arc<EngineCore>,
    listener: tokio::net::TcpListener,
    tls: &TlsFiles,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Server::builder()
        .tls_config(tls.server()?)
        .map_err(transport("agent TLS configuration"))?
        .add_service(AgentServer::new(AgentService::new(engine)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(transport("agent server"))
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
