//! Certificates for the security tests, made fresh by each test with
//! `rcgen`: a CA, the controller's certificate for 127.0.0.1, and client
//! certificates naming routers (by CN or SPIFFE URI), expired ones, and
//! ones from another CA. Written as PEM files into a directory of the test.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

pub struct Ca {
    pub dir: PathBuf,
    /// The CA certificate (PEM file): `tls.client_ca`, `--controller-ca`.
    pub cert: PathBuf,
    params: CertificateParams,
    key: KeyPair,
}

/// A certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How a client certificate names its holder.
pub enum Name<'a> {
    Cn(&'a str),
    Uri(&'a str),
}

impl Ca {
    /// A new CA named `name`, its files under `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca {
            dir: dir.to_owned(),
            cert: path,
            params,
            key,
        }
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    /// The controller's certificate, for 127.0.0.1.
    pub fn server(&self, file: &str) -> Pair {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "signpost controller");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params)
    }

    /// A client certificate for `name`.
    pub fn client(&self, file: &str, name: Name<'_>) -> Pair {
        self.client_with(file, name, |_| {})
    }

    /// A client certificate whose validity ended yesterday.
    pub fn expired_client(&self, file: &str, cn: &str) -> Pair {
        self.client_with(file, Name::Cn(cn), |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn client_with(
        &self,
        file: &str,
        name: Name<'_>,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        match name {
            Name::Cn(cn) => params.distinguished_name.push(DnType::CommonName, cn),
            Name::Uri(uri) => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, "no identity here");
                params
                    .subject_alt_names
                    .push(SanType::URI(uri.try_into().unwrap()));
            }
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        adjust(&mut params);
        self.issue(file, params)
    }
}
