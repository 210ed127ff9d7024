//! The controller's side of push: serves `/v1/watch` streams, takes acks,
//! and keeps the router table that says which router has applied what.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use super::wire::{Ack, Ejection, Message, PROTOCOL};
use crate::model::{rfc3339, Revision, Snapshot};

/// How often an idle stream carries a ping. Routers give up on a stream
/// silent for three times this.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// How long a disconnected router stays listed, so that an operator can see
/// that it went away and when.
const DISCONNECTED_KEPT: Duration = Duration::from_secs(15 * 60);

/// Lines queued per subscriber before its feeder waits. Small on purpose:
/// while a feeder waits, `watch` coalesces revisions, so a slow router gets
/// one diff to the newest snapshot instead of a backlog.
const QUEUE: usize = 4;

pub struct Hub {
    registry: watch::Receiver<Arc<Snapshot>>,
    /// Only acks, connects and disconnects take this lock, never a stream
    /// write, so it is held for microseconds.
    routers: Mutex<BTreeMap<String, RouterRecord>>,
    /// Bumped on every change to `routers`, for `wait_acked`.
    changed: watch::Sender<u64>,
    ping_interval: Duration,
    /// Ends every stream, so that graceful shutdown does not wait on them.
    stop: watch::Receiver<bool>,
    /// True once the registry is worth routing on (see
    /// `reconcile::warmed_up`). Until then a subscriber is listed but sent
    /// nothing, and keeps routing on what it has: a router reconnecting to a
    /// restarted controller must not swap its table for an empty one.
    ready: watch::Receiver<bool>,
    next_connection: AtomicU64,
}

/// One router as the controller knows it.
#[derive(Clone, Debug, Serialize)]
pub struct RouterRecord {
    pub id: String,
    /// The router's address as seen on its watch connection.
    pub address: SocketAddr,
    pub connected: bool,
    #[serde(serialize_with = "rfc3339")]
    pub connected_since: SystemTime,
    /// The newest revision written to its stream.
    pub sent_revision: Option<Revision>,
    /// The newest revision it says it routes with.
    pub acked_revision: Option<Revision>,
    /// Its last ack, or its connection if it has not acked yet.
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Requests in flight: service → instance → count, from its last ack.
    pub in_flight: BTreeMap<String, BTreeMap<String, u64>>,
    /// Endpoints it ejected on its own (passive health), from its last ack.
    pub ejected: Vec<Ejection>,
    /// Tells this connection from a newer one of the same router id.
    #[serde(skip)]
    connection: u64,
    #[serde(skip)]
    disconnected_at: Option<SystemTime>,
}

impl RouterRecord {
    pub fn has_acked(&self, revision: Revision) -> bool {
        self.acked_revision.is_some_and(|a| a >= revision)
    }

    /// Requests it reported in flight to `instance`, in any service.
    pub fn in_flight_to(&self, instance: &str) -> u64 {
        self.in_flight
            .values()
            .filter_map(|by_instance| by_instance.get(instance))
            .sum()
    }
}

/// Routers that had not acked a revision when the wait ended.
#[derive(Debug, Error, PartialEq)]
#[error("routers {routers:?} have not acked revision {revision}")]
pub struct NotAcked {
    pub revision: Revision,
    pub routers: Vec<String>,
}

#[derive(Deserialize)]
struct WatchQuery {
    router: String,
    protocol: u32,
}

impl Hub {
    pub fn new(
        registry: watch::Receiver<Arc<Snapshot>>,
        ping_interval: Duration,
        stop: watch::Receiver<bool>,
        ready: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            registry,
            routers: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
            ping_interval,
            stop,
            ready,
            next_connection: AtomicU64::new(1),
        })
    }

    /// `GET /v1/watch`, `POST /v1/routers/{id}/ack`, `GET /v1/routers`. The
    /// server must be run with `into_make_service_with_connect_info`.
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/watch", get(watch_stream))
            .route("/v1/routers", get(list_routers))
            .route("/v1/routers/{id}/ack", post(ack))
            .with_state(self.clone())
    }

    /// Every router, sorted by id.
    pub fn routers(&self) -> Vec<RouterRecord> {
        self.routers.lock().unwrap().values().cloned().collect()
    }

    /// Connected routers for which `done` is false.
    pub fn pending(&self, done: impl Fn(&RouterRecord) -> bool) -> Vec<String> {
        self.routers
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.connected && !done(r))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Waits until `done` holds for every connected router, checked again
    /// on every ack, connect and disconnect; or until `limit` passes, then
    /// returns the routers still pending. A router that disconnects stops
    /// counting: it gets a fresh snapshot when it comes back.
    pub async fn wait_routers(
        &self,
        limit: Duration,
        done: impl Fn(&RouterRecord) -> bool,
    ) -> Result<(), Vec<String>> {
        let mut changed = self.changed.subscribe();
        let all_done = || {
            let routers = self.routers.lock().unwrap();
            routers.values().all(|r| !r.connected || done(r))
        };
        let wait = async {
            loop {
                changed.borrow_and_update();
                if all_done() || changed.changed().await.is_err() {
                    return;
                }
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.pending(&done)),
        }
    }

    /// Waits until every connected router has acked `revision` (or a later
    /// one), or `limit` passes.
    pub async fn wait_acked(&self, revision: Revision, limit: Duration) -> Result<(), NotAcked> {
        self.wait_routers(limit, |r| r.has_acked(revision))
            .await
            .map_err(|routers| NotAcked { revision, routers })
    }

    /// Records a router's ack; false when no such router is subscribed.
    pub(crate) fn acked(&self, id: &str, ack: Ack) -> bool {
        let mut routers = self.routers.lock().unwrap();
        let Some(r) = routers.get_mut(id) else {
            return false;
        };
        if r.acked_revision != Some(ack.revision) {
            debug!(router = %id, revision = ack.revision, "router acked");
        }
        r.acked_revision = Some(ack.revision);
        r.last_seen = SystemTime::now();
        r.in_flight = ack.in_flight;
        r.ejected = ack.ejected;
        drop(routers);
        self.bump();
        true
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn connect(&self, id: &str, address: SocketAddr) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut routers = self.routers.lock().unwrap();
        routers.retain(|_, r| {
            r.disconnected_at
                .is_none_or(|t| now.duration_since(t).unwrap_or_default() < DISCONNECTED_KEPT)
        });
        routers.insert(
            id.to_owned(),
            RouterRecord {
                id: id.to_owned(),
                address,
                connected: true,
                connected_since: now,
                sent_revision: None,
                acked_revision: None,
                last_seen: now,
                in_flight: BTreeMap::new(),
                ejected: Vec::new(),
                connection,
                disconnected_at: None,
            },
        );
        drop(routers);
        self.bump();
        connection
    }

    fn sent(&self, id: &str, connection: u64, revision: Revision) {
        if let Some(r) = self.routers.lock().unwrap().get_mut(id) {
            if r.connection == connection {
                r.sent_revision = Some(revision);
            }
        }
    }

    pub(crate) fn disconnect(&self, id: &str, connection: u64) {
        let mut routers = self.routers.lock().unwrap();
        // A newer connection of the same router replaced this one: leave it.
        if let Some(r) = routers.get_mut(id).filter(|r| r.connection == connection) {
            r.connected = false;
            r.disconnected_at = Some(SystemTime::now());
            drop(routers);
            info!(router = %id, "router disconnected");
            self.bump();
        }
    }

    /// Feeds one subscriber until it goes away or the controller stops.
    async fn feed(self: Arc<Self>, id: String, connection: u64, tx: mpsc::Sender<Bytes>) {
        let mut registry = self.registry.clone();
        let mut stop = self.stop.clone();
        let mut ready = self.ready.clone();
        let warmed = tokio::select! {
            r = ready.wait_for(|r| *r) => r.is_ok(),
            _ = tx.closed() => false,
            _ = crate::stopped(&mut stop) => false,
        };
        if !warmed {
            self.disconnect(&id, connection);
            return;
        }
        let mut sent = registry.borrow_and_update().clone();
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        if tx
            .send(Message::snapshot(&sent).to_line().into())
            .await
            .is_ok()
        {
            self.sent(&id, connection, sent.revision);
            loop {
                let line = tokio::select! {
                    changed = registry.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let newest = registry.borrow_and_update().clone();
                        let message = Message::delta(&sent, &newest)
                            .unwrap_or_else(|| Message::snapshot(&newest));
                        sent = newest;
                        message.to_line()
                    }
                    _ = ping.tick() => Message::Ping { revision: sent.revision }.to_line(),
                    _ = tx.closed() => break,
                    _ = crate::stopped(&mut stop) => break,
                };
                if tx.send(line.into()).await.is_err() {
                    break;
                }
                self.sent(&id, connection, sent.revision);
            }
        }
        self.disconnect(&id, connection);
    }
}

async fn watch_stream(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    Query(query): Query<WatchQuery>,
) -> Response {
    if query.protocol != PROTOCOL {
        let error = format!(
            "protocol {} not supported; this controller speaks {PROTOCOL}",
            query.protocol
        );
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
    }
    if query.router.is_empty() || query.router.len() > 253 {
        let error = "router id must be 1 to 253 characters";
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
    }
    let connection = hub.connect(&query.router, address);
    info!(router = %query.router, %address, "router subscribed");
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(hub.clone().feed(query.router, connection, tx));
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::new(Lines(rx)),
    )
        .into_response()
}

/// The response body of a watch: whatever its feeder queues, until the
/// feeder ends.
struct Lines(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Lines {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

async fn ack(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Json(ack): Json<Ack>,
) -> Response {
    if !hub.acked(&id, ack) {
        let error = format!("router {id:?} is not subscribed");
        return (StatusCode::NOT_FOUND, Json(json!({ "error": error }))).into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A router as `GET /v1/routers` shows it: the record plus its lag.
#[derive(Serialize)]
struct RouterView {
    #[serde(flatten)]
    record: RouterRecord,
    /// Registry revision minus acked revision (the whole revision when it
    /// has acked nothing).
    lag: Revision,
}

async fn list_routers(State(hub): State<Arc<Hub>>) -> Response {
    let revision = hub.registry.borrow().revision;
    let routers: Vec<RouterView> = hub
        .routers()
        .into_iter()
        .map(|record| RouterView {
            lag: revision.saturating_sub(record.acked_revision.unwrap_or(0)),
            record,
        })
        .collect();
    Json(json!({ "revision": revision, "routers": routers })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (Arc<Hub>, watch::Sender<bool>) {
        let registry = crate::registry::Registry::new();
        let (stop_tx, stop) = watch::channel(false);
        (
            Hub::new(
                registry.subscribe(),
                Duration::from_secs(5),
                stop,
                watch::channel(true).1,
            ),
            stop_tx,
        )
    }

    fn acked(hub: &Hub, id: &str, revision: Revision) {
        let mut routers = hub.routers.lock().unwrap();
        routers.get_mut(id).unwrap().acked_revision = Some(revision);
        drop(routers);
        hub.bump();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_acked_waits_for_every_connected_router() {
        let (hub, _stop) = hub();
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        hub.connect("a", address);
        let b = hub.connect("b", address);
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_acked(3, Duration::from_secs(10)).await }
        });
        acked(&hub, "a", 3);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "b has not acked");
        acked(&hub, "b", 2);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "b acked an older revision");
        hub.disconnect("b", b);
        assert_eq!(
            waiter.await.unwrap(),
            Ok(()),
            "a disconnected router stops counting"
        );

        hub.connect("b", address);
        let err = hub.wait_acked(3, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.routers, vec!["b".to_string()]);
    }

    #[test]
    fn an_old_connection_going_away_does_not_disconnect_the_new_one() {
        let (hub, _stop) = hub();
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let old = hub.connect("a", address);
        let _new = hub.connect("a", address);
        hub.disconnect("a", old);
        assert!(hub.routers()[0].connected);
    }
}
