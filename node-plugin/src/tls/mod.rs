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
