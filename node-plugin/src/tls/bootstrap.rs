//! A node agent's certificate from the cluster: a CertificateSigningRequest that the controller
//! approves and signs.
//!
//! ```text
//!   node plugin:  new P-256 key ─► CSR (CN = DNS name = node) ─► certificates.k8s.io/v1 CSR,
//!                 signer qsd.csi.dev/node-agent, made with the pod's service-account token:
//!                 the API server records who asked (service account, pod, node)
//!   controller:   the requester is a node plugin pod running on that very node? ─► approve, sign
//!                 (otherwise Denied, with the reason on the CSR)
//!   node plugin:  certificate ─► <state-dir>/tls/agent.{crt,key} (0600) ─► the agent serves it;
//!                 renewed at two thirds of its life, into the running server (no restart: the
//!                 daemon and every attachment stay as they are)
//! ```
//! The key never leaves the node. A certificate kept on disk is served again after a restart
//! while it has more than a third of its life left.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use qsd_csi_proto::identity::{valid_node_name, AGENT_SIGNER};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{common_name, read_certificates, read_key, ServingCert};
use crate::error::{Error, Result};
use crate::pool::store;

/// The agent's key in the certificate directory.
pub const KEY_FILE: &str = "agent.key";
/// The agent's certificate chain (leaf first) in the certificate directory.
pub const CERT_FILE: &str = "agent.crt";
/// The lifetime a node asks for; the controller may cap it.
pub const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a node waits for the controller to sign one request.
pub const SIGNATURE_WAIT: Duration = Duration::from_secs(5 * 60);
/// How often a node looks at its pending request (poll_interval).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// First pause before asking again after a failed request (doubling, up to `RETRY_MAX`).
pub const RETRY_BACKOFF: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(5 * 60);

/// A certificate and its key, ready to serve.
pub type Issued = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Obtains and renews one node's agent certificate through the Kubernetes API.
#[derive(Clone)]
pub struct Bootstrap {
    client: kube::Client,
    node: String,
    dir: PathBuf,
    lifetime: Duration,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap").field("node", &self.node).field("dir", &self.dir).finish()
    }
}

/// When a certificate is due for renewal: two thirds into its validity. `None` if unreadable.
pub fn renewal_time(leaf: &[u8]) -> Option<SystemTime> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    let from = u64::try_from(cert.validity().not_before.timestamp()).ok()?;
    let until = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let due = from + until.saturating_sub(from) * 2 / 3;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(due))
}

/// Checks that `chain` was issued to `node` for `key` (the key matches the leaf).
fn check_issued(
    node: &str,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
) -> Result<()> {
    ServingCert::new(chain.to_vec(), key.clone_key())?;
    match chain.first().and_then(|leaf| common_name(leaf)) {
        Some(name) if name == node => Ok(()),
        other => Err(Error::Tls {
            what: format!("the agent certificate names {other:?}, not this node {node:?}"),
            source: None,
        }),
    }
}

/// The certificate kept in `dir`, if it is `node`'s, matches its key, and is not yet due for
/// renewal.
pub fn kept(dir: &Path, node: &str) -> Option<Issued> {
    let chain = read_certificates(&dir.join(CERT_FILE)).ok()?;
    let key = read_key(&dir.join(KEY_FILE)).ok()?;
    check_issued(node, &chain, &key).ok()?;
    (SystemTime::now() < renewal_time(&chain[0])?).then_some((chain, key))
}

impl Bootstrap {
    /// Certificates for `node`, kept in `dir` (created, 0700).
    pub fn new(client: kube::Client, node: &str, dir: &Path) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        if !valid_node_name(node) {
            return Err(Error::invalid(
                "node name",
                format!("{node:?} cannot be named by a certificate (a lowercase DNS name)"),
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("create the certificate directory", dir, e))?;
        Ok(Bootstrap { client, node: node.to_owned(), dir: dir.to_owned(), lifetime: LIFETIME })
    }

    /// Asks for certificates valid for `lifetime` (at least 10 minutes, the API's minimum).
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime.max(Duration::from_secs(600));
        self
    }

    /// The certificate to serve at start: the kept one, else a new one from the cluster,
    /// asked again (with back-off) until the controller signs one.
    pub async fn initial(&self) -> Issued {
        if let Some(kept) = kept(&self.dir, &self.node) {
            tracing::info!(dir = %self.dir.display(), "serving the node agent's kept certificate");
            return kept;
        }
        let mut backoff = RETRY_BACKOFF;
        loop {
            match self.request().await {
                Ok(issued) => return issued,
                Err(e) => {
                    tracing::warn!(error = %e.with_causes(), retry_in = ?backoff, "obtaining the node agent's certificate failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Renews `cert` at two thirds of its life, for as long as the agent runs; a failed renewal
    /// is asked again with back-off while the old certificate still serves.
    pub async fn keep_renewed(self, cert: ServingCert) {
        let mut backoff = RETRY_BACKOFF;
        loop {
            let due = renewal_time(&cert.leaf()).unwrap_or_else(SystemTime::now);
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            match self.request().await.and_then(|(chain, key)| cert.replace(chain, key)) {
                Ok(()) => {
                    tracing::info!(node = self.node, "renewed the node agent's certificate");
                    backoff = RETRY_BACKOFF;
                }
                Err(e) => {
                    tracing::warn!(error = %e.with_causes(), retry_in = ?backoff, "renewing the node agent's certificate failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One request: a new key, a CSR, the controller's signature, the files on disk.
    pub async fn request(&self) -> Result<Issued> {
        let key = rcgen::KeyPair::generate().map_err(|e| Error::tls("generating a key", e))?;
        let mut params = rcgen::CertificateParams::new(vec![self.node.clone()])
            .map_err(|e| Error::tls("the certificate request's names", e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, self.node.as_str());
        let pem = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| Error::tls("making the certificate request", e))?;
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let short: String = self.node.chars().take(40).collect();
        let object = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(format!("qsd-csi-agent-{}-", short.trim_end_matches('.'))),
                ..Default::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: AGENT_SIGNER.to_owned(),
                usages: Some(vec!["digital signature".into(), "server auth".into()]),
                expiration_seconds: i32::try_from(self.lifetime.as_secs()).ok(),
                ..Default::default()
            },
            status: None,
        };
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| Error::tls("creating the CertificateSigningRequest", e))?;
        let name = created.metadata.name.unwrap_or_default();
        tracing::info!(
            csr = name,
            signer = AGENT_SIGNER,
            "asked the cluster for this node agent's certificate"
        );
        let chain_pem = self.wait_for_signature(&api, &name).await?;
        let chain = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::tls(format!("the certificate in {name}"), e))?;
        let key_pem = key.serialize_pem();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        check_issued(&self.node, &chain, &key)?;
        store::write_bytes(&self.dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        store::write_bytes(&self.dir, CERT_FILE, &chain_pem, 0o644)?;
        tracing::info!(csr = name, "the controller signed this node agent's certificate");
        Ok((chain, key))
    }

    async fn wait_for_signature(
        &self,
        api: &Api<CertificateSigningRequest>,
        name: &str,
    ) -> Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + SIGNATURE_WAIT;
        loop {
            let csr = api.get(name).await.map_err(|e| {
                Error::tls(format!("reading the CertificateSigningRequest {name}"), e)
            })?;
            let status = csr.status.unwrap_or_default();
            let refused = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True");
            if let Some(c) = refused {
                return Err(Error::Tls {
                    what: format!(
                        "the cluster refused this node agent's certificate request {name} ({}): {}",
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    ),
                    source: None,
                });
            }
            if let Some(ByteString(pem)) = status.certificate.filter(|c| !c.0.is_empty()) {
                return Ok(pem);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Tls {
                    what: format!(
                        "nobody signed the certificate request {name} within {SIGNATURE_WAIT:?}: is the qsd-csi controller running, with the signer enabled?"
                    ),
                    source: None,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `cn` valid from `from` to `until` (seconds from now), its key, and
    /// another key.
    fn cert(cn: &str, from: i64, until: i64) -> (String, String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![cn.to_owned()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params.self_signed(&key).expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        (cert.pem(), key.serialize_pem(), other.serialize_pem())
    }

    fn keep(dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join(CERT_FILE), cert).expect("cert");
        std::fs::write(dir.join(KEY_FILE), key).expect("key");
    }

    #[test]
    fn a_certificate_is_renewed_two_thirds_into_its_life() {
        let (pem, _, _) = cert("w1", -3600, 2 * 3600);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("der");
        let due = renewal_time(&der).expect("readable");
        let now = SystemTime::now();
        let in_an_hour = now + Duration::from_secs(3600);
        let slack = Duration::from_secs(5);
        assert!(due > in_an_hour - slack && due < in_an_hour + slack, "{due:?}");
        assert_eq!(renewal_time(b"not a certificate"), None);
    }

    #[test]
    fn a_kept_certificate_is_served_again_only_if_it_is_this_nodes_matches_its_key_and_is_young() {
        let dir = tempfile::tempdir().expect("dir");
        let (pem, key, other) = cert("w1", -60, 30 * 86400);
        keep(dir.path(), &pem, &key);
        assert!(kept(dir.path(), "w1").is_some(), "a young certificate of this node");
        assert!(kept(dir.path(), "w2").is_none(), "another node's certificate");
        keep(dir.path(), &pem, &other);
        assert!(kept(dir.path(), "w1").is_none(), "a key that does not match");
        let (old, old_key, _) = cert("w1", -3 * 86400, 86400);
        keep(dir.path(), &old, &old_key);
        assert!(kept(dir.path(), "w1").is_none(), "past two thirds of its life: ask again");
        std::fs::remove_file(dir.path().join(KEY_FILE)).expect("rm");
        assert!(kept(dir.path(), "w1").is_none(), "no key");
    }
}
