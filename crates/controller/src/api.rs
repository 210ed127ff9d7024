//! The controller's HTTP API: the registry, liveness and readiness.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::auth::Refusals;
use crate::events::EventCounts;
use crate::lease::{Leaders, Leadership};
use crate::lifecycle::LifecycleLog;
use crate::metrics::{self, Page};
use crate::model::{
    Endpoint, EndpointState, GroupProblem, Revision, Service, ServiceSettings, Snapshot,
};
use crate::reconcile::SyncStatus;
use crate::routers::{RouterKind, Routers};
use crate::xds::ads::XdsMetrics;

#[derive(Clone)]
pub struct ApiState {
    pub registry: watch::Receiver<Arc<Snapshot>>,
    pub sync: watch::Receiver<SyncStatus>,
    pub resync_interval: Duration,
    pub events: Arc<EventCounts>,
    pub routers: Arc<Routers>,
    pub lifecycle: Arc<LifecycleLog>,
    pub xds: Arc<XdsMetrics>,
    pub leaders: Leaders,
    pub refusals: Arc<Refusals>,
}

pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/lifecycle", get(lifecycle_actions))
        .with_state(state)
}

/// A service as the API shows it: endpoints as a list, counts, and the
/// problems of its groups.
#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    #[serde(flatten)]
    settings: &'a ServiceSettings,
    groups: Vec<&'a str>,
    healthy: usize,
    endpoints: Vec<&'a Endpoint>,
    problems: Vec<&'a GroupProblem>,
}

fn view<'a>(service: &'a Service, snapshot: &'a Snapshot) -> ServiceView<'a> {
    ServiceView {
        name: &service.name,
        settings: &service.settings,
        groups: service.groups.iter().map(String::as_str).collect(),
        healthy: service
            .endpoints
            .values()
            .filter(|e| e.state.is_routable())
            .count(),
        endpoints: service.endpoints.values().collect(),
        problems: snapshot
            .problems
            .values()
            .filter(|p| p.service.as_deref() == Some(service.name.as_str()))
            .collect(),
    }
}

#[derive(Serialize)]
struct ServicesView<'a> {
    revision: Revision,
    services: Vec<ServiceView<'a>>,
    /// Every misconfigured group, including those naming no usable service.
    problems: Vec<&'a GroupProblem>,
}

async fn list_services(State(state): State<ApiState>) -> Response {
    let snapshot = state.registry.borrow().clone();
    Json(ServicesView {
        revision: snapshot.revision,
        services: snapshot
            .services
            .values()
            .map(|s| view(s, &snapshot))
            .collect(),
        problems: snapshot.problems.values().collect(),
    })
    .into_response()
}

async fn get_service(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let snapshot = state.registry.borrow().clone();
    match snapshot.services.get(&name) {
        Some(service) => {
            let mut body = serde_json::to_value(view(service, &snapshot)).expect("serializes");
            body["revision"] = snapshot.revision.into();
            Json(body).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no service named {name:?}") })),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let sync = state.sync.borrow().clone();
    let revision = state.registry.borrow().revision;
    let verdict = sync.readiness(SystemTime::now(), state.resync_interval);
    let status = if verdict.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": verdict.is_ok(),
        "reason": verdict.err(),
        "revision": revision,
        "sync": sync,
        "events": &*state.events,
        "leadership": state.leaders.json(),
        // Not a reason to be unready: the controller serves the routers
        // that are here; a missing one is the operator's to bring back.
        "routers_missing": state.routers.missing(),
    });
    (status, Json(body)).into_response()
}

/// `GET /metrics`: every family of `metrics`, read off the controller's
/// state now, in the Prometheus text format (0.0.4).
async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        page(&state).render(),
    )
        .into_response()
}

fn page(state: &ApiState) -> Page {
    use std::sync::atomic::Ordering::Relaxed;

    let snapshot = state.registry.borrow().clone();
    let sync = state.sync.borrow().clone();
    let mut page = Page::default();

    page.gauge(&metrics::REGISTRY_REVISION, snapshot.revision as f64);
    let mut endpoints = Vec::new();
    for service in snapshot.services.values() {
        for endpoint_state in EndpointState::ALL {
            let n = service
                .endpoints
                .values()
                .filter(|e| e.state == endpoint_state)
                .count();
            endpoints.push(([service.name.as_str(), endpoint_state.label()], n as f64));
        }
    }
    page.gauges(&metrics::ENDPOINTS, endpoints);
    page.gauge(
        &metrics::MISCONFIGURED_GROUPS,
        snapshot
            .problems
            .keys()
            .filter(|k| !crate::guard::is_guard_problem(k))
            .count() as f64,
    );
    page.gauge(
        &metrics::REMOVALS_HELD,
        sync.held_removals
            .iter()
            .map(|h| h.instances.len())
            .sum::<usize>() as f64,
    );

    let ready = sync
        .readiness(SystemTime::now(), state.resync_interval)
        .is_ok();
    page.gauge(&metrics::READY, f64::from(u8::from(ready)));
    let leadership = state.leaders.leadership.borrow().clone();
    page.gauge(
        &metrics::LEADER,
        f64::from(u8::from(leadership.is_leader())),
    );
    let (token, since) = match &leadership {
        Leadership::Single => (0, None),
        Leadership::Leader(t) => (t.token, Some(t.since_wall)),
        Leadership::Follower { leader } => (leader.as_ref().map_or(0, |l| l.token), None),
    };
    page.gauge(&metrics::LEASE_TOKEN, token as f64);
    page.counters(&metrics::LEASE_CALLS, state.leaders.calls.counts());
    page.gauge(
        &metrics::LEADER_SINCE,
        since
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    let last_success = sync
        .last_success
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    page.gauge(&metrics::SYNC_LAST_SUCCESS, last_success);
    page.gauge(
        &metrics::SYNC_LAST_DURATION,
        sync.last_duration_ms.unwrap_or(0) as f64 / 1000.0,
    );
    page.counter(&metrics::SYNCS, sync.syncs_total);
    let calls = sync.calls_total;
    page.counters(
        &metrics::AWS_CALLS,
        [
            (
                ["DescribeAutoScalingGroups"],
                u64::from(calls.describe_auto_scaling_groups),
            ),
            (["DescribeInstances"], u64::from(calls.describe_instances)),
            (
                ["DescribeLifecycleHooks"],
                u64::from(calls.describe_lifecycle_hooks),
            ),
        ],
    );
    page.counters(
        &metrics::SYNC_FAILURES,
        sync.failures_total
            .iter()
            .map(|((api, kind), n)| ([*api, kind.label()], *n)),
    );

    let events = &state.events;
    page.counters(
        &metrics::EVENTS,
        [
            (["handled"], events.handled.load(Relaxed)),
            (["malformed"], events.malformed.load(Relaxed)),
            (["receive_error"], events.receive_errors.load(Relaxed)),
        ],
    );
    let receive_failures = events.receive_failures.lock().unwrap().clone();
    page.counters(
        &metrics::EVENT_RECEIVE_FAILURES,
        receive_failures
            .into_iter()
            .map(|(kind, n)| ([kind.label()], n)),
    );

    let routers = state.routers.list();
    let connected: Vec<_> = routers.iter().filter(|r| r.connected).collect();
    page.gauge(&metrics::ROUTERS_CONNECTED, connected.len() as f64);
    page.gauges(
        &metrics::ROUTERS_BY_KIND,
        RouterKind::ALL.into_iter().map(|kind| {
            let n = connected.iter().filter(|r| r.kind == kind).count();
            ([kind.label()], n as f64)
        }),
    );
    page.gauge(
        &metrics::ROUTERS_MISSING,
        state.routers.missing().len() as f64,
    );
    let xds = &state.xds;
    page.counters(
        &metrics::XDS_NACKS,
        xds.nacks.lock().unwrap().iter().map(|(t, n)| ([*t], *n)),
    );
    page.counters(
        &metrics::XDS_BAD_REQUESTS,
        xds.bad_requests
            .lock()
            .unwrap()
            .iter()
            .map(|(why, n)| ([*why], *n)),
    );
    page.counter(&metrics::XDS_RESPONSES, xds.responses.load(Relaxed));
    page.gauges(
        &metrics::ROUTER_LAG,
        connected.iter().map(|r| {
            let acked = r.acked_revision.unwrap_or(0);
            (
                [r.id.as_str()],
                snapshot.revision.saturating_sub(acked) as f64,
            )
        }),
    );
    let ignored = &state.routers.ignored;
    page.counters(
        &metrics::ACKS_IGNORED,
        [
            (["other_epoch"], ignored.other_epoch.load(Relaxed)),
            (["never_sent"], ignored.never_sent.load(Relaxed)),
            (["not_subscribed"], ignored.not_subscribed.load(Relaxed)),
        ],
    );
    page.counters(
        &metrics::AUTH_REFUSALS,
        state
            .refusals
            .counts()
            .into_iter()
            .map(|(why, n)| ([why], n)),
    );

    let lifecycle = state.lifecycle.metrics();
    page.counters(
        &metrics::LIFECYCLE_ACTIONS,
        lifecycle
            .results
            .iter()
            .map(|((transition, result), n)| ([transition.label(), result.label()], *n)),
    );
    page.counters(
        &metrics::LIFECYCLE_TIMEOUTS,
        lifecycle
            .timeouts
            .iter()
            .map(|(stage, n)| ([stage.label()], *n)),
    );
    page.counters(
        &metrics::LIFECYCLE_HEARTBEATS,
        [
            (["ok"], lifecycle.heartbeats - lifecycle.heartbeat_errors),
            (["error"], lifecycle.heartbeat_errors),
        ],
    );
    page.histogram(&metrics::LAUNCH_HEALTHY, &lifecycle.launch_healthy);
    page.histogram(&metrics::LAUNCH_ACKED, &lifecycle.launch_acked);
    page.histogram(&metrics::HEALTHY_TO_ACKED, &lifecycle.healthy_to_acked);
    page.histogram(&metrics::TERMINATE_DRAINED, &lifecycle.terminate_drained);
    let push_to_ack = state.xds.push_to_ack.lock().unwrap().clone();
    page.histogram(&metrics::XDS_PUSH_TO_ACK, &push_to_ack);
    page
}

/// `GET /v1/lifecycle`: hook actions under way and the last completed ones.
async fn lifecycle_actions(State(state): State<ApiState>) -> Response {
    let (active, recent) = state.lifecycle.actions();
    Json(json!({ "leadership": state.leaders.json(), "active": active, "recent": recent }))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// `GET /metrics` through the API's routes.
    async fn scrape(state: ApiState) -> String {
        let request = Request::get("/metrics").body(Body::empty()).unwrap();
        let response = routes(state).oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn state_with(service: &str, router: &str) -> ApiState {
        let endpoint = Endpoint {
            instance_id: "i-1".into(),
            address: [127, 42, 1, 4].into(),
            port: 80,
            zone: "a".into(),
            group: "g".into(),
            state: EndpointState::Healthy,
            since: SystemTime::UNIX_EPOCH,
        };
        let service = Service {
            name: service.into(),
            settings: ServiceSettings {
                route: "/x".into(),
                port: 80,
                health: crate::model::HealthCheck::Tcp,
            },
            groups: BTreeSet::from(["g".to_string()]),
            endpoints: BTreeMap::from([(endpoint.instance_id.clone(), endpoint)]),
        };
        let snapshot = Snapshot {
            revision: 3,
            services: BTreeMap::from([(service.name.clone(), Arc::new(service))]),
            problems: BTreeMap::new(),
        };
        let routers = Arc::new(Routers::new(signpost_protocol::Epoch::from_bits(1)));
        routers.connect(router, SocketAddr::from(([127, 0, 0, 1], 1)));
        ApiState {
            registry: watch::channel(Arc::new(snapshot)).1,
            sync: watch::channel(SyncStatus::default()).1,
            resync_interval: Duration::from_secs(30),
            events: Arc::default(),
            routers,
            lifecycle: Arc::default(),
            xds: Arc::default(),
            leaders: Leaders::single(),
            refusals: Arc::default(),
        }
    }

    /// One sample line of the text format: `name{label="value",...} value`,
    /// label values escaped (`\\`, `\"`, `\n`). Returns the name and the
    /// labels, unescaped.
    fn parse_sample(line: &str) -> Result<(String, Vec<(String, String)>), String> {
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .ok_or("no value")?;
        let (name, mut rest) = line.split_at(name_end);
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            rest = inner;
            while !rest.starts_with('}') {
                let eq = rest
                    .find("=\"")
                    .ok_or(format!("no label value in {line:?}"))?;
                let key = rest[..eq].to_owned();
                let mut value = String::new();
                let mut chars = rest[eq + 2..].char_indices();
                let end = loop {
                    match chars
                        .next()
                        .ok_or(format!("unterminated value in {line:?}"))?
                    {
                        (i, '"') => break eq + 2 + i + 1,
                        (_, '\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            other => return Err(format!("bad escape {other:?} in {line:?}")),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key, value));
                rest = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
            }
            rest = &rest[1..];
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or(format!("no value in {line:?}"))?;
        value
            .parse::<f64>()
            .map_err(|e| format!("value {value:?} in {line:?}: {e}"))?;
        Ok((name.to_owned(), labels))
    }

    #[tokio::test]
    async fn label_values_with_quotes_and_newlines_cannot_corrupt_the_page() {
        let service = "users\"} 1\nsignpost_ready 0 #";
        let router = "edge\\1\"\n";
        let page = scrape(state_with(service, router)).await;
        let mut seen = BTreeSet::new();
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels) = parse_sample(line).unwrap_or_else(|e| panic!("{e}\n{page}"));
            for (key, value) in labels {
                seen.insert((name.clone(), key, value));
            }
        }
        assert!(seen.contains(&(
            "signpost_endpoints".into(),
            "service".into(),
            service.into()
        )));
        assert!(seen.contains(&(
            "signpost_router_lag_revisions".into(),
            "router".into(),
            router.into()
        )));
        let ready: Vec<&str> = page
            .lines()
            .filter(|l| l.starts_with("signpost_ready"))
            .collect();
        assert_eq!(ready, ["signpost_ready 0"], "one sample, the real one");
    }

    /// The rows of the README's metrics table: name, type and label names.
    fn readme_table() -> Vec<(String, String, Vec<String>)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let table = readme
            .split("`GET /metrics`")
            .nth(1)
            .expect("the README has a `GET /metrics` section");
        table
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                // Label names are the backquoted words outside parentheses
                // (inside them are the label's values).
                let mut names = Vec::new();
                let mut depth = 0;
                for (i, part) in cells[3].split('`').enumerate() {
                    if i % 2 == 1 && depth == 0 {
                        names.push(part.to_owned());
                    } else if i % 2 == 0 {
                        depth += part.matches('(').count();
                        depth -= part.matches(')').count();
                    }
                }
                (
                    cells[1].trim_matches('`').to_owned(),
                    cells[2].to_owned(),
                    names,
                )
            })
            .collect()
    }

    #[test]
    fn the_readme_lists_exactly_the_families_the_code_declares() {
        let declared: Vec<(String, String, Vec<String>)> = metrics::families()
            .into_iter()
            .map(|(name, kind, labels)| {
                let labels = labels.into_iter().map(String::from).collect();
                (name.to_owned(), kind.name().to_owned(), labels)
            })
            .collect();
        assert_eq!(readme_table(), declared);
    }

    #[tokio::test]
    async fn the_page_has_every_declared_family_and_no_other() {
        let page = scrape(state_with("users", "edge-1")).await;
        let typed: Vec<(String, String)> = page
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                (name.to_owned(), kind.to_owned())
            })
            .collect();
        let declared: Vec<(String, String)> = metrics::families()
            .into_iter()
            .map(|(name, kind, _)| (name.to_owned(), kind.name().to_owned()))
            .collect();
        assert_eq!(typed, declared);
    }
}
