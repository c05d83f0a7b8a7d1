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

use std::path::PathBuf;

pub use qsd_csi_proto::tls::{
    common_name, connect_agent, read_certificates, read_key, TlsError, TlsFiles,
};

pub use server::{serve_agent, AgentTls, Authorize, ServingCert, HANDSHAKE_TIMEOUT};

use crate::error::Result;

/// The agent's server side from files: this certificate, clients from this CA, calls from
/// `controller_identity` only.
pub fn agent_from_files(files: &TlsFiles, controller_identity: &str) -> Result<AgentTls> {
    Ok(AgentTls {
        cert: ServingCert::new(read_certificates(&files.cert)?, read_key(&files.key)?)?,
        client_ca: read_certificates(&files.ca)?,
        controller_identity: controller_identity.to_owned(),
    })
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
