//! Signs the node agents' certificates: the controller's side of
//! `qsd_node::tls::bootstrap`.
//!
//! ```text
//!   every SWEEP while leading: CSRs with spec.signerName = qsd.csi.dev/node-agent, undecided
//!     ─► the request (pure):   CSR signature valid; names exactly the node (CN, one DNS name);
//!                              usages within digital signature, key encipherment, server auth
//!     ─► the requester (pure): the node plugin's service account, its token bound to a pod:
//!                              the API server recorded the pod's name and uid and its node,
//!                              and that node is the one the certificate would name
//!     ─► the pod (API):        exists with that uid, runs on that node, carries the node
//!                              plugin's labels, is not being deleted
//!     ─► approved and signed:  CN = DNS name = node, server auth only, capped lifetime
//!     anything else ─► Denied, with the reason on the CSR (`kubectl get csr` shows it)
//! ```
//! So a node's credentials (its files, its pod's token) get a certificate naming that node and
//! no other, never the controller's name, and never one a client could present. The CA key is
//! in the controller's pod only, where this runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use qsd_csi_proto::identity::{valid_node_name, AGENT_SIGNER};
use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair, SanType};
use tokio::sync::watch;

/// How often pending requests are looked at.
pub const SWEEP: Duration = Duration::from_secs(2);
/// The longest life a node certificate gets (the node asks for a day).
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A signed certificate is valid from this long before signing (clocks differ).
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The API server's records of a bound service-account token's pod and node.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// See [`EXTRA_POD_NAME`].
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// See [`EXTRA_POD_NAME`].
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// What the signer fails on (a refused request is not an error: it is Denied).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A CA file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The CA certificate is unusable.
    #[error("the signing CA's certificate is unusable")]
    Ca(#[source] rcgen::Error),
    /// The CA key is unusable.
    #[error("the signing CA's key is unusable: it must be an ECDSA, Ed25519 or RSA key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----); `openssl pkcs8 -topk8 -nocrypt` converts others")]
    CaKey(#[source] rcgen::Error),
    /// Signing failed.
    #[error("signing the certificate failed")]
    Issue(#[source] rcgen::Error),
    /// The Kubernetes API did not do what was asked.
    #[error("the Kubernetes API failed to {what}")]
    Api {
        /// What was asked.
        what: String,
        /// The API's error.
        #[source]
        source: kube::Error,
    },
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> SignError {
    let what = what.into();
    move |source| SignError::Api { what, source }
}

/// The CA that signs node agent certificates.
pub struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa").finish_non_exhaustive()
    }
}

impl SigningCa {
    /// A CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, SignError> {
        let key = KeyPair::from_pem(key_pem).map_err(SignError::CaKey)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(SignError::Ca)?;
        Ok(SigningCa { issuer, cert_pem: cert_pem.to_owned() })
    }

    /// A CA from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, SignError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|source| SignError::Read { path: path.to_owned(), source })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// The agent certificate of `node` for `public_key`, valid for `lifetime` from now: PEM,
    /// the leaf then this CA's certificate. Names the node (CN and DNS name), for server
    /// auth only.
    pub fn issue(
        &self,
        node: &str,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<String, SignError> {
        let mut params =
            rcgen::CertificateParams::new(vec![node.to_owned()]).map_err(SignError::Issue)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, node);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let mut serial = [0u8; 16];
        serial.copy_from_slice(&uuid::Uuid::new_v4().into_bytes());
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let leaf = params.signed_by(public_key, &self.issuer).map_err(SignError::Issue)?;
        Ok(format!("{}{}", leaf.pem(), self.cert_pem.trim_start()))
    }
}

/// Who may ask, and for how long.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// The node plugin pods' namespace (and their service account's).
    pub namespace: String,
    /// The node plugin pods' service account.
    pub service_account: String,
    /// The node plugin pods' labels (`k=v,k2=v2`).
    pub pod_selector: String,
    /// The controller's identity: no node certificate may carry it.
    pub controller_identity: String,
    /// The longest life a certificate gets.
    pub max_lifetime: Duration,
}

/// A request that passed the checks that need no API call.
#[derive(Debug)]
pub struct Checked {
    /// The node the certificate will name.
    pub node: String,
    /// The pod (name, uid) whose token made the request.
    pub pod: (String, String),
    /// The lifetime to sign for.
    pub lifetime: Duration,
    public_key: rcgen::PublicKey,
}

fn one<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Result<&'a str, String> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Ok(value),
        _ => Err(format!(
            "the requester's token carries no {key}: the request must be made with the node plugin pod's own (bound) service-account token"
        )),
    }
}

/// Checks a request's requester and contents, without the API: whether it may be signed if
/// its pod checks out. `Err` is the reason to deny it.
pub fn check_request(
    spec: &CertificateSigningRequestSpec,
    config: &SignerConfig,
) -> Result<Checked, String> {
    if spec.signer_name != AGENT_SIGNER {
        return Err(format!("signer {:?} is not {AGENT_SIGNER:?}", spec.signer_name));
    }
    let expected = format!("system:serviceaccount:{}:{}", config.namespace, config.service_account);
    let username = spec.username.as_deref().unwrap_or_default();
    if username != expected {
        return Err(format!("requested by {username:?}; only {expected:?} may ask"));
    }
    let extra = spec.extra.clone().unwrap_or_default();
    let pod = (one(&extra, EXTRA_POD_NAME)?.to_owned(), one(&extra, EXTRA_POD_UID)?.to_owned());
    let node = one(&extra, EXTRA_NODE_NAME)?.to_owned();
    if !valid_node_name(&node) || node == config.controller_identity {
        return Err(format!("node {node:?} cannot be named by an agent certificate"));
    }
    let allowed = ["digital signature", "key encipherment", "server auth"];
    let usages = spec.usages.clone().unwrap_or_default();
    if !usages.iter().any(|u| u == "server auth")
        || usages.iter().any(|u| !allowed.contains(&u.as_str()))
    {
        return Err(format!("usages {usages:?}: an agent certificate is for server auth only"));
    }
    let pem =
        std::str::from_utf8(&spec.request.0).map_err(|_| "the request is not PEM".to_owned())?;
    let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        format!("the certificate request is unreadable or its signature wrong: {e}")
    })?;
    let subject: Vec<_> = csr.params.distinguished_name.iter().collect();
    let cn_only = match subject.as_slice() {
        [(rcgen::DnType::CommonName, rcgen::DnValue::Utf8String(cn))] => *cn == node,
        [(rcgen::DnType::CommonName, rcgen::DnValue::PrintableString(cn))] => cn.as_str() == node,
        _ => false,
    };
    if !cn_only {
        return Err(format!(
            "the request's subject {subject:?} must be exactly CN={node:?}, its pod's node"
        ));
    }
    let sans_ok = matches!(csr.params.subject_alt_names.as_slice(), [SanType::DnsName(n)] if n.as_str() == node);
    if !sans_ok {
        return Err(format!(
            "the request's alternative names {:?} must be exactly the DNS name {node:?}",
            csr.params.subject_alt_names
        ));
    }
    let eku_ok = csr
        .params
        .extended_key_usages
        .iter()
        .all(|u| *u == rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    if csr.params.is_ca != rcgen::IsCa::NoCa || !eku_ok {
        return Err("the request asks for more than a server certificate".to_owned());
    }
    let requested = spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(config.max_lifetime, Duration::from_secs);
    Ok(Checked {
        node,
        pod,
        lifetime: requested.min(config.max_lifetime),
        public_key: csr.public_key,
    })
}

/// Whether `labels` satisfy an equality selector (`k=v`, `k==v`, `k!=v`, comma-separated).
pub fn selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.split(',').map(str::trim).filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k.trim()).map(String::as_str) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k.trim()).map(String::as_str) == Some(v.trim_start_matches('=').trim())
        } else {
            labels.contains_key(term)
        }
    })
}

/// Checks the pod a request's token was bound to: `Err` is the reason to deny.
pub fn check_pod(
    pod: Option<&Pod>,
    checked: &Checked,
    config: &SignerConfig,
) -> Result<(), String> {
    let (name, uid) = &checked.pod;
    let Some(pod) = pod else {
        return Err(format!("pod {}/{name} does not exist", config.namespace));
    };
    let meta = &pod.metadata;
    if meta.uid.as_deref() != Some(uid.as_str()) {
        return Err(format!("pod {name} is not the pod the token was issued to (uid differs)"));
    }
    if meta.deletion_timestamp.is_some() {
        return Err(format!("pod {name} is being deleted"));
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.node_name.as_deref() != Some(checked.node.as_str()) {
        return Err(format!("pod {name} does not run on node {:?}", checked.node));
    }
    if spec.service_account_name.as_deref() != Some(config.service_account.as_str()) {
        return Err(format!("pod {name} does not run as {}", config.service_account));
    }
    if !selector_matches(&config.pod_selector, &meta.labels.clone().unwrap_or_default()) {
        return Err(format!(
            "pod {name} is not a qsd-csi node plugin pod ({})",
            config.pod_selector
        ));
    }
    Ok(())
}

/// Signs node agent certificates through the Kubernetes API.
pub struct Signer {
    csrs: Api<CertificateSigningRequest>,
    pods: Api<Pod>,
    ca: SigningCa,
    config: SignerConfig,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("config", &self.config).finish_non_exhaustive()
    }
}

fn condition(kind: &str, reason: &str, message: String) -> serde_json::Value {
    let condition = CertificateSigningRequestCondition {
        type_: kind.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_update_time: Some(Time(Timestamp::now())),
        last_transition_time: Some(Time(Timestamp::now())),
    };
    serde_json::json!({ "status": { "conditions": [condition] } })
}

/// Undecided: not denied or failed, and not yet signed (an approved request we did not sign
/// yet is signed on the next sweep).
fn undecided(csr: &CertificateSigningRequest) -> bool {
    let Some(status) = &csr.status else { return true };
    let decided =
        status.conditions.iter().flatten().any(|c| c.type_ == "Denied" || c.type_ == "Failed");
    !decided && status.certificate.as_ref().is_none_or(|c| c.0.is_empty())
}

impl Signer {
    /// A signer with `ca`, over `client`.
    pub fn new(client: kube::Client, ca: SigningCa, config: SignerConfig) -> Self {
        Signer {
            csrs: Api::all(client.clone()),
            pods: Api::namespaced(client, &config.namespace),
            ca,
            config,
        }
    }

    /// Decides every undecided request once; returns how many were signed.
    pub async fn sweep(&self) -> Result<usize, SignError> {
        let list = ListParams::default().fields(&format!("spec.signerName={AGENT_SIGNER}"));
        let csrs = self.csrs.list(&list).await.map_err(api("list certificate requests"))?;
        let mut signed = 0;
        for csr in csrs.items.into_iter().filter(undecided) {
            let name = csr.metadata.name.clone().unwrap_or_default();
            if self.decide(&name, &csr.spec).await? {
                signed += 1;
            }
        }
        Ok(signed)
    }

    async fn decide(
        &self,
        name: &str,
        spec: &CertificateSigningRequestSpec,
    ) -> Result<bool, SignError> {
        let checked = match check_request(spec, &self.config) {
            Ok(checked) => checked,
            Err(reason) => return self.deny(name, reason).await.map(|()| false),
        };
        let pod =
            self.pods.get_opt(&checked.pod.0).await.map_err(api("read the requesting pod"))?;
        if let Err(reason) = check_pod(pod.as_ref(), &checked, &self.config) {
            return self.deny(name, reason).await.map(|()| false);
        }
        let message = format!(
            "node plugin pod {}/{} on node {} verified by qsd-csi",
            self.config.namespace, checked.pod.0, checked.node
        );
        let approval = condition("Approved", "NodePluginVerified", message);
        self.csrs
            .patch_approval(name, &PatchParams::default(), &Patch::Merge(&approval))
            .await
            .map_err(api(format!("approve {name}")))?;
        let pem = self.ca.issue(&checked.node, &checked.public_key, checked.lifetime)?;
        let status =
            serde_json::json!({ "status": { "certificate": ByteString(pem.into_bytes()) } });
        self.csrs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(api(format!("sign {name}")))?;
        tracing::info!(csr = name, node = checked.node, lifetime = ?checked.lifetime, "signed a node agent certificate");
        Ok(true)
    }

    async fn deny(&self, name: &str, reason: String) -> Result<(), SignError> {
        tracing::warn!(csr = name, reason, "denied a node agent certificate request");
        let denial = condition("Denied", "NodePluginNotVerified", reason);
        self.csrs
            .patch_approval(name, &PatchParams::default(), &Patch::Merge(&denial))
            .await
            .map_err(api(format!("deny {name}")))?;
        Ok(())
    }

    /// Sweeps every [`SWEEP`] while `leading`, until `stop` resolves.
    pub async fn run(
        self,
        leading: watch::Receiver<bool>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            if !*leading.borrow() {
                continue;
            }
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, cause = ?std::error::Error::source(&e).map(ToString::to_string), "signing node agent certificates failed; trying again");
            }
        }
    }
}

#[cfg(test)]
#[path = "signer_tests.rs"]
mod tests;
