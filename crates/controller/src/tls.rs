//! TLS for the API and the xDS server: a rustls server config from the PEM
//! files of `[tls]`, and the identity a client certificate gives its holder.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{ConfigError, IdentitySource, TlsConfig};

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The provider is named, not left to the process default: the workspace
/// enables more than one, and rustls then has no default to pick.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// A server config from PEM contents: `[cert, key]` or `[cert, key,
/// client_ca]`. With a client CA, a client certificate is verified (chain
/// to that CA, validity, usage) and a bad one ends the handshake. A client
/// without one still gets a session, so that probes reach `/healthz` and
/// `/readyz` and token holders can authenticate: `auth::Gate` refuses it
/// everything else (401, counted and logged, which a failed handshake is
/// not).
pub fn server_config(files: &[Vec<u8>]) -> Result<ServerConfig, ConfigError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files[0])
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("tls.cert", format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("tls.cert", "holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&files[1])
        .map_err(|e| invalid("tls.key", format!("no PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls.cert", e.to_string()))?;
    let builder = match files.get(2) {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert
                    .map_err(|e| invalid("tls.client_ca", format!("not PEM certificates: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid("tls.client_ca", e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(invalid("tls.client_ca", "holds no PEM certificate"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| invalid("tls.client_ca", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid("tls.key", format!("does not fit tls.cert: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// [`server_config`] for gRPC (the xDS server): HTTP/2 by ALPN, which
/// gRPC clients offer and refuse to do without.
pub fn grpc_server_config(files: &[Vec<u8>]) -> Result<ServerConfig, ConfigError> {
    let mut config = server_config(files)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The identity a verified client certificate gives its holder, by
/// `tls.identity`; an error says why it gives none.
pub fn identity(cert: &CertificateDer<'_>, tls: &TlsConfig) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    match tls.identity {
        IdentitySource::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                "client certificate has no subject common name (tls.identity = \"cn\")".to_owned()
            }),
        IdentitySource::UriSan => {
            let sans = cert
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|ext| ext.value.general_names.clone())
                .unwrap_or_default();
            sans.iter()
                .find_map(|name| match name {
                    GeneralName::URI(uri) => uri.strip_prefix(tls.uri_prefix.as_str()),
                    _ => None,
                })
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!(
                        "client certificate has no URI SAN starting with {:?} (tls.identity = \"uri_san\")",
                        tls.uri_prefix
                    )
                })
        }
    }
}
