//! The router's side of push: subscribe, apply, acknowledge, reconnect.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::controllers::Controllers;
use super::table::RouteTable;
use super::transport::{Controller, TransportError};
use super::{cache, Applied, RouterState, Source};
use signpost_protocol::{Ack, Message, Mirror, WireError, PROTOCOL};

/// What a subscription drives: the router's own route table, or a proxy
/// that an agent drives (crates/agents). The subscriber hands it every
/// snapshot; the reporter acks what it says it has applied.
pub trait Dataplane: Send + Sync + 'static {
    /// Takes `mirror` (from the controller or the cache file) to route on.
    fn publish(&self, mirror: &Mirror, source: Source);
    /// What is applied: the reporter acks each change, the cache file keeps it.
    fn applied(&self) -> watch::Receiver<Applied>;
    /// The ack to send now (applied revision, requests in flight); `None`
    /// before anything is applied.
    fn report(&self, now: Instant) -> Option<Ack>;
    /// Wakes the reporter for news other than an applied revision.
    fn nudged(&self) -> &Notify;
    /// Whether a subscription is open right now (`/readyz` detail).
    fn set_connected(&self, connected: bool);
    /// Its kind in the controller's `/v1/routers`; `None`: a signpost router.
    fn kind(&self) -> Option<&'static str> {
        None
    }
}

/// A line longer than this is not a registry, it is a broken peer.
const MAX_LINE: usize = 256 << 20;

/// Why a subscription ended. Every case ends the same way: keep routing on
/// what we have, reconnect with back-off, start again from a snapshot.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the controller refused the subscription: {status} {body}")]
    Refused { status: StatusCode, body: String },
    #[error("this controller replica does not lead; the leader is at {0}")]
    Redirected(String),
    #[error("the stream failed: {0}")]
    Stream(#[source] hyper::Error),
    #[error("nothing heard for {0:?}")]
    Idle(Duration),
    #[error("the controller closed the stream")]
    Closed,
    #[error("bad push message: {0}")]
    Wire(#[from] WireError),
}

pub struct Subscriber {
    /// Which controller replica to subscribe to (see `controllers`).
    pub controllers: Arc<Controllers>,
    pub id: String,
    /// The controller's API with this router's credentials.
    pub link: Controller,
    pub cache: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// The controller pings every few seconds; silence this long means the
    /// stream is dead even if TCP has not noticed.
    pub idle: Duration,
    pub state: Arc<dyn Dataplane>,
}

impl Subscriber {
    pub async fn run(self, stop: CancellationToken) {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let mut delays = backoff.build();
        let mut mirror = Mirror::default();
        let mut tried_cache = false;
        let mut redirects = 0;
        loop {
            let mut got_snapshot = false;
            let ended = tokio::select! {
                e = self.session(&mut mirror, &mut got_snapshot) => e,
                _ = stop.cancelled() => return,
            };
            self.state.set_connected(false);
            // Straight to the leader a follower named; anything else: the
            // next configured replica, after the back-off.
            // A few hops at most without back-off: two replicas that each
            // name the other (stale reads of the lease) must not spin.
            redirects = if got_snapshot { 0 } else { redirects + 1 };
            if let SessionError::Redirected(leader) = &ended {
                let from = self.controllers.current();
                if redirects <= 3 && self.controllers.follow(leader) {
                    self.link.vouch(&from, &self.controllers.current());
                    info!(leader = %leader, "following the controller's redirect to the leader");
                    continue;
                }
            }
            self.controllers.failed();
            match &ended {
                SessionError::Wire(_) => {
                    error!(error = %ended, revision = ?mirror.revision, "keeping the last good snapshot and reconnecting")
                }
                _ => {
                    warn!(error = %ended, revision = ?mirror.revision, "subscription ended; routing on the last applied snapshot")
                }
            }
            if got_snapshot {
                delays = backoff.build();
            }
            if mirror.revision.is_none() && !tried_cache {
                tried_cache = true;
                self.load_cache(&mut mirror).await;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn load_cache(&self, mirror: &mut Mirror) {
        let Some(path) = &self.cache else { return };
        match cache::load(path).await {
            Ok(cached) => {
                info!(path = %path.display(), revision = ?cached.revision, "controller unreachable; routing from the cache file");
                *mirror = cached;
                self.state.publish(mirror, Source::Cache);
            }
            Err(e) => warn!(error = %e, "controller unreachable and no usable cache"),
        }
    }

    async fn session(&self, mirror: &mut Mirror, got_snapshot: &mut bool) -> SessionError {
        let mut url = format!(
            "{}/v1/watch?router={}&protocol={PROTOCOL}",
            self.controllers.current(),
            self.id
        );
        if let Some(kind) = self.state.kind() {
            url.push_str(&format!("&kind={kind}"));
        }
        let uri = match url.parse() {
            Ok(uri) => uri,
            Err(_) => unreachable!("controller URL and id are validated at start"),
        };
        let limit = self.connect_timeout + Duration::from_secs(5);
        let request = Request::get::<hyper::Uri>(uri)
            .body(Full::default())
            .expect("valid request");
        let response = match tokio::time::timeout(limit, self.link.send(request)).await {
            Err(_) => return SessionError::Timeout(limit),
            Ok(Err(e)) => return e.into(),
            Ok(Ok(r)) => r,
        };
        if response.status() == StatusCode::TEMPORARY_REDIRECT {
            if let Some(to) = response.headers().get(hyper::header::LOCATION) {
                return SessionError::Redirected(String::from_utf8_lossy(to.as_bytes()).into());
            }
        }
        if !response.status().is_success() {
            let status = response.status();
            let body = match tokio::time::timeout(limit, response.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                _ => String::new(),
            };
            return SessionError::Refused { status, body };
        }
        self.state.set_connected(true);
        let mut body = response.into_body();
        let mut buf = BytesMut::new();
        let mut scanned = 0;
        loop {
            let frame = match tokio::time::timeout(self.idle, body.frame()).await {
                Err(_) => return SessionError::Idle(self.idle),
                Ok(None) => return SessionError::Closed,
                Ok(Some(Err(e))) => return SessionError::Stream(e),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(pos) = buf[scanned..].iter().position(|b| *b == b'\n') {
                let line = buf.split_to(scanned + pos + 1);
                scanned = 0;
                let message = match Message::from_line(&line[..line.len() - 1]) {
                    Ok(m) => m,
                    Err(e) => return e.into(),
                };
                let is_snapshot = matches!(message, Message::Snapshot { .. });
                let epoch = mirror.epoch;
                match mirror.apply(message) {
                    Ok(true) => {
                        if epoch.is_some() && epoch != mirror.epoch {
                            info!(epoch = ?mirror.epoch, was = ?epoch, revision = ?mirror.revision, "a new controller lifetime: its snapshot replaces the table");
                        }
                        *got_snapshot |= is_snapshot;
                        self.state.publish(mirror, Source::Controller);
                        debug!(revision = ?mirror.revision, "applied");
                    }
                    Ok(false) => {}
                    Err(e) => return e.into(),
                }
            }
            scanned = buf.len();
            if buf.len() > MAX_LINE {
                return WireError::Malformed {
                    reason: format!("line longer than {MAX_LINE} bytes"),
                    line: String::new(),
                }
                .into();
            }
        }
    }
}

impl Dataplane for RouterState {
    /// Swaps in the table for `mirror` and tells the reporter and the cache.
    fn publish(&self, mirror: &Mirror, source: Source) {
        let table = RouteTable::build(mirror, &mut self.known.lock().unwrap());
        self.table.store(Arc::new(table));
        let mirror = Arc::new(mirror.clone());
        self.applied.send_modify(|a| {
            a.source = Some(source);
            a.mirror = mirror;
        });
    }

    fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    fn nudged(&self) -> &Notify {
        &self.ejected
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// In-flight counts and current ejections, from the table in use;
    /// `None` before the router has a table.
    fn report(&self, now: Instant) -> Option<Ack> {
        let table = self.table.load();
        let mut ack = Ack {
            epoch: table.epoch?,
            revision: table.revision?,
            in_flight: BTreeMap::new(),
            ejected: Vec::new(),
        };
        let routable = table.services().flat_map(|s| s.endpoints.iter());
        for b in routable.chain(&table.retiring) {
            let n = b.in_flight.load(Ordering::Relaxed);
            if n > 0 {
                ack.in_flight
                    .entry(b.service.clone())
                    .or_default()
                    .insert(b.instance.clone(), n);
            }
            ack.ejected.extend(b.ejection(now));
        }
        Some(ack)
    }
}

/// Acks each revision applied from the controller at once, and reports
/// in-flight counts and ejections every second while there are any (and
/// once more when they drop to none, so the controller does not keep a
/// stale count).
pub async fn report(
    controllers: Arc<Controllers>,
    id: String,
    state: Arc<dyn Dataplane>,
    link: Controller,
    stop: CancellationToken,
) {
    let mut applied = state.applied();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_busy = false;
    let mut pending = false;
    loop {
        let fresh = tokio::select! {
            _ = applied.changed() => true,
            _ = state.nudged().notified() => true,
            _ = tick.tick() => false,
            _ = stop.cancelled() => return,
        };
        if applied.borrow_and_update().source != Some(Source::Controller) {
            continue;
        }
        let Some(ack) = state.report(Instant::now()) else {
            continue;
        };
        let busy = !ack.in_flight.is_empty() || !ack.ejected.is_empty();
        if !(fresh || busy || was_busy || pending) {
            continue;
        }
        was_busy = busy;
        let url = format!("{}/v1/routers/{id}/ack", controllers.current());
        let request = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(&ack).expect("serializes"),
            )))
            .expect("valid request");
        let sent = tokio::time::timeout(Duration::from_secs(2), link.send(request)).await;
        pending = !matches!(&sent, Ok(Ok(r)) if r.status().is_success());
        if pending {
            debug!(revision = ack.revision, "ack not delivered; will retry");
        }
    }
}
