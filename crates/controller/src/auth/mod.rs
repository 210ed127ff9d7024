//! Who may do what on the API. A caller is identified by its client
//! certificate (mTLS) or a bearer token; its role says what it may do, and a
//! router may subscribe and ack only under its own identity, because an ack
//! is what lets a lifecycle hook complete: an ack in another router's name
//! could let Auto Scaling terminate an instance that router still uses.
//!
//! ```text
//!  connection ──► listener:: Peer (address, certificate identity)
//!  request ─────► Gate::check: identify (certificate, else token) ─► authorize(caller, action)
//!                    │ refused: 401/403, counted by reason, logged once per interval
//!                    ▼ allowed: the handler, with the Caller as an extension
//! ```
//!
//! `authorize` is a pure function of the caller and the request, so the
//! whole policy is in one place and tested without a socket.

pub mod tokens;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tracing::warn;

use crate::listener::Peer;
use crate::routers::valid_id;
use tokens::Tokens;

pub use crate::config::Role;

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    ClientCertificate,
    Token,
    /// Authentication is off (loopback without `tls.client_ca` or
    /// `auth.tokens_file`): everyone may do everything.
    None,
}

/// An authenticated caller, attached to its request for the handlers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub identity: String,
    pub role: Role,
    pub credential: Credential,
}

/// What a request asks to do, as far as the policy cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// `/healthz`, `/readyz`: open, for probes.
    Probe,
    /// The registry, routers, lifecycle actions, metrics.
    Read,
    /// `GET /v1/watch?router=ID`.
    Subscribe { router: String },
    /// `POST /v1/routers/ID/ack`.
    Ack { router: String },
    /// Anything else (a 404 or 405 to come).
    Other,
}

#[derive(Deserialize)]
struct WatchQuery {
    router: String,
}

impl Action {
    pub fn of(method: &Method, uri: &axum::http::Uri) -> Action {
        let path = uri.path();
        match path {
            "/healthz" | "/readyz" => return Action::Probe,
            "/v1/watch" if method == Method::GET => {
                // The same parser as the handler's, so both see one id.
                let router = Query::<WatchQuery>::try_from_uri(uri)
                    .map(|q| q.0.router)
                    .unwrap_or_default();
                return Action::Subscribe { router };
            }
            "/metrics" | "/v1/routers" | "/v1/lifecycle" | "/v1/services" => {
                return if method == Method::GET {
                    Action::Read
                } else {
                    Action::Other
                };
            }
            _ => {}
        }
        if let Some(rest) = path.strip_prefix("/v1/routers/") {
            if let Some(router) = rest.strip_suffix("/ack") {
                if method == Method::POST {
                    return Action::Ack {
                        router: router.to_owned(),
                    };
                }
            }
        }
        if method == Method::GET && path.starts_with("/v1/services/") {
            return Action::Read;
        }
        Action::Other
    }
}

/// Why a request was refused; the variant is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "authentication required: present a client certificate or an Authorization: Bearer token"
    )]
    NoCredentials,
    #[error("unknown token")]
    UnknownToken,
    #[error("{0}")]
    BadCertificate(String),
    #[error("identity {identity:?} has role {role:?}, which may not {what}")]
    Role {
        identity: String,
        role: Role,
        what: &'static str,
    },
    #[error("router id {router:?} does not match identity {identity:?} (from its {credential}); a router may {what} only as itself")]
    NotItself {
        router: String,
        identity: String,
        credential: &'static str,
        what: &'static str,
    },
    #[error("router id {router:?} is not 1 to 253 letters, digits, '.', '_' or '-'")]
    BadId { router: String },
    #[error("identity {identity:?} already has {limit} open subscriptions (limits.subscriptions_per_identity)")]
    TooManySubscriptions { identity: String, limit: usize },
    #[error("router id {router:?} is not in routers.expected")]
    NotExpected { router: String },
    #[error("identity {identity:?} sent more than {limit} requests per second (limits.requests_per_second); retry in {retry_after_ms} ms")]
    RateLimited {
        identity: String,
        limit: u32,
        retry_after_ms: u64,
    },
}

impl Refusal {
    pub const LABELS: [&'static str; 9] = [
        "no_credentials",
        "unknown_token",
        "bad_certificate",
        "role",
        "not_itself",
        "bad_id",
        "too_many_subscriptions",
        "not_expected",
        "rate_limited",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::UnknownToken => "unknown_token",
            Refusal::BadCertificate(_) => "bad_certificate",
            Refusal::Role { .. } => "role",
            Refusal::NotItself { .. } => "not_itself",
            Refusal::BadId { .. } => "bad_id",
            Refusal::TooManySubscriptions { .. } => "too_many_subscriptions",
            Refusal::NotExpected { .. } => "not_expected",
            Refusal::RateLimited { .. } => "rate_limited",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Refusal::NoCredentials | Refusal::UnknownToken => StatusCode::UNAUTHORIZED,
            Refusal::BadId { .. } => StatusCode::BAD_REQUEST,
            Refusal::TooManySubscriptions { .. } | Refusal::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// May `caller` do `action`?
pub fn authorize(caller: &Caller, action: &Action) -> Result<(), Refusal> {
    let (router, what) = match action {
        Action::Probe => return Ok(()),
        Action::Read | Action::Other => {
            return match caller.role {
                Role::Reader | Role::Admin => Ok(()),
                Role::Router => Err(Refusal::Role {
                    identity: caller.identity.clone(),
                    role: caller.role,
                    what: "read the API (only subscribe and ack)",
                }),
            };
        }
        Action::Subscribe { router } => (router, "subscribe"),
        Action::Ack { router } => (router, "ack"),
    };
    if !valid_id(router) {
        return Err(Refusal::BadId {
            router: router.clone(),
        });
    }
    if caller.role == Role::Reader {
        return Err(Refusal::Role {
            identity: caller.identity.clone(),
            role: caller.role,
            what,
        });
    }
    if caller.credential != Credential::None && *router != caller.identity {
        return Err(Refusal::NotItself {
            router: router.clone(),
            identity: caller.identity.clone(),
            credential: match caller.credential {
                Credential::ClientCertificate => "client certificate",
                _ => "token",
            },
            what,
        });
    }
    Ok(())
}

/// Whom a subscription counts against: the caller's identity, or without
/// authentication the router id, which is all there is to count by.
fn subscriber<'a>(caller: &'a Caller, router: &'a str) -> &'a str {
    if caller.credential == Credential::None {
        router
    } else {
        &caller.identity
    }
}

/// How often one kind of refusal of one caller is logged: a router retrying
/// a refused ack every second must not flood the log.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Refusals by reason (for `/metrics`), and when each was last logged.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    /// (reason, caller) → when last logged, refusals not logged since.
    logged: Mutex<HashMap<(&'static str, String), LogState>>,
}

type LogState = (Instant, u64);

impl Refusals {
    /// Counts a refusal and logs it, at most once per `LOG_EVERY` for the
    /// same reason and caller (with how many were not logged since).
    pub fn record(&self, refusal: &Refusal, who: &str, peer: &Peer, path: &str) {
        let label = refusal.label();
        *self.counts.lock().unwrap().entry(label).or_default() += 1;
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap();
        let entry = logged
            .entry((label, who.to_owned()))
            .or_insert((now - LOG_EVERY * 2, 0));
        if now.duration_since(entry.0) >= LOG_EVERY {
            warn!(reason = label, caller = who, address = %peer.address, path, suppressed = entry.1, error = %refusal, "request refused");
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
        if logged.len() > 10_000 {
            logged.retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
        }
    }

    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let counts = self.counts.lock().unwrap();
        Refusal::LABELS
            .iter()
            .map(|l| (*l, counts.get(l).copied().unwrap_or(0)))
            .collect()
    }
}

/// Identifies and authorizes every request before its handler.
pub struct Gate {
    /// False: no way to authenticate is configured (loopback only, see
    /// `Config::validate`); every caller is an anonymous admin.
    pub required: bool,
    pub tokens: Option<watch::Receiver<Arc<Tokens>>>,
    /// Roles of certificate identities that are not routers.
    pub certificate_roles: BTreeMap<String, Role>,
    pub refusals: Arc<Refusals>,
    pub subscriptions_per_identity: usize,
    /// Open watch streams by identity: a stolen or buggy credential must
    /// not open streams (each a task and a socket) without end.
    pub subscriptions: Arc<Mutex<HashMap<String, usize>>>,
    /// `routers.expected`: when not empty, the only router ids that may
    /// subscribe or ack (with or without authentication).
    pub expected: BTreeSet<String>,
    /// `limits.requests_per_second` per identity; `None` without
    /// authentication (loopback only), where there is no identity to
    /// limit by.
    pub rate: Option<Rate>,
}

/// Requests per second per identity (GCRA, a burst of one second's worth).
pub struct Rate {
    limit: u32,
    limiter: governor::DefaultKeyedRateLimiter<String>,
}

impl Rate {
    pub fn per_second(limit: u32) -> Rate {
        let per_second = std::num::NonZeroU32::new(limit).unwrap_or(std::num::NonZeroU32::MIN);
        Rate {
            limit,
            limiter: governor::RateLimiter::keyed(governor::Quota::per_second(per_second)),
        }
    }

    fn check(&self, identity: &str) -> Result<(), Refusal> {
        use governor::clock::Clock;
        let key = identity.to_owned();
        self.limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            Refusal::RateLimited {
                identity: key,
                limit: self.limit,
                retry_after_ms: wait.as_millis() as u64,
            }
        })?;
        // Forget identities idle for a while, so that the map stays the
        // size of the active fleet.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        Ok(())
    }
}

/// One open subscription (a watch stream or an xDS ADS stream) of an
/// identity, given back when dropped (the stream ended or the client went
/// away).
pub struct Slot {
    subscriptions: Arc<Mutex<HashMap<String, usize>>>,
    identity: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.subscriptions.lock().unwrap();
        if let Some(n) = open.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// A response body that holds a `Slot` for as long as it lives.
struct Holding {
    body: Body,
    _slot: Slot,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
}

impl Gate {
    /// No authentication: every caller is an anonymous admin (loopback
    /// without `tls.client_ca` or `auth.tokens_file`; benches).
    pub fn open() -> Gate {
        Gate {
            required: false,
            tokens: None,
            certificate_roles: BTreeMap::new(),
            refusals: Arc::default(),
            subscriptions_per_identity: usize::MAX,
            subscriptions: Arc::default(),
            expected: BTreeSet::new(),
            rate: None,
        }
    }

    /// Refuses a router id that `routers.expected` does not list.
    fn expects(&self, action: &Action) -> Result<(), Refusal> {
        match action {
            Action::Subscribe { router } | Action::Ack { router }
                if !self.expected.is_empty() && !self.expected.contains(router) =>
            {
                Err(Refusal::NotExpected {
                    router: router.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Takes one of `limits.subscriptions_per_identity` for an xDS stream
    /// admitted by `admit`, held as long as the returned slot; refused,
    /// counted and logged when none is left.
    pub fn hold_subscription(
        &self,
        caller: &Caller,
        router: &str,
        peer: &Peer,
        what: &str,
    ) -> Result<Slot, Refusal> {
        let who = subscriber(caller, router);
        self.take_slot(who)
            .inspect_err(|refusal| self.refusals.record(refusal, who, peer, what))
    }

    /// Takes a subscription slot for `identity`, if it has one left.
    fn take_slot(&self, identity: &str) -> Result<Slot, Refusal> {
        let mut open = self.subscriptions.lock().unwrap();
        let n = open.entry(identity.to_owned()).or_default();
        if *n >= self.subscriptions_per_identity {
            return Err(Refusal::TooManySubscriptions {
                identity: identity.to_owned(),
                limit: self.subscriptions_per_identity,
            });
        }
        *n += 1;
        Ok(Slot {
            subscriptions: self.subscriptions.clone(),
            identity: identity.to_owned(),
        })
    }

    /// Who the caller is: its certificate when it presented one, else the
    /// bearer token of its `authorization` header (HTTP) or metadata (gRPC).
    fn identify(&self, peer: &Peer, authorization: Option<&str>) -> Result<Caller, Refusal> {
        if !self.required {
            return Ok(Caller {
                identity: "anonymous".into(),
                role: Role::Admin,
                credential: Credential::None,
            });
        }
        match &peer.certificate {
            Some(Ok(identity)) => {
                return Ok(Caller {
                    identity: identity.clone(),
                    role: self
                        .certificate_roles
                        .get(identity)
                        .copied()
                        .unwrap_or(Role::Router),
                    credential: Credential::ClientCertificate,
                })
            }
            Some(Err(why)) => return Err(Refusal::BadCertificate(why.clone())),
            None => {}
        }
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Refusal::NoCredentials)?;
        let tokens = self
            .tokens
            .as_ref()
            .ok_or(Refusal::UnknownToken)?
            .borrow()
            .clone();
        let holder = tokens.holder(token).ok_or(Refusal::UnknownToken)?;
        Ok(Caller {
            identity: holder.identity.clone(),
            role: holder.role,
            credential: Credential::Token,
        })
    }

    /// Admits an xDS stream (`action` names its node id) or refuses it,
    /// counted and logged as the API's refusals are. Without
    /// authentication the node id is taken as given, as before.
    pub fn admit(
        &self,
        peer: &Peer,
        authorization: Option<&str>,
        action: &Action,
        what: &str,
    ) -> Result<Caller, Refusal> {
        let caller = self.identify(peer, authorization);
        let verdict = caller.as_ref().map_err(Clone::clone).and_then(|c| {
            self.expects(action)?;
            match self.required {
                true => authorize(c, action),
                // The node id is taken as given, as before authentication.
                false => Ok(()),
            }
        });
        match verdict {
            Ok(()) => caller,
            Err(refusal) => {
                let who = caller.map_or_else(|_| "unidentified".to_owned(), |c| c.identity);
                self.refusals.record(&refusal, &who, peer, what);
                Err(refusal)
            }
        }
    }

    /// The middleware: refuse, or pass the request on with its `Caller`.
    pub async fn check(
        State(gate): State<Arc<Gate>>,
        ConnectInfo(peer): ConnectInfo<Peer>,
        mut request: Request,
        next: Next,
    ) -> Response {
        let action = Action::of(request.method(), request.uri());
        if action == Action::Probe {
            return next.run(request).await;
        }
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = gate.identify(&peer, authorization);
        let verdict = caller
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|c| {
                if let Some(rate) = &gate.rate {
                    rate.check(&c.identity)?;
                }
                // An id that is not expected is refused whoever asks.
                gate.expects(&action)?;
                authorize(c, &action)
            })
            .and_then(|()| match (&action, &caller) {
                // Without authentication, the router id is all there is to
                // count by.
                (Action::Subscribe { router }, Ok(c)) => {
                    gate.take_slot(subscriber(c, router)).map(Some)
                }
                _ => Ok(None),
            });
        match verdict {
            Ok(slot) => {
                request.extensions_mut().insert(caller.expect("identified"));
                let response = next.run(request).await;
                match slot {
                    Some(slot) => response.map(|body| Body::new(Holding { body, _slot: slot })),
                    None => response,
                }
            }
            Err(refusal) => {
                let who = caller.map_or_else(|_| "unidentified".to_owned(), |c| c.identity);
                gate.refusals
                    .record(&refusal, &who, &peer, request.uri().path());
                let mut response = (
                    refusal.status(),
                    Json(json!({ "error": refusal.to_string() })),
                )
                    .into_response();
                match &refusal {
                    Refusal::NoCredentials | Refusal::UnknownToken => {
                        response
                            .headers_mut()
                            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
                    }
                    Refusal::RateLimited { retry_after_ms, .. } => {
                        let seconds = retry_after_ms.div_ceil(1000).max(1);
                        response
                            .headers_mut()
                            .insert(header::RETRY_AFTER, seconds.into());
                    }
                    _ => {}
                }
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(identity: &str, role: Role) -> Caller {
        Caller {
            identity: identity.into(),
            role,
            credential: Credential::Token,
        }
    }

    fn action(method: Method, uri: &str) -> Action {
        Action::of(&method, &uri.parse().unwrap())
    }

    #[test]
    fn requests_are_classified_by_what_they_do() {
        assert_eq!(action(Method::GET, "/readyz"), Action::Probe);
        assert_eq!(action(Method::GET, "/v1/services/users"), Action::Read);
        assert_eq!(
            action(Method::GET, "/v1/watch?protocol=1&router=edge-1"),
            Action::Subscribe {
                router: "edge-1".into()
            }
        );
        assert_eq!(
            action(Method::POST, "/v1/routers/edge-1/ack"),
            Action::Ack {
                router: "edge-1".into()
            }
        );
        assert_eq!(action(Method::POST, "/metrics"), Action::Other);
    }

    #[test]
    fn a_router_acts_only_as_itself_and_reads_nothing() {
        let a = caller("edge-1", Role::Router);
        let ack = |r: &str| Action::Ack { router: r.into() };
        assert_eq!(authorize(&a, &ack("edge-1")), Ok(()));
        let refused = authorize(&a, &ack("edge-2")).unwrap_err();
        assert_eq!(refused.label(), "not_itself");
        assert!(
            refused.to_string().contains("\"edge-2\"")
                && refused.to_string().contains("\"edge-1\"")
        );
        assert_eq!(authorize(&a, &Action::Read).unwrap_err().label(), "role");
        // An escaped id could decode to another router's: refused outright.
        assert_eq!(
            authorize(&a, &ack("edge%2D1")).unwrap_err().label(),
            "bad_id"
        );
    }

    #[test]
    fn a_reader_reads_and_an_admin_never_speaks_for_a_router() {
        let r = caller("grafana", Role::Reader);
        assert_eq!(authorize(&r, &Action::Read), Ok(()));
        let sub = Action::Subscribe {
            router: "grafana".into(),
        };
        assert_eq!(authorize(&r, &sub).unwrap_err().label(), "role");
        let admin = caller("ops", Role::Admin);
        assert_eq!(authorize(&admin, &Action::Read), Ok(()));
        let ack = Action::Ack {
            router: "edge-1".into(),
        };
        assert_eq!(authorize(&admin, &ack).unwrap_err().label(), "not_itself");
    }

    #[test]
    fn with_routers_expected_no_other_id_subscribes_or_acks_even_unauthenticated() {
        let gate = Gate {
            expected: BTreeSet::from(["edge-1".to_string()]),
            ..Gate::open()
        };
        let peer = Peer {
            address: "127.0.0.1:9".parse().unwrap(),
            certificate: None,
        };
        let sub = |router: &str| Action::Subscribe {
            router: router.into(),
        };
        assert!(gate.admit(&peer, None, &sub("edge-1"), "xds ads").is_ok());
        let refused = gate
            .admit(&peer, None, &sub("edge-9"), "xds ads")
            .unwrap_err();
        assert_eq!(refused.label(), "not_expected");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refused.to_string().contains("edge-9"), "{refused}");
        assert_eq!(
            gate.admit(&peer, None, &Action::Read, "/v1/services")
                .map(|c| c.role),
            Ok(Role::Admin)
        );
        assert!(gate.refusals.counts().contains(&("not_expected", 1)));
    }

    #[test]
    fn each_identity_has_its_own_request_rate() {
        let rate = Rate::per_second(3);
        for _ in 0..3 {
            assert_eq!(rate.check("grafana"), Ok(()), "a second's worth at once");
        }
        let refused = rate.check("grafana").unwrap_err();
        assert_eq!(refused.label(), "rate_limited");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let Refusal::RateLimited { retry_after_ms, .. } = refused else {
            unreachable!()
        };
        assert!(
            (1..=334).contains(&retry_after_ms),
            "one request's interval: {retry_after_ms}"
        );
        assert_eq!(
            rate.check("edge-1"),
            Ok(()),
            "another identity is not slowed"
        );
    }

    #[test]
    fn an_xds_stream_holds_a_subscription_slot_of_its_identity_until_dropped() {
        let gate = Gate {
            subscriptions_per_identity: 1,
            ..Gate::open()
        };
        let peer = Peer {
            address: "127.0.0.1:9".parse().unwrap(),
            certificate: None,
        };
        let edge = caller("edge", Role::Router);
        let held = gate
            .hold_subscription(&edge, "edge", &peer, "xds ads")
            .unwrap();
        let refused = gate
            .hold_subscription(&edge, "edge", &peer, "xds ads")
            .err()
            .expect("one slot only");
        assert_eq!(refused.label(), "too_many_subscriptions");
        assert!(gate
            .refusals
            .counts()
            .contains(&("too_many_subscriptions", 1)));
        drop(held);
        assert!(gate
            .hold_subscription(&edge, "edge", &peer, "xds ads")
            .is_ok());
    }
}
