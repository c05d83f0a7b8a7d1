//! A throwaway certificate authority for mutual-TLS tests (rcgen). Also used by the
//! controller's tests (included by path).

use std::path::{Path, PathBuf};

use qsd_node::tls::TlsFiles;
use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that signs leaf certificates into PEM files under `dir`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).expect("write ca");
        Ca { issuer, pem }
    }

    /// A leaf certificate for `name` (also its DNS name), and the CA to trust for the peer.
    pub fn leaf(&self, dir: &Path, name: &str, trust: &Ca) -> TlsFiles {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("sign");
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: trust.pem.clone(),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}
