//! What every agent shares: the state the subscriber and the reporter see
//! (`client::Dataplane`), the loop that drives a proxy towards the newest
//! snapshot, and `/readyz`.
//!
//! The loop is level-triggered: on every snapshot and every poll it asks
//! the proxy to route as the snapshot says, which is a no-op when it
//! already does, so a proxy that restarted or lost a change is put right
//! within one poll. A revision counts as applied, and is acked, only when
//! `Proxy::apply` says the proxy has it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use signpost_protocol::{Ack, Mirror};
use signpost_router::client::Dataplane;
use signpost_router::{Applied, Source};

/// Requests in flight: service → instance → count.
pub type InFlight = BTreeMap<String, BTreeMap<String, u64>>;

/// A proxy an agent drives.
pub trait Proxy: Send + 'static {
    /// Its router kind, as the controller lists it.
    const KIND: &'static str;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Makes the proxy route as `desired` says; `Ok` only once the proxy
    /// has it in effect. Called on every snapshot and every poll, so it
    /// must be cheap when there is nothing to do.
    fn apply(&mut self, desired: &Mirror) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Requests in flight to endpoints that take no new ones: those not
    /// routable in `desired`, and those gone from it that still have some.
    fn in_flight(
        &mut self,
        desired: &Mirror,
    ) -> impl Future<Output = Result<InFlight, Self::Error>> + Send;
}

/// What the subscriber, the reporter, the cache writer, `/readyz` and the
/// driving loop share.
pub struct AgentState {
    kind: &'static str,
    /// The newest snapshot, from the controller or the cache file: what the
    /// proxy should route on. Only the driving loop reads it.
    desired: watch::Sender<Option<(Arc<Mirror>, Source)>>,
    /// What the proxy has confirmed: acked by the reporter.
    applied: watch::Sender<Applied>,
    /// Measured after each apply and every poll, so that an ack of a
    /// revision carries what was in flight once the proxy had it.
    in_flight: Mutex<InFlight>,
    nudge: Notify,
    connected: AtomicBool,
    /// Why the proxy does not have the newest snapshot, until it does.
    error: Mutex<Option<String>>,
}

impl AgentState {
    pub fn new(kind: &'static str) -> Arc<AgentState> {
        Arc::new(AgentState {
            kind,
            desired: watch::Sender::new(None),
            applied: watch::Sender::new(Applied::default()),
            in_flight: Mutex::default(),
            nudge: Notify::new(),
            connected: AtomicBool::new(false),
            error: Mutex::default(),
        })
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }
}

impl Dataplane for AgentState {
    fn publish(&self, mirror: &Mirror, source: Source) {
        self.desired
            .send_replace(Some((Arc::new(mirror.clone()), source)));
    }

    fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    fn report(&self, _now: Instant) -> Option<Ack> {
        let applied = self.applied.borrow();
        Some(Ack {
            epoch: applied.mirror.epoch?,
            revision: applied.mirror.revision?,
            in_flight: self.in_flight.lock().unwrap().clone(),
            ejected: Vec::new(),
        })
    }

    fn nudged(&self) -> &Notify {
        &self.nudge
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    fn kind(&self) -> Option<&'static str> {
        Some(self.kind)
    }
}

/// Drives `proxy` towards the newest snapshot until `stop`: applies on
/// every snapshot and every `poll`, retries failures with back-off (a
/// failed revision is never acked), and measures what is in flight.
pub async fn drive<P: Proxy>(
    mut proxy: P,
    state: Arc<AgentState>,
    poll: Duration,
    stop: CancellationToken,
) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    let mut retry_at: Option<Instant> = None;
    let mut desired = state.desired.subscribe();
    loop {
        let changed = tokio::select! {
            r = desired.changed() => {
                if r.is_err() {
                    return;
                }
                true
            }
            _ = tokio::time::sleep(poll) => false,
            _ = stop.cancelled() => return,
        };
        let Some((mirror, source)) = desired.borrow_and_update().clone() else {
            continue;
        };
        if !changed && retry_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        if let Err(e) = proxy.apply(&mirror).await {
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            retry_at = Some(Instant::now() + delay);
            let error = e.to_string();
            let mut last = state.error.lock().unwrap();
            if last.as_deref() != Some(&error) {
                warn!(error = %error, revision = ?mirror.revision, retry_in = ?delay, "the proxy does not have the newest revision; not acking it");
            }
            *last = Some(error);
            drop(last);
        } else {
            if retry_at.take().is_some() {
                delays = backoff.build();
            }
            if state.error.lock().unwrap().take().is_some() {
                info!(revision = ?mirror.revision, "the proxy has the newest revision again");
            }
        }
        // Measured before the applied revision is published: its ack must
        // count what was in flight once the proxy had it.
        match proxy.in_flight(&mirror).await {
            Ok(now) => {
                let mut in_flight = state.in_flight.lock().unwrap();
                if *in_flight != now {
                    *in_flight = now;
                    drop(in_flight);
                    state.nudge.notify_one();
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the requests in flight; reporting the last known")
            }
        }
        if retry_at.is_none() {
            state.applied.send_if_modified(|a| {
                let same = a.source == Some(source)
                    && a.mirror.epoch == mirror.epoch
                    && a.mirror.revision == mirror.revision;
                if !same {
                    a.source = Some(source);
                    a.mirror = mirror.clone();
                }
                !same
            });
        }
    }
}

pub fn admin_routes(state: Arc<AgentState>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Ready when the proxy has the newest snapshot the agent holds; otherwise
/// 503 with the reason (the proxy's error, or no snapshot yet).
async fn readyz(State(state): State<Arc<AgentState>>) -> Response {
    let applied = state.applied.borrow().clone();
    let desired = state.desired.borrow().as_ref().map(|(m, _)| m.revision);
    let error = state.error.lock().unwrap().clone();
    let ready = applied.mirror.revision.is_some() && error.is_none();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "kind": state.kind,
        "revision": applied.mirror.revision,
        "desired_revision": desired.flatten(),
        "source": applied.source,
        "connected": state.connected.load(Ordering::Relaxed),
        "error": error,
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_protocol::{Message, PROTOCOL};
    use std::sync::atomic::AtomicUsize;

    /// A proxy that refuses while `failing` is set, and has one request in
    /// flight to `i-1` once it applied.
    struct FakeProxy {
        failing: Arc<AtomicBool>,
        applies: Arc<AtomicUsize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("socket gone")]
    struct Gone;

    impl Proxy for FakeProxy {
        const KIND: &'static str = "fake";
        type Error = Gone;

        async fn apply(&mut self, _desired: &Mirror) -> Result<(), Gone> {
            self.applies.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                Err(Gone)
            } else {
                Ok(())
            }
        }

        async fn in_flight(&mut self, _desired: &Mirror) -> Result<InFlight, Gone> {
            Ok(InFlight::from([(
                "web".to_owned(),
                BTreeMap::from([("i-1".to_owned(), 1)]),
            )]))
        }
    }

    fn mirror(revision: u64) -> Mirror {
        let line = format!(
            r#"{{"type":"snapshot","protocol":{PROTOCOL},"epoch":1,"revision":{revision},"services":[]}}"#
        );
        let mut m = Mirror::default();
        m.apply(Message::from_line(line.as_bytes()).unwrap())
            .unwrap();
        m
    }

    #[tokio::test(start_paused = true)]
    async fn a_revision_the_proxy_refused_is_not_acked_and_is_retried() {
        let state = AgentState::new("fake");
        let failing = Arc::new(AtomicBool::new(true));
        let applies = Arc::new(AtomicUsize::new(0));
        let proxy = FakeProxy {
            failing: failing.clone(),
            applies: applies.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(drive(
            proxy,
            state.clone(),
            Duration::from_millis(100),
            stop.clone(),
        ));
        state.publish(&mirror(4), Source::Controller);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(state.report(Instant::now()).is_none(), "nothing acked");
        assert_eq!(state.error.lock().unwrap().as_deref(), Some("socket gone"));
        let tries = applies.load(Ordering::SeqCst);
        assert!((3..30).contains(&tries), "retried with back-off: {tries}");

        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let ack = state.report(Instant::now()).expect("acked once applied");
        assert_eq!(ack.revision, 4);
        assert_eq!(ack.in_flight["web"]["i-1"], 1);
        assert!(state.error.lock().unwrap().is_none());
        assert_eq!(state.applied.borrow().source, Some(Source::Controller));
        stop.cancel();
        task.await.unwrap();
    }
}
