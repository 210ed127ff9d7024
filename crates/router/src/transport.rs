//! The router's link to the controller: plain HTTP (loopback), or TLS
//! verified against `--controller-ca`; the router proves who it is with a
//! client certificate (`--client-cert`, `--client-key`) or a bearer token
//! (`--token-file`). All three files are read again when they change, so
//! rotated credentials apply without a restart: the token on its next
//! request, the certificate on its next connection.
//!
//! A leader that a replica redirected the router to is verified under the
//! name the redirecting replica was verified as (`vouch`), not under the
//! address it advertises: replicas share one certificate for the
//! controller's name (a Kubernetes Service's, say), and the address a
//! leader advertises is usually a pod IP that no certificate names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Request, Response, Uri};
use hyper_rustls::{DefaultServerNameResolver, HttpsConnector, ResolveServerName};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use thiserror::Error;
use tracing::{error, info};

/// Where the router's credentials for the controller are.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// CA that signed the controller's certificate; required for https.
    pub controller_ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// File holding the bearer token (e.g. a mounted Secret).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("{flag}: {reason}")]
    Credentials { flag: &'static str, reason: String },
    #[error("cannot reach the controller: {0}")]
    Connect(#[source] hyper_util::client::legacy::Error),
}

fn bad(flag: &'static str, reason: impl Into<String>) -> TransportError {
    TransportError::Credentials {
        flag,
        reason: reason.into(),
    }
}

/// A client of the controller's API with the router's credentials.
#[derive(Clone)]
pub struct Controller {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token_file: Option<PathBuf>,
    vouched: Vouched,
}

/// The names controllers are verified as, by authority (`host:port`), for
/// those that are not verified as their own host: leaders a replica
/// redirected to. A handful of entries, one per leader address seen.
#[derive(Clone, Default)]
struct Vouched(Arc<Mutex<HashMap<String, ServerName<'static>>>>);

impl Vouched {
    /// The name the controller at `uri` is verified as.
    fn name(
        &self,
        uri: &Uri,
    ) -> Result<ServerName<'static>, Box<dyn std::error::Error + Send + Sync>> {
        let vouched = uri.authority().and_then(|a| {
            self.0
                .lock()
                .expect("vouched lock")
                .get(a.as_str())
                .cloned()
        });
        match vouched {
            Some(name) => Ok(name),
            None => DefaultServerNameResolver::default().resolve(uri),
        }
    }
}

/// ring, named rather than the process default: a workspace build enables
/// aws-lc-rs too (for the controller), and rustls then has no default to pick.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Controller {
    /// Checks the credentials now (a bad file fails the start, naming its
    /// flag) and builds the client. `https` says whether the controller's
    /// URL is https.
    pub fn new(
        credentials: &Credentials,
        https: bool,
        connect_timeout: Duration,
    ) -> Result<Controller, TransportError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let vouched = Vouched::default();
        let connector = if https {
            let tls = client_config(credentials)?;
            let names = vouched.clone();
            builder
                .with_tls_config(tls)
                .https_only()
                .with_server_name_resolver(move |uri: &Uri| names.name(uri))
                .enable_http1()
                .wrap_connector(http)
        } else {
            if credentials.client_cert.is_some() || credentials.controller_ca.is_some() {
                return Err(bad(
                    "--controller",
                    "is http://, but --controller-ca or --client-cert is set: use https://",
                ));
            }
            builder
                .with_tls_config(
                    ClientConfig::builder_with_provider(provider())
                        .with_safe_default_protocol_versions()
                        .expect("the provider supports TLS 1.2 and 1.3")
                        .with_root_certificates(RootCertStore::empty())
                        .with_no_client_auth(),
                )
                .https_or_http()
                .enable_http1()
                .wrap_connector(http)
        };
        if let Some(path) = &credentials.token_file {
            read_token(path)?;
        }
        Ok(Controller {
            http: Client::builder(TokioExecutor::new()).build(connector),
            token_file: credentials.token_file.clone(),
            vouched,
        })
    }

    /// The controller at base URL `from` redirected to base URL `to`: `to`
    /// is verified as whatever `from` was. It is the redirecting replica,
    /// itself verified, that names the leader (from the lease), and the
    /// leader must still prove that name with the CA's certificate and key.
    pub fn vouch(&self, from: &str, to: &str) {
        let (Ok(from), Ok(to)) = (from.parse::<Uri>(), to.parse::<Uri>()) else {
            return;
        };
        let (Ok(name), Some(authority)) = (self.vouched.name(&from), to.authority()) else {
            return;
        };
        self.vouched
            .0
            .lock()
            .expect("vouched lock")
            .insert(authority.as_str().to_owned(), name);
    }

    /// Sends `request` with the router's token, read from its file now.
    pub async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TransportError> {
        if let Some(path) = &self.token_file {
            let token = read_token(path)?;
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| bad("--token-file", "the token is not a valid header value"))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        self.http
            .request(request)
            .await
            .map_err(TransportError::Connect)
    }
}

fn read_token(path: &Path) -> Result<String, TransportError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        bad(
            "--token-file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("--token-file", format!("{} is empty", path.display())));
    }
    Ok(token.to_owned())
}

fn client_config(credentials: &Credentials) -> Result<ClientConfig, TransportError> {
    let ca = credentials.controller_ca.as_ref().ok_or_else(|| {
        bad(
            "--controller-ca",
            "is required with an https:// controller (the CA that signed its certificate)",
        )
    })?;
    let pem = std::fs::read(ca).map_err(|e| {
        bad(
            "--controller-ca",
            format!("cannot read {}: {e}", ca.display()),
        )
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad("--controller-ca", format!("not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad("--controller-ca", e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("--controller-ca", "holds no PEM certificate"));
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots);
    // ALPN is left to hyper-rustls, which sets it from the HTTP versions enabled.
    let config = match (&credentials.client_cert, &credentials.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let resolver = ClientCertFiles {
                cert: cert.clone(),
                key: key.clone(),
                current: Mutex::default(),
            };
            resolver.load()?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        (Some(_), None) => return Err(bad("--client-key", "is required with --client-cert")),
        (None, Some(_)) => return Err(bad("--client-cert", "is required with --client-key")),
    };
    Ok(config)
}

/// The client certificate, read from its files at each handshake and
/// rebuilt when they changed; a bad new pair is logged and the last good
/// one kept.
#[derive(Debug)]
struct ClientCertFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Option<Loaded>>,
}

/// The PEM bytes of the certificate and key, and what was built of them.
type Loaded = (Vec<u8>, Vec<u8>, Arc<CertifiedKey>);

impl ClientCertFiles {
    fn load(&self) -> Result<Arc<CertifiedKey>, TransportError> {
        let read = |flag, path: &Path| {
            std::fs::read(path)
                .map_err(|e| bad(flag, format!("cannot read {}: {e}", path.display())))
        };
        let cert_pem = read("--client-cert", &self.cert)?;
        let key_pem = read("--client-key", &self.key)?;
        let mut current = self.current.lock().unwrap();
        if let Some((c, k, certified)) = current.as_ref() {
            if *c == cert_pem && *k == key_pem {
                return Ok(certified.clone());
            }
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("--client-cert", format!("not PEM: {e}")))?;
        if chain.is_empty() {
            return Err(bad("--client-cert", "holds no PEM certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| bad("--client-key", format!("no PEM private key: {e}")))?;
        let certified = Arc::new(
            CertifiedKey::from_der(chain, key, &provider())
                .map_err(|e| bad("--client-key", format!("does not fit --client-cert: {e}")))?,
        );
        if current.is_some() {
            info!(cert = %self.cert.display(), "client certificate re-read after a change");
        }
        *current = Some((cert_pem, key_pem, certified.clone()));
        Ok(certified)
    }
}

impl ResolvesClientCert for ClientCertFiles {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        match self.load() {
            Ok(certified) => Some(certified),
            Err(e) => {
                error!(error = %e, "keeping the last good client certificate");
                self.current.lock().unwrap().as_ref().map(|c| c.2.clone())
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}
