//! Health checks: probes (HTTP, TCP, gRPC), the per-endpoint state machine, and
//! one scheduler task for all endpoints.
//!
//! The scheduler keeps a min-heap of due times and runs each probe as a
//! short-lived task, at most `max_concurrent_probes` at once. There is no
//! task or timer per endpoint: an idle endpoint costs a heap entry.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{HealthConfig, HealthSettings};
use crate::model::{Change, EndpointState, HealthCheck, InstanceId, Snapshot};
use crate::registry::Registry;

mod http;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProbeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    /// The gRPC health service answered with a status other than SERVING,
    /// or refused the call (no health service, unknown service name).
    #[error("gRPC health: {0}")]
    Grpc(String),
}

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: IpAddr,
    pub port: u16,
    pub check: HealthCheck,
    pub timeout: Duration,
}

/// The health-check side of the world: something that can probe a target.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self, target: &Target) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

/// Real probes over the network. HTTP connections are kept alive between
/// probes, so a steady state costs one request per interval, not a handshake.
#[derive(Clone, Default)]
pub struct NetProbe {
    http: Arc<http::HttpProbe>,
}

impl Probe for NetProbe {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError> {
        let addr = SocketAddr::new(target.address, target.port);
        let attempt = async {
            match &target.check {
                HealthCheck::Tcp => tokio::net::TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| ProbeError::Connect(e.to_string())),
                HealthCheck::Http { path } => self.http.check(addr, path).await,
                HealthCheck::Grpc { service } => grpc_health(addr, service).await,
            }
        };
        tokio::time::timeout(target.timeout, attempt)
            .await
            .unwrap_or(Err(ProbeError::Timeout(target.timeout)))
    }
}

/// One `grpc.health.v1.Health/Check` on a connection of its own: a
/// channel per probe costs an HTTP/2 handshake each interval, like a TCP
/// check, and keeps no state for instances that are gone.
async fn grpc_health(addr: SocketAddr, service: &str) -> Result<(), ProbeError> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ProbeError::Connect(error_chain(&e)))?
        .connect()
        .await
        .map_err(|e| ProbeError::Connect(error_chain(&e)))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|status| ProbeError::Grpc(format!("{:?}: {}", status.code(), status.message())))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(ProbeError::Grpc(other.as_str_name().into())),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// The per-endpoint state machine. Pure: feed it results, it says when the
/// state changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    pub state: EndpointState,
    passes: u32,
    failures: u32,
}

impl Tracker {
    pub fn new(state: EndpointState) -> Tracker {
        Tracker {
            state,
            passes: 0,
            failures: 0,
        }
    }

    /// Records one probe result; returns the new state on a transition.
    pub fn observe(&mut self, passed: bool, s: &HealthSettings) -> Option<EndpointState> {
        let next = if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            (self.state != EndpointState::Healthy && self.passes >= s.healthy_threshold)
                .then_some(EndpointState::Healthy)
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.state != EndpointState::Unhealthy && self.failures >= s.unhealthy_threshold)
                .then_some(EndpointState::Unhealthy)
        };
        if let Some(state) = next {
            self.state = state;
        }
        next
    }
}

type Key = (String, InstanceId);

struct Entry {
    target: Target,
    settings: HealthSettings,
    tracker: Tracker,
    /// Bumped whenever the entry is replaced, so stale heap items and late
    /// probe results for an older incarnation are ignored.
    generation: u64,
    probing: bool,
}

/// Runs every endpoint's health checks and reports verdicts to the registry.
pub struct HealthScheduler<P> {
    probe: Arc<P>,
    registry: Arc<Registry>,
    config: HealthConfig,
    entries: HashMap<Key, Entry>,
    due: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    next_generation: u64,
}

impl<P: Probe> HealthScheduler<P> {
    pub fn new(probe: P, registry: Arc<Registry>, config: HealthConfig) -> Self {
        HealthScheduler {
            probe: Arc::new(probe),
            registry,
            config,
            entries: HashMap::new(),
            due: BinaryHeap::new(),
            next_generation: 0,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut snapshots = self.registry.subscribe();
        let snapshot = snapshots.borrow_and_update().clone();
        self.sync_targets(&snapshot);
        let mut inflight: JoinSet<(Key, u64, Result<(), ProbeError>)> = JoinSet::new();
        loop {
            let next_due = self.due.peek().map(|Reverse((at, _, _))| *at);
            let has_room = inflight.len() < self.config.max_concurrent_probes;
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() { return; }
                    let snapshot = snapshots.borrow_and_update().clone();
                    self.sync_targets(&snapshot);
                }
                _ = sleep_until_opt(next_due), if has_room => {
                    self.start_due(&mut inflight);
                }
                Some(done) = inflight.join_next() => {
                    let mut changes = Vec::new();
                    let mut done = Some(done);
                    // Take every result that is ready, so a burst of verdicts
                    // becomes one registry revision.
                    while let Some(result) = done {
                        if let Ok((key, generation, result)) = result {
                            changes.extend(self.record(key, generation, result));
                        }
                        done = inflight.try_join_next();
                    }
                    if !changes.is_empty() {
                        self.registry.apply(&changes, SystemTime::now());
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Adds new endpoints (probed at once), drops gone ones, and updates the
    /// target of endpoints whose settings changed.
    fn sync_targets(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for (name, service) in &snapshot.services {
            let settings = self.config.for_service(name);
            // A draining endpoint is out of routing for good: its verdicts
            // would change nothing, so it is not probed.
            let checked = service
                .endpoints
                .iter()
                .filter(|(_, e)| e.state != EndpointState::Draining);
            for (id, endpoint) in checked {
                let key = (name.clone(), id.clone());
                let target = Target {
                    address: endpoint.address,
                    port: endpoint.port,
                    check: service.settings.health.clone(),
                    timeout: settings.timeout,
                };
                seen.insert(key.clone());
                // A fresh entry for a new endpoint, a new address, or one the
                // registry re-registered (back to `Starting`).
                let fresh = self.entries.get(&key).is_none_or(|e| {
                    (e.target.address, e.target.port) != (target.address, target.port)
                        || (endpoint.state == EndpointState::Starting
                            && e.tracker.state != EndpointState::Starting)
                });
                if !fresh {
                    let e = self.entries.get_mut(&key).expect("present when not fresh");
                    e.target = target;
                    e.settings = settings;
                    continue;
                }
                self.next_generation += 1;
                let generation = self.next_generation;
                self.entries.insert(
                    key.clone(),
                    Entry {
                        target,
                        settings,
                        tracker: Tracker::new(endpoint.state),
                        generation,
                        probing: false,
                    },
                );
                self.due.push(Reverse((now, generation, key)));
            }
        }
        self.entries.retain(|k, _| seen.contains(k));
    }

    fn start_due(&mut self, inflight: &mut JoinSet<(Key, u64, Result<(), ProbeError>)>) {
        let now = Instant::now();
        while inflight.len() < self.config.max_concurrent_probes {
            match self.due.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {}
                _ => return,
            }
            let Reverse((_, generation, key)) = self.due.pop().expect("peeked");
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            if entry.generation != generation || entry.probing {
                continue;
            }
            entry.probing = true;
            // The next probe is due one interval after this one started, so
            // a slow probe does not stretch the interval.
            self.due.push(Reverse((
                now + entry.settings.interval,
                generation,
                key.clone(),
            )));
            let probe = self.probe.clone();
            let target = entry.target.clone();
            inflight.spawn(async move {
                let result = probe.probe(&target).await;
                (key, generation, result)
            });
        }
    }

    fn record(
        &mut self,
        key: Key,
        generation: u64,
        result: Result<(), ProbeError>,
    ) -> Option<Change> {
        let entry = self
            .entries
            .get_mut(&key)
            .filter(|e| e.generation == generation)?;
        entry.probing = false;
        if let Err(e) = &result {
            debug!(service = %key.0, instance = %key.1, error = %e, "probe failed");
        }
        let state = entry.tracker.observe(result.is_ok(), &entry.settings)?;
        let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
        info!(service = %key.0, instance = %key.1, ?state, %reason, "health verdict");
        Some(Change::SetState {
            service: key.0,
            instance: key.1,
            address: entry.target.address,
            port: entry.target.port,
            state,
        })
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A probe whose answers tests set per address.
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Default)]
pub struct FakeProbe {
    pub healthy: Arc<std::sync::Mutex<HashMap<IpAddr, bool>>>,
    pub probes: Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(any(test, feature = "testing"))]
impl FakeProbe {
    pub fn set(&self, address: IpAddr, healthy: bool) {
        self.healthy.lock().unwrap().insert(address, healthy);
    }
}

#[cfg(any(test, feature = "testing"))]
impl Probe for FakeProbe {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError> {
        self.probes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let healthy = self.healthy.lock().unwrap().get(&target.address).copied();
        match healthy {
            Some(true) => Ok(()),
            _ => Err(ProbeError::Connect("refused (fake)".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServiceSettings};
    use std::collections::BTreeSet;

    fn settings() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    #[test]
    fn starting_needs_healthy_threshold_passes() {
        let mut t = Tracker::new(EndpointState::Starting);
        assert_eq!(t.observe(true, &settings()), None);
        assert_eq!(t.observe(true, &settings()), Some(EndpointState::Healthy));
        assert_eq!(t.observe(true, &settings()), None);
    }

    #[test]
    fn healthy_needs_unhealthy_threshold_consecutive_failures() {
        let mut t = Tracker::new(EndpointState::Healthy);
        assert_eq!(t.observe(false, &settings()), None);
        assert_eq!(t.observe(false, &settings()), None);
        assert_eq!(
            t.observe(true, &settings()),
            None,
            "a pass resets the count"
        );
        assert_eq!(t.observe(false, &settings()), None);
        assert_eq!(t.observe(false, &settings()), None);
        assert_eq!(
            t.observe(false, &settings()),
            Some(EndpointState::Unhealthy)
        );
        assert_eq!(t.observe(true, &settings()), None);
        assert_eq!(t.observe(true, &settings()), Some(EndpointState::Healthy));
    }

    #[test]
    fn starting_that_keeps_failing_becomes_unhealthy() {
        let mut t = Tracker::new(EndpointState::Starting);
        for _ in 0..2 {
            assert_eq!(t.observe(false, &settings()), None);
        }
        assert_eq!(
            t.observe(false, &settings()),
            Some(EndpointState::Unhealthy)
        );
    }

    fn registry_with(addresses: &[[u8; 4]]) -> Arc<Registry> {
        let registry = Arc::new(Registry::new());
        let mut changes = vec![Change::PutService {
            name: "users".into(),
            settings: ServiceSettings {
                route: "/users".into(),
                port: 80,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::new(),
        }];
        for (n, a) in addresses.iter().enumerate() {
            changes.push(Change::AddEndpoint {
                service: "users".into(),
                endpoint: Endpoint {
                    instance_id: format!("i-{n}").into(),
                    address: (*a).into(),
                    port: 80,
                    zone: "a".into(),
                    group: "g".into(),
                    state: EndpointState::Starting,
                    since: SystemTime::UNIX_EPOCH,
                },
            });
        }
        registry.apply(&changes, SystemTime::now());
        registry
    }

    fn state(registry: &Registry, id: &str) -> EndpointState {
        registry
            .snapshot()
            .endpoint("users", &id.into())
            .unwrap()
            .state
    }

    /// Advances paused time in small steps until `cond` holds, with a deadline.
    async fn advance_until(limit: Duration, cond: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "condition not met within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        start.elapsed()
    }

    /// The gRPC probe against a real gRPC health server (tonic-health) on
    /// loopback: SERVING passes, anything else fails with the status.
    #[tokio::test]
    async fn grpc_probe_passes_only_on_serving() {
        use tonic_health::ServingStatus;

        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("echo.Echo", ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let probe = |service: &str| {
            let target = Target {
                address: addr.ip(),
                port: addr.port(),
                check: HealthCheck::Grpc {
                    service: service.into(),
                },
                timeout: Duration::from_secs(5),
            };
            async move { NetProbe::default().probe(&target).await }
        };

        assert_eq!(probe("").await, Ok(()), "the server as a whole");
        assert_eq!(
            probe("echo.Echo").await,
            Err(ProbeError::Grpc("NOT_SERVING".into()))
        );
        let unknown = probe("nope.Nope").await.unwrap_err();
        assert!(
            matches!(&unknown, ProbeError::Grpc(m) if m.starts_with("NotFound")),
            "{unknown}"
        );
        reporter
            .set_service_status("echo.Echo", ServingStatus::Serving)
            .await;
        assert_eq!(probe("echo.Echo").await, Ok(()));

        server.abort();
        let closed = probe("").await.unwrap_err();
        assert!(matches!(closed, ProbeError::Connect(_)), "{closed}");
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_drives_endpoints_through_their_states() {
        let registry = registry_with(&[[127, 42, 1, 4], [127, 42, 1, 5]]);
        let probe = FakeProbe::default();
        probe.set([127, 42, 1, 4].into(), true);
        let config = HealthConfig::default();
        let shutdown = CancellationToken::new();
        tokio::spawn(HealthScheduler::new(probe.clone(), registry.clone(), config).run(shutdown));

        // Two passes, 5 s apart: healthy after one interval, not before.
        let took = advance_until(Duration::from_secs(30), || {
            state(&registry, "i-0") == EndpointState::Healthy
        })
        .await;
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert_eq!(state(&registry, "i-1"), EndpointState::Starting);

        // Three failures: unhealthy after two more intervals.
        probe.set([127, 42, 1, 4].into(), false);
        let took = advance_until(Duration::from_secs(30), || {
            state(&registry, "i-0") == EndpointState::Unhealthy
        })
        .await;
        assert!(
            took >= Duration::from_secs(10) && took <= Duration::from_secs(16),
            "{took:?}"
        );
        assert_eq!(state(&registry, "i-1"), EndpointState::Unhealthy);

        probe.set([127, 42, 1, 5].into(), true);
        advance_until(Duration::from_secs(30), || {
            state(&registry, "i-1") == EndpointState::Healthy
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn removed_endpoints_stop_being_probed() {
        let registry = registry_with(&[[127, 42, 1, 4]]);
        let probe = FakeProbe::default();
        let shutdown = CancellationToken::new();
        tokio::spawn(
            HealthScheduler::new(probe.clone(), registry.clone(), HealthConfig::default())
                .run(shutdown),
        );
        let probes = probe.probes.clone();
        advance_until(Duration::from_secs(20), || {
            probes.load(std::sync::atomic::Ordering::SeqCst) >= 2
        })
        .await;
        registry.apply(
            &[Change::RemoveEndpoint {
                service: "users".into(),
                instance: "i-0".into(),
                reason: "test",
            }],
            SystemTime::now(),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let before = probes.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(probes.load(std::sync::atomic::Ordering::SeqCst), before);
    }
}
