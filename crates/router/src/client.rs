//! The router's side of push: subscribe, apply, acknowledge, reconnect.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::table::{Endpoint, RouteTable};
use super::transport::{Controller, TransportError};
use super::{cache, RouterState, Source};
use signpost_protocol::{Ack, Message, Mirror, WireError, PROTOCOL};

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
    /// Base URL of the controller, without a trailing slash.
    pub controller: String,
    pub id: String,
    /// The controller's API with this router's credentials.
    pub link: Controller,
    pub cache: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// The controller pings every few seconds; silence this long means the
    /// stream is dead even if TCP has not noticed.
    pub idle: Duration,
    pub state: Arc<RouterState>,
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
        let mut known = HashMap::new();
        let mut tried_cache = false;
        loop {
            let mut got_snapshot = false;
            let ended = tokio::select! {
                e = self.session(&mut mirror, &mut known, &mut got_snapshot) => e,
                _ = stop.cancelled() => return,
            };
            self.state.connected.store(false, Ordering::Relaxed);
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
                self.load_cache(&mut mirror, &mut known).await;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn load_cache(
        &self,
        mirror: &mut Mirror,
        known: &mut HashMap<(String, String), Arc<Endpoint>>,
    ) {
        let Some(path) = &self.cache else { return };
        match cache::load(path).await {
            Ok(cached) => {
                info!(path = %path.display(), revision = ?cached.revision, "controller unreachable; routing from the cache file");
                *mirror = cached;
                self.state.publish(mirror, known, Source::Cache);
            }
            Err(e) => warn!(error = %e, "controller unreachable and no usable cache"),
        }
    }

    async fn session(
        &self,
        mirror: &mut Mirror,
        known: &mut HashMap<(String, String), Arc<Endpoint>>,
        got_snapshot: &mut bool,
    ) -> SessionError {
        let url = format!(
            "{}/v1/watch?router={}&protocol={PROTOCOL}",
            self.controller, self.id
        );
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
        if !response.status().is_success() {
            let status = response.status();
            let body = match tokio::time::timeout(limit, response.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                _ => String::new(),
            };
            return SessionError::Refused { status, body };
        }
        self.state.connected.store(true, Ordering::Relaxed);
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
                        self.state.publish(mirror, known, Source::Controller);
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

impl RouterState {
    /// Swaps in the table for `mirror` and tells the reporter and the cache.
    pub(super) fn publish(
        &self,
        mirror: &Mirror,
        known: &mut HashMap<(String, String), Arc<Endpoint>>,
        source: Source,
    ) {
        self.table.store(Arc::new(RouteTable::build(mirror, known)));
        let mirror = Arc::new(mirror.clone());
        self.applied.send_modify(|a| {
            a.source = Some(source);
            a.mirror = mirror;
        });
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
    controller: String,
    id: String,
    state: Arc<RouterState>,
    link: Controller,
    stop: CancellationToken,
) {
    let url = format!("{controller}/v1/routers/{id}/ack");
    let mut applied = state.applied.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_busy = false;
    let mut pending = false;
    loop {
        let fresh = tokio::select! {
            _ = applied.changed() => true,
            _ = state.ejected.notified() => true,
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
