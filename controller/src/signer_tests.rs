//! Tests of [`super`].

use super::*;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn config() -> SignerConfig {
    SignerConfig {
        namespace: "qsd".into(),
        service_account: "qsd-csi-node".into(),
        pod_selector: "app.kubernetes.io/component=node,app.kubernetes.io/instance=qsd".into(),
        controller_identity: "qsd-csi-controller".into(),
        max_lifetime: MAX_LIFETIME,
    }
}

fn csr_pem(cn: &str, sans: &[&str], usages: &[rcgen::ExtendedKeyUsagePurpose]) -> String {
    let key = KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = usages.to_vec();
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

/// A request as the API server would show node w1's plugin pod's.
fn spec(pem: &str) -> CertificateSigningRequestSpec {
    let extra = [
        (EXTRA_POD_NAME, "qsd-node-abc"),
        (EXTRA_POD_UID, "uid-1"),
        (EXTRA_NODE_NAME, "w1"),
        ("authentication.kubernetes.io/credential-id", "JTI=x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
    .collect();
    CertificateSigningRequestSpec {
        request: ByteString(pem.as_bytes().to_vec()),
        signer_name: AGENT_SIGNER.into(),
        usages: Some(vec!["digital signature".into(), "server auth".into()]),
        username: Some("system:serviceaccount:qsd:qsd-csi-node".into()),
        extra: Some(extra),
        expiration_seconds: Some(86400),
        ..Default::default()
    }
}

#[test]
fn a_node_plugin_pods_request_for_its_own_node_passes_the_checks() {
    let checked = check_request(&spec(&csr_pem("w1", &["w1"], &[])), &config()).expect("ok");
    assert_eq!(checked.node, "w1");
    assert_eq!(checked.pod, ("qsd-node-abc".into(), "uid-1".into()));
    assert_eq!(checked.lifetime, Duration::from_secs(86400));
    let mut long = spec(&csr_pem("w1", &["w1"], &[rcgen::ExtendedKeyUsagePurpose::ServerAuth]));
    long.expiration_seconds = Some(365 * 86400);
    assert_eq!(check_request(&long, &config()).expect("ok").lifetime, MAX_LIFETIME, "capped");
}

#[test]
fn requests_that_could_pose_as_another_node_or_the_controller_are_denied() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let good = || spec(&csr_pem("w1", &["w1"], &[]));
    let with = |f: &dyn Fn(&mut CertificateSigningRequestSpec)| {
        let mut s = good();
        f(&mut s);
        s
    };
    let extra = |key: &str, value: Option<&str>| {
        let key = key.to_owned();
        let value = value.map(str::to_owned);
        move |s: &mut CertificateSigningRequestSpec| {
            let extra = s.extra.get_or_insert_with(Default::default);
            match &value {
                Some(v) => extra.insert(key.clone(), vec![v.clone()]),
                None => extra.remove(&key),
            };
        }
    };
    let mut tampered = csr_pem("w1", &["w1"], &[]).into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let table: Vec<(&str, CertificateSigningRequestSpec, &str)> = vec![
        (
            "another signer",
            with(&|s| s.signer_name = "kubernetes.io/kubelet-serving".into()),
            "signer",
        ),
        ("a user", with(&|s| s.username = Some("alice".into())), "only"),
        (
            "another service account",
            with(&|s| s.username = Some("system:serviceaccount:qsd:qsd-csi-controller".into())),
            "only",
        ),
        ("a token bound to no pod", with(&extra(EXTRA_POD_NAME, None)), "pod-name"),
        ("a token bound to no node", with(&extra(EXTRA_NODE_NAME, None)), "node-name"),
        ("another node's name", spec(&csr_pem("w2", &["w2"], &[])), "CN=\"w1\""),
        ("a second DNS name", spec(&csr_pem("w1", &["w1", "w2"], &[])), "exactly the DNS name"),
        ("an IP address", spec(&csr_pem("w1", &["w1", "127.0.0.1"], &[])), "exactly the DNS name"),
        ("the controller's name", spec(&csr_pem("qsd-csi-controller", &["w1"], &[])), "CN="),
        (
            "a node named as the controller",
            with(&extra(EXTRA_NODE_NAME, Some("qsd-csi-controller"))),
            "cannot be named",
        ),
        (
            "client auth in the CSR",
            spec(&csr_pem("w1", &["w1"], &[ServerAuth, ClientAuth])),
            "more than",
        ),
        (
            "client auth in the usages",
            with(&|s| s.usages = Some(vec!["server auth".into(), "client auth".into()])),
            "server auth only",
        ),
        (
            "no server auth",
            with(&|s| s.usages = Some(vec!["digital signature".into()])),
            "server auth only",
        ),
        (
            "a broken signature",
            with(&|s| s.request = ByteString(tampered.clone())),
            "unreadable or its signature",
        ),
    ];
    for (what, spec, reason) in table {
        match check_request(&spec, &config()) {
            Ok(c) => panic!("{what}: accepted for node {}", c.node),
            Err(e) => assert!(e.contains(reason), "{what}: {e}"),
        }
    }
}

fn pod(uid: &str, node: &str, sa: &str, component: &str, deleting: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("qsd-node-abc".into()),
            uid: Some(uid.into()),
            labels: Some(
                [("app.kubernetes.io/component", component), ("app.kubernetes.io/instance", "qsd")]
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            deletion_timestamp: deleting.then(|| Time(Timestamp::now())),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(sa.into()),
            ..Default::default()
        }),
        status: None,
    }
}

#[test]
fn the_requesting_pod_must_be_that_node_plugin_pod_on_that_node() {
    let checked = check_request(&spec(&csr_pem("w1", &["w1"], &[])), &config()).expect("ok");
    let ok = pod("uid-1", "w1", "qsd-csi-node", "node", false);
    assert_eq!(check_pod(Some(&ok), &checked, &config()), Ok(()));
    let table = [
        ("gone", None, "does not exist"),
        ("recreated", Some(pod("uid-2", "w1", "qsd-csi-node", "node", false)), "uid"),
        (
            "on another node",
            Some(pod("uid-1", "w2", "qsd-csi-node", "node", false)),
            "does not run on",
        ),
        ("another account", Some(pod("uid-1", "w1", "default", "node", false)), "does not run as"),
        (
            "not a node plugin",
            Some(pod("uid-1", "w1", "qsd-csi-node", "controller", false)),
            "not a qsd-csi",
        ),
        ("being deleted", Some(pod("uid-1", "w1", "qsd-csi-node", "node", true)), "being deleted"),
    ];
    for (what, pod, reason) in table {
        let e = check_pod(pod.as_ref(), &checked, &config()).expect_err(what);
        assert!(e.contains(reason), "{what}: {e}");
    }
}

/// A CA to sign with, and its certificate.
fn test_ca() -> (SigningCa, rcgen::Certificate) {
    let key = KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "test-ca");
    let ca_cert = params.self_signed(&key).expect("ca");
    (SigningCa::from_pem(&ca_cert.pem(), &key.serialize_pem()).expect("ca"), ca_cert)
}

#[test]
fn an_issued_certificate_names_the_node_for_server_auth_only_and_chains_to_the_ca() {
    use x509_parser::prelude::*;
    let (ca, ca_cert) = test_ca();
    let node_key = KeyPair::generate().expect("key");
    let pem = ca.issue("w1", &node_key, Duration::from_secs(3600)).expect("issued");
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let blocks =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().expect("pem");
    assert_eq!(blocks.len(), 2, "leaf, then the CA");
    assert_eq!(blocks[1], *ca_cert.der());
    let (_, leaf) = X509Certificate::from_der(&blocks[0]).expect("leaf");
    assert_eq!(leaf.subject().iter_common_name().next().and_then(|c| c.as_str().ok()), Some("w1"));
    let sans = leaf.subject_alternative_name().expect("ext").expect("sans").value;
    assert_eq!(sans.general_names, vec![GeneralName::DNSName("w1")]);
    let eku = leaf.extended_key_usage().expect("ext").expect("eku").value;
    assert!(eku.server_auth && !eku.client_auth && !eku.any, "{eku:?}");
    assert!(!leaf.is_ca());
    assert_eq!(leaf.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&node_key));
    let (_, ca_parsed) = X509Certificate::from_der(ca_cert.der()).expect("ca");
    leaf.verify_signature(Some(ca_parsed.public_key())).expect("signed by the CA");
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 3600 + BACKDATE.as_secs() as i64);
}

#[test]
fn selectors_match_by_equality() {
    let labels: BTreeMap<String, String> =
        [("a", "1"), ("b", "2")].into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    assert!(selector_matches("a=1,b==2", &labels));
    assert!(selector_matches("a, c!=3", &labels));
    assert!(!selector_matches("a=2", &labels));
    assert!(!selector_matches("c", &labels));
    assert!(!selector_matches("b!=2", &labels));
}

/// The PATCH requests a mock API server received, as (path, body).
type Patches = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// A mock API server holding `csrs` and w1's node plugin pod; every PATCH it receives is
/// recorded as (path, body).
fn signer_api(csrs: Vec<CertificateSigningRequest>) -> (kube::Client, Patches) {
    use http_body_util::BodyExt;
    use kube::client::Body;
    let patches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = patches.clone();
    let (service, handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
    tokio::spawn(async move {
        let mut handle = std::pin::pin!(handle);
        let base = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
        while let Some((request, respond)) = handle.next_request().await {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let answer = if method == http::Method::PATCH {
                let body = request.into_body().collect().await.expect("body").to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).expect("json patch");
                seen.lock().expect("patches").push((path.clone(), body));
                let name = path.trim_start_matches(&format!("{base}/")).split('/').next();
                let csr = csrs.iter().find(|c| c.metadata.name.as_deref() == name);
                serde_json::to_value(csr.expect("a known request")).expect("json")
            } else if path == base {
                serde_json::json!({ "apiVersion": "certificates.k8s.io/v1",
                    "kind": "CertificateSigningRequestList", "metadata": {}, "items": csrs })
            } else if path == "/api/v1/namespaces/qsd/pods/qsd-node-abc" {
                serde_json::to_value(pod("uid-1", "w1", "qsd-csi-node", "node", false))
                    .expect("json")
            } else {
                panic!("the signer asked for {method} {path}");
            };
            let body = Body::from(serde_json::to_vec(&answer).expect("json"));
            respond.send_response(http::Response::builder().body(body).expect("response"));
        }
    });
    (kube::Client::new(service, "default"), patches)
}

fn csr(
    name: &str,
    spec: CertificateSigningRequestSpec,
    decided: bool,
) -> CertificateSigningRequest {
    let condition = CertificateSigningRequestCondition {
        type_: "Denied".into(),
        status: "True".into(),
        ..Default::default()
    };
    CertificateSigningRequest {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec,
        status: decided.then(|| {
            k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus {
                conditions: Some(vec![condition]),
                ..Default::default()
            }
        }),
    }
}

#[tokio::test]
async fn a_sweep_signs_the_good_request_denies_the_bad_one_and_leaves_decided_ones_alone() {
    let good = csr("good", spec(&csr_pem("w1", &["w1"], &[])), false);
    // Asked by w1's pod for w2's name: a pod posing as another node.
    let posing = csr("posing", spec(&csr_pem("w2", &["w2"], &[])), false);
    let decided = csr("decided", spec(&csr_pem("w1", &["w1"], &[])), true);
    let (client, patches) = signer_api(vec![good, posing, decided]);
    let (ca, ca_cert) = test_ca();
    let signer = Signer::new(client, ca, config());
    assert_eq!(signer.sweep().await.expect("sweep"), 1, "one request signed");
    let patches = patches.lock().expect("patches").clone();
    let base = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    let paths: Vec<&str> = patches.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("{base}/good/approval"),
            format!("{base}/good/status"),
            format!("{base}/posing/approval")
        ],
        "approve and sign the good one, deny the posing one, nothing for the decided one"
    );
    let condition = |i: usize| patches[i].1["status"]["conditions"][0]["type"].clone();
    assert_eq!((condition(0), condition(2)), ("Approved".into(), "Denied".into()));
    let certificate = patches[1].1["status"]["certificate"].clone();
    let pem: ByteString = serde_json::from_value(certificate).expect("a certificate");
    let pem = String::from_utf8(pem.0).expect("pem");
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    assert!(pem.contains(ca_cert.pem().lines().nth(1).expect("ca body")), "chains to the CA");
}
