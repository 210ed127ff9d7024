//! The NDJSON push server: serves `/v1/watch` streams and takes acks, and
//! records both in `routers::Routers`, which lifecycle hooks wait on.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use bytes::Bytes;
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use signpost_protocol::{Ack, Message, Revision, PROTOCOL};

use super::encode;
use crate::auth::{Caller, Credential};
use crate::lease::{self, Leaders};
use crate::listener::Peer;
use crate::model::Snapshot;
use crate::routers::{AckRefused, RouterKind, RouterRecord, Routers};

/// How often an idle stream carries a ping. Routers give up on a stream
/// silent for three times this.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Lines queued per subscriber before its feeder waits. Small on purpose:
/// while a feeder waits, `watch` coalesces revisions, so a slow router gets
/// one diff to the newest snapshot instead of a backlog.
const QUEUE: usize = 4;

pub struct Hub {
    registry: watch::Receiver<Arc<Snapshot>>,
    routers: Arc<Routers>,
    ping_interval: Duration,
    /// Ends every stream, so that graceful shutdown does not wait on them.
    stop: CancellationToken,
    /// True once the registry is worth routing on (see
    /// `reconcile::warmed_up`). Until then a subscriber is listed but sent
    /// nothing, and keeps routing on what it has: a router reconnecting to a
    /// restarted controller must not swap its table for an empty one.
    ready: watch::Receiver<Option<Instant>>,
    leaders: Leaders,
    /// The newest delta line sent, by the revisions it goes from and to.
    /// Subscribers that keep up all go from the same revision to the same
    /// next one: with 1,000 of them, one encoding serves them all.
    last_delta: Mutex<Option<(Revision, Revision, Bytes)>>,
}

#[derive(Deserialize)]
struct WatchQuery {
    router: String,
    protocol: u32,
    /// `haproxy` or `nginx` for an agent; a signpost router leaves it out.
    kind: Option<String>,
}

impl Hub {
    pub fn new(
        registry: watch::Receiver<Arc<Snapshot>>,
        routers: Arc<Routers>,
        ping_interval: Duration,
        stop: CancellationToken,
        ready: watch::Receiver<Option<Instant>>,
        leaders: Leaders,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            registry,
            routers,
            ping_interval,
            stop,
            ready,
            leaders,
            last_delta: Mutex::default(),
        })
    }

    /// The line that brings a subscriber from `sent` to `newest`: a delta,
    /// or a snapshot when that is smaller. Revisions name snapshots within
    /// this controller's epoch, so the pair names the line.
    fn update_line(&self, sent: &Snapshot, newest: &Snapshot) -> Bytes {
        let key = (sent.revision, newest.revision);
        if let Some((from, to, line)) = &*self.last_delta.lock().unwrap() {
            if (*from, *to) == key {
                return line.clone();
            }
        }
        let epoch = self.routers.epoch();
        let line: Bytes = encode::delta(epoch, sent, newest)
            .unwrap_or_else(|| encode::snapshot(epoch, newest))
            .to_line()
            .into();
        *self.last_delta.lock().unwrap() = Some((key.0, key.1, line.clone()));
        line
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

    /// Feeds one subscriber until it goes away or the controller stops.
    async fn feed(self: Arc<Self>, id: String, connection: u64, tx: mpsc::Sender<Bytes>) {
        let mut registry = self.registry.clone();
        let stop = self.stop.clone();
        let mut ready = self.ready.clone();
        let mut leadership = self.leaders.leadership.clone();
        let warmed = tokio::select! {
            r = ready.wait_for(Option::is_some) => r.is_ok(),
            _ = lease::stopped_leading(&mut leadership) => false,
            _ = tx.closed() => false,
            _ = stop.cancelled() => false,
        };
        if !warmed {
            self.routers.disconnect(&id, connection);
            return;
        }
        let mut sent = registry.borrow_and_update().clone();
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        if tx
            .send(
                encode::snapshot(self.routers.epoch(), &sent)
                    .to_line()
                    .into(),
            )
            .await
            .is_ok()
        {
            self.routers.sent(&id, connection, sent.revision);
            loop {
                let line = tokio::select! {
                    changed = registry.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let newest = registry.borrow_and_update().clone();
                        let line = self.update_line(&sent, &newest);
                        sent = newest;
                        line
                    }
                    _ = ping.tick() => Message::Ping { revision: sent.revision }.to_line().into(),
                    // The term ended: the router goes to the new leader.
                    _ = until(&mut ready, Option::is_none) => break,
                    _ = tx.closed() => break,
                    _ = stop.cancelled() => break,
                };
                if tx.send(line).await.is_err() {
                    break;
                }
                self.routers.sent(&id, connection, sent.revision);
            }
        }
        self.routers.disconnect(&id, connection);
    }
}

async fn watch_stream(
    State(hub): State<Arc<Hub>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    caller: Option<Extension<Caller>>,
    uri: Uri,
    Query(query): Query<WatchQuery>,
) -> Response {
    if let Some(refusal) = hub.not_the_leader(uri.query().unwrap_or_default()) {
        return refusal;
    }
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
    let kind = match query.kind.as_deref().map(RouterKind::of_watch) {
        None => RouterKind::Signpost,
        Some(Some(kind)) => kind,
        Some(None) => {
            let error = format!(
                "router kind {:?} not known; expected signpost, haproxy or nginx",
                query.kind.unwrap_or_default()
            );
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
        }
    };
    let address = peer.address;
    let connection = hub.routers.connect_kind(&query.router, address, kind);
    if let Some(Extension(caller)) = caller.filter(|c| c.credential != Credential::None) {
        hub.routers
            .identify(&query.router, connection, &caller.identity);
    }
    info!(router = %query.router, %address, kind = kind.label(), "router subscribed");
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

/// Resolves once `holds` does; never when the sender is gone, as nothing
/// changes any more.
async fn until<T>(rx: &mut watch::Receiver<T>, holds: impl FnMut(&T) -> bool) {
    if rx.wait_for(holds).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Hub {
    /// A follower's answer to a subscription: a redirect to the leader named
    /// in the lease, or 503 while none is known. Routers follow either.
    fn not_the_leader(&self, query: &str) -> Option<Response> {
        Some(match self.leaders.redirect()? {
            Ok(leader) => (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("{leader}/v1/watch?{query}"))],
                Json(json!({ "error": "not the leader", "leader": leader })),
            )
                .into_response(),
            Err(()) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "not the leader, and no leader is known yet: try again or another replica" })),
            )
                .into_response(),
        })
    }
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
    match hub.routers.acked(&id, ack) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => {
            let status = match refused {
                AckRefused::NotSubscribed { .. } => StatusCode::NOT_FOUND,
                AckRefused::OtherEpoch { .. } | AckRefused::NeverSent { .. } => {
                    StatusCode::CONFLICT
                }
            };
            (status, Json(json!({ "error": refused.to_string() }))).into_response()
        }
    }
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
        .routers
        .list()
        .into_iter()
        .map(|record| RouterView {
            lag: revision.saturating_sub(record.acked_revision.unwrap_or(0)),
            record,
        })
        .collect();
    let epoch = hub.routers.epoch();
    Json(json!({ "epoch": epoch, "revision": revision, "routers": routers })).into_response()
}
