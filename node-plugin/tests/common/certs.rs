//! A throwaway certificate authority for mutual-TLS tests (rcgen). Also used by the
//! controller's tests (included by path).

use std::path::{Path, PathBuf};

use qsd_node::tls::TlsFiles;
use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that signs leaf certificates into PEM files under `dir`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: PathBuf,
    #[allow(dead_code)]
    pub key: PathBuf,
}

/// The controller's name, as the chart gives it and the agents obey by default.
#[allow(dead_code)]
pub const CONTROLLER: &str = qsd_csi_proto::identity::DEFAULT_CONTROLLER_IDENTITY;

impl Ca {
    /// A new CA: its certificate in `NAME.pem`, its key in `NAME.key`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&key_file, key.serialize_pem()).expect("write ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, key).expect("ca");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).expect("write ca");
        Ca { issuer, pem, key: key_file }
    }

    /// A leaf certificate for `name` (its CN and DNS name), usable for any purpose, and the CA
    /// to trust for the peer.
    pub fn leaf(&self, dir: &Path, name: &str, trust: &Ca) -> TlsFiles {
        self.leaf_for(dir, name, trust, &[])
    }

    /// As [`Ca::leaf`], restricted to these extended key usages (none: unrestricted).
    pub fn leaf_for(
        &self,
        dir: &Path,
        name: &str,
        trust: &Ca,
        usages: &[rcgen::ExtendedKeyUsagePurpose],
    ) -> TlsFiles {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = usages.to_vec();
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
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
