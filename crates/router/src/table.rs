//! The route table: path prefix → service → the endpoints a request may go
//! to. Built off the request path on every applied revision and swapped in
//! whole; requests read it without a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::upstream;
use signpost_protocol::{Ejection, EjectionReason, Mirror};
use signpost_protocol::{Epoch, Revision};

/// Consecutive failures (connect errors, 5xx, timeouts) that eject an endpoint.
pub const EJECT_AFTER: u32 = 3;
/// First ejection period; doubled for each ejection in a row, up to `EJECT_MAX`.
pub const EJECT_BASE: Duration = Duration::from_secs(5);
pub const EJECT_MAX: Duration = Duration::from_secs(60);

/// Where requests go: routes sorted longest prefix first.
#[derive(Default)]
pub struct RouteTable {
    /// `None` until the router has a snapshot, from the controller or its cache.
    pub revision: Option<Revision>,
    /// The controller lifetime `revision` belongs to.
    pub epoch: Option<Epoch>,
    routes: Vec<Route>,
    /// Endpoints no longer routable with requests to them still in flight.
    /// Kept so that the router goes on reporting those requests: the
    /// controller lets a draining instance terminate only once they are done.
    pub retiring: Vec<Arc<Endpoint>>,
}

pub struct Route {
    pub prefix: String,
    pub service: Arc<ServiceEndpoints>,
}

pub struct ServiceEndpoints {
    pub name: String,
    /// Only endpoints the registry says are healthy: the registry's health
    /// checks are the authority, passive ejection only narrows this set.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Round-robin cursor.
    pub next: AtomicUsize,
}

/// One endpoint and what the router learns about it from its own traffic.
/// Shared between tables while the endpoint keeps its address, so that
/// in-flight counts and ejections survive a new revision.
pub struct Endpoint {
    pub service: String,
    pub instance: String,
    pub addr: SocketAddr,
    /// `Host` for a request that came without one (HTTP/1.0).
    pub host: String,
    /// Kept-alive connections; they close when the endpoint leaves the table
    /// and its last request is done.
    pub connections: upstream::Idle,
    pub in_flight: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejections in a row, for the back-off.
    ejections: AtomicU32,
    /// Milliseconds after `epoch` until which the endpoint is ejected; 0: not.
    ejected_until: AtomicU64,
    reason: AtomicU32,
    epoch: Instant,
}

/// What a request learned about its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ConnectFailure,
    ServerError,
}

impl Endpoint {
    pub fn new(service: &str, instance: &str, addr: SocketAddr) -> Endpoint {
        Endpoint {
            service: service.to_owned(),
            instance: instance.to_owned(),
            addr,
            host: addr.to_string(),
            connections: upstream::Idle::default(),
            in_flight: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            reason: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.millis(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Records a request's outcome; returns true when this outcome ejected
    /// the endpoint (the router then tells the controller at once).
    pub fn record(&self, outcome: Outcome, now: Instant) -> bool {
        if outcome == Outcome::Success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < EJECT_AFTER || self.is_ejected(now) {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(4);
        let period = (EJECT_BASE * 2u32.pow(n)).min(EJECT_MAX);
        self.reason.store(outcome as u32, Ordering::Relaxed);
        self.ejected_until
            .store(self.millis(now + period), Ordering::Relaxed);
        warn!(service = %self.service, instance = %self.instance, ?outcome, failures, ?period, "endpoint ejected");
        true
    }

    pub fn ejection(&self, now: Instant) -> Option<Ejection> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let at = self.millis(now);
        (at < until).then(|| Ejection {
            service: self.service.clone(),
            instance: self.instance.clone(),
            reason: if self.reason.load(Ordering::Relaxed) == Outcome::ServerError as u32 {
                EjectionReason::ServerErrors
            } else {
                EjectionReason::ConnectFailures
            },
            remaining_ms: until - at,
        })
    }
}

impl RouteTable {
    /// Builds the table for `mirror`, reusing the `Endpoint`s in `known` that
    /// kept their address, and leaving in `known` the new table's (routable
    /// and retiring).
    pub fn build(
        mirror: &Mirror,
        known: &mut HashMap<(String, String), Arc<Endpoint>>,
    ) -> RouteTable {
        let mut next_known = HashMap::new();
        let mut routes: Vec<Route> = Vec::new();
        for (name, service) in &mirror.services {
            let endpoints = service
                .endpoints
                .values()
                .filter(|e| e.state.is_routable())
                .map(|e| {
                    let key = (name.clone(), e.instance.clone());
                    let addr = SocketAddr::new(e.address, e.port);
                    let endpoint = match known.get(&key) {
                        Some(b) if b.addr == addr => b.clone(),
                        _ => Arc::new(Endpoint::new(name, &e.instance, addr)),
                    };
                    next_known.insert(key, endpoint.clone());
                    endpoint
                })
                .collect();
            if let Some(other) = routes.iter().find(|r| r.prefix == service.route) {
                warn!(route = %service.route, service = %name, kept = %other.service.name, "two services share a route; the first by name wins");
                continue;
            }
            routes.push(Route {
                prefix: service.route.clone(),
                service: Arc::new(ServiceEndpoints {
                    name: name.clone(),
                    endpoints,
                    next: AtomicUsize::new(0),
                }),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut retiring = Vec::new();
        for (key, endpoint) in known.drain() {
            if !next_known.contains_key(&key) && endpoint.in_flight.load(Ordering::Relaxed) > 0 {
                retiring.push(endpoint.clone());
                next_known.insert(key, endpoint);
            }
        }
        *known = next_known;
        RouteTable {
            revision: mirror.revision,
            epoch: mirror.epoch,
            routes,
            retiring,
        }
    }

    /// The service whose route is the longest prefix of `path`. Prefixes
    /// match whole segments: `/users` matches `/users` and `/users/1`, not
    /// `/usersx`.
    pub fn lookup(&self, path: &str) -> Option<&Arc<ServiceEndpoints>> {
        self.routes
            .iter()
            .find(|r| prefix_matches(&r.prefix, path))
            .map(|r| &r.service)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEndpoints>> {
        self.routes.iter().map(|r| &r.service)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_protocol::{Epoch, Message, WireEndpoint, WireService, WireState, PROTOCOL};

    type Spec<'a> = (&'a str, &'a str, &'a [(&'a str, u8, WireState)]);

    fn mirror(services: &[Spec<'_>]) -> Mirror {
        let mut m = Mirror::default();
        m.apply(Message::Snapshot {
            protocol: PROTOCOL,
            epoch: Epoch::from_bits(1),
            revision: 1,
            services: services
                .iter()
                .map(|(name, route, eps)| WireService {
                    name: name.to_string(),
                    route: route.to_string(),
                    endpoints: eps
                        .iter()
                        .map(|(id, last, state)| WireEndpoint {
                            instance: id.to_string(),
                            address: [127, 0, 0, *last].into(),
                            port: 80,
                            zone: "a".into(),
                            state: *state,
                        })
                        .collect(),
                })
                .collect(),
        })
        .unwrap();
        m
    }

    #[test]
    fn the_longest_prefix_wins_on_segment_boundaries() {
        let h = WireState::Healthy;
        let m = mirror(&[
            ("users", "/users", &[("i-1", 1, h)]),
            ("admin", "/users/admin", &[("i-2", 2, h)]),
            ("root", "/", &[("i-3", 3, h)]),
        ]);
        let table = RouteTable::build(&m, &mut HashMap::new());
        let name = |p: &str| table.lookup(p).map(|s| s.name.clone());
        assert_eq!(name("/users/admin/x").as_deref(), Some("admin"));
        assert_eq!(name("/users/admin").as_deref(), Some("admin"));
        assert_eq!(name("/users/administrator").as_deref(), Some("users"));
        assert_eq!(name("/users").as_deref(), Some("users"));
        assert_eq!(name("/usersx").as_deref(), Some("root"));
        assert_eq!(name("/other").as_deref(), Some("root"));
        let without_root = mirror(&[("users", "/users", &[("i-1", 1, h)])]);
        let table = RouteTable::build(&without_root, &mut HashMap::new());
        assert!(table.lookup("/usersx").is_none());
    }

    #[test]
    fn only_healthy_endpoints_are_routable_and_their_state_survives_rebuilds() {
        let m = mirror(&[(
            "users",
            "/users",
            &[
                ("i-1", 1, WireState::Healthy),
                ("i-2", 2, WireState::Starting),
                ("i-3", 3, WireState::Unhealthy),
            ],
        )]);
        let mut known = HashMap::new();
        let first = RouteTable::build(&m, &mut known);
        let eps = &first.lookup("/users").unwrap().endpoints;
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].instance, "i-1");
        eps[0].in_flight.store(7, Ordering::Relaxed);
        let second = RouteTable::build(&m, &mut known);
        assert_eq!(
            second.lookup("/users").unwrap().endpoints[0]
                .in_flight
                .load(Ordering::Relaxed),
            7,
            "in-flight counts carry over to the next table"
        );
    }

    #[test]
    fn an_endpoint_leaving_with_requests_in_flight_is_kept_as_retiring() {
        let spec = |state| mirror(&[("users", "/users", &[("i-1", 1, state), ("i-2", 2, state)])]);
        let mut known = HashMap::new();
        let first = RouteTable::build(&spec(WireState::Healthy), &mut known);
        let eps = &first.lookup("/users").unwrap().endpoints;
        eps[0].in_flight.store(2, Ordering::Relaxed);
        let draining = RouteTable::build(&spec(WireState::Draining), &mut known);
        assert!(draining.lookup("/users").unwrap().endpoints.is_empty());
        let retiring: Vec<_> = draining
            .retiring
            .iter()
            .map(|b| b.instance.clone())
            .collect();
        assert_eq!(retiring, ["i-1"], "only the one with requests in flight");
        draining.retiring[0].in_flight.store(0, Ordering::Relaxed);
        let later = RouteTable::build(&spec(WireState::Draining), &mut known);
        assert!(
            later.retiring.is_empty(),
            "let go once its requests are done"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_with_a_growing_back_off() {
        let b = Endpoint::new("users", "i-1", "127.0.0.1:80".parse().unwrap());
        let now = Instant::now();
        assert!(!b.record(Outcome::ConnectFailure, now));
        assert!(
            !b.record(Outcome::Success, now),
            "a success resets the count"
        );
        assert!(!b.record(Outcome::ServerError, now));
        assert!(!b.record(Outcome::ServerError, now));
        assert!(b.record(Outcome::ServerError, now), "third in a row ejects");
        assert!(b.is_ejected(now));
        assert_eq!(
            b.ejection(now).unwrap().reason,
            EjectionReason::ServerErrors
        );
        tokio::time::advance(EJECT_BASE).await;
        assert!(
            !b.is_ejected(Instant::now()),
            "tried again after the back-off"
        );
        assert!(
            b.record(Outcome::ConnectFailure, Instant::now()),
            "still failing: ejected again"
        );
        tokio::time::advance(EJECT_BASE).await;
        assert!(
            b.is_ejected(Instant::now()),
            "the second ejection lasts longer"
        );
        tokio::time::advance(EJECT_BASE).await;
        assert!(!b.is_ejected(Instant::now()));
    }
}
