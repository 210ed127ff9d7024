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

use crate::events::EventCounts;
use crate::lifecycle::LifecycleLog;
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
}

pub fn router(state: ApiState) -> Router {
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
    });
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format, version 0.0.4. Written by hand:
/// a few dozen lines do not justify a metrics crate.
async fn metrics(State(state): State<ApiState>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;

    let snapshot = state.registry.borrow().clone();
    let sync = state.sync.borrow().clone();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];

    family(
        "signpost_registry_revision",
        "gauge",
        "Current registry revision.",
        &one(snapshot.revision as f64),
    );
    let mut endpoints = Vec::new();
    for service in snapshot.services.values() {
        for (state, name) in [
            (EndpointState::Starting, "starting"),
            (EndpointState::Healthy, "healthy"),
            (EndpointState::Unhealthy, "unhealthy"),
            (EndpointState::Draining, "draining"),
        ] {
            let n = service
                .endpoints
                .values()
                .filter(|e| e.state == state)
                .count();
            endpoints.push((
                format!("{{service=\"{}\",state=\"{name}\"}}", service.name),
                n as f64,
            ));
        }
    }
    family(
        "signpost_endpoints",
        "gauge",
        "Endpoints by service and state.",
        &endpoints,
    );
    family(
        "signpost_misconfigured_groups",
        "gauge",
        "Groups whose tags cannot be used.",
        &one(snapshot.problems.len() as f64),
    );

    let ready = sync
        .readiness(SystemTime::now(), state.resync_interval)
        .is_ok();
    family(
        "signpost_ready",
        "gauge",
        "1 while /readyz answers 200.",
        &one(ready as u8 as f64),
    );
    let last_success = sync
        .last_success
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    family(
        "signpost_sync_last_success_timestamp_seconds",
        "gauge",
        "When the last complete listing was applied.",
        &one(last_success),
    );
    family(
        "signpost_sync_last_duration_seconds",
        "gauge",
        "Wall time of the last complete listing.",
        &one(sync.last_duration_ms.unwrap_or(0) as f64 / 1000.0),
    );
    family(
        "signpost_syncs_total",
        "counter",
        "Complete listings applied.",
        &one(sync.syncs_total as f64),
    );
    let calls = sync.calls_total;
    family(
        "signpost_aws_calls_total",
        "counter",
        "AWS calls made by complete listings, by API.",
        &[
            (
                "{api=\"DescribeAutoScalingGroups\"}".into(),
                calls.describe_auto_scaling_groups as f64,
            ),
            (
                "{api=\"DescribeInstances\"}".into(),
                calls.describe_instances as f64,
            ),
            (
                "{api=\"DescribeLifecycleHooks\"}".into(),
                calls.describe_lifecycle_hooks as f64,
            ),
        ],
    );
    let failures: Vec<(String, f64)> = sync
        .failures_total
        .iter()
        .map(|(label, n)| {
            let (api, kind) = label.split_once('/').unwrap_or((label, "error"));
            (format!("{{api=\"{api}\",kind=\"{kind}\"}}"), *n as f64)
        })
        .collect();
    family(
        "signpost_sync_failures_total",
        "counter",
        "Listings that failed, by the API that failed and how.",
        &failures,
    );

    let events = &state.events;
    family(
        "signpost_events_total",
        "counter",
        "SQS event messages by outcome.",
        &[
            (
                "{result=\"handled\"}".into(),
                events.handled.load(Relaxed) as f64,
            ),
            (
                "{result=\"malformed\"}".into(),
                events.malformed.load(Relaxed) as f64,
            ),
            (
                "{result=\"receive_error\"}".into(),
                events.receive_errors.load(Relaxed) as f64,
            ),
        ],
    );

    let routers = state.routers.list();
    let connected: Vec<_> = routers.iter().filter(|r| r.connected).collect();
    family(
        "signpost_routers_connected",
        "gauge",
        "Routers subscribed now.",
        &one(connected.len() as f64),
    );
    let by_kind: Vec<(String, f64)> = [
        ("signpost", RouterKind::Signpost),
        ("envoy", RouterKind::Envoy),
        ("grpc", RouterKind::Grpc),
    ]
    .into_iter()
    .map(|(label, kind)| {
        let n = connected.iter().filter(|r| r.kind == kind).count();
        (format!("{{kind=\"{label}\"}}"), n as f64)
    })
    .collect();
    family(
        "signpost_routers_connected_by_kind",
        "gauge",
        "Routers subscribed now, by kind: signpost (NDJSON), envoy and grpc (xDS).",
        &by_kind,
    );
    let xds = &state.xds;
    let nacks: Vec<(String, f64)> = xds
        .nacks
        .lock()
        .unwrap()
        .iter()
        .map(|(t, n)| (format!("{{type=\"{t}\"}}"), *n as f64))
        .collect();
    family(
        "signpost_xds_nacks_total",
        "counter",
        "xDS responses a client rejected, by type (cds, eds, lds, rds).",
        &nacks,
    );
    let bad: Vec<(String, f64)> = xds
        .bad_requests
        .lock()
        .unwrap()
        .iter()
        .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), *n as f64))
        .collect();
    family(
        "signpost_xds_bad_requests_total",
        "counter",
        "xDS requests that could not be used: no node id, a type signpost does not serve.",
        &bad,
    );
    family(
        "signpost_xds_responses_total",
        "counter",
        "xDS responses written.",
        &one(xds.responses.load(Relaxed) as f64),
    );
    let lag: Vec<(String, f64)> = connected
        .iter()
        .map(|r| {
            let acked = r.acked_revision.unwrap_or(0);
            (
                format!("{{router=\"{}\"}}", r.id),
                snapshot.revision.saturating_sub(acked) as f64,
            )
        })
        .collect();
    family(
        "signpost_router_lag_revisions",
        "gauge",
        "Registry revision minus the router's acked revision.",
        &lag,
    );
    let ignored = &state.routers.ignored;
    family(
        "signpost_acks_ignored_total",
        "counter",
        "Router acks that did not count: of another controller epoch, for a revision never sent on the router's connection, or from a router not subscribed.",
        &[
            (
                "{reason=\"other_epoch\"}".into(),
                ignored.other_epoch.load(Relaxed) as f64,
            ),
            (
                "{reason=\"never_sent\"}".into(),
                ignored.never_sent.load(Relaxed) as f64,
            ),
            (
                "{reason=\"not_subscribed\"}".into(),
                ignored.not_subscribed.load(Relaxed) as f64,
            ),
        ],
    );

    let lifecycle = state.lifecycle.metrics();
    let results: Vec<(String, f64)> = lifecycle
        .results
        .iter()
        .map(|((transition, result), n)| {
            (
                format!("{{transition=\"{transition}\",result=\"{result}\"}}"),
                *n as f64,
            )
        })
        .collect();
    family(
        "signpost_lifecycle_actions_total",
        "counter",
        "Lifecycle actions ended, by transition and result (continue, abandon, not_waiting: already complete, error: CompleteLifecycleAction failed).",
        &results,
    );
    let timeouts: Vec<(String, f64)> = lifecycle
        .timeouts
        .iter()
        .map(|(stage, n)| (format!("{{stage=\"{stage}\"}}"), *n as f64))
        .collect();
    family(
        "signpost_lifecycle_timeouts_total",
        "counter",
        "Lifecycle waits decided by a timeout: launch (not healthy), acks (a router did not ack), drain.",
        &timeouts,
    );
    family(
        "signpost_lifecycle_heartbeats_total",
        "counter",
        "RecordLifecycleActionHeartbeat calls, by result.",
        &[
            (
                "{result=\"ok\"}".into(),
                (lifecycle.heartbeats - lifecycle.heartbeat_errors) as f64,
            ),
            (
                "{result=\"error\"}".into(),
                lifecycle.heartbeat_errors as f64,
            ),
        ],
    );
    for (name, help, histogram) in &lifecycle.histograms {
        histogram.render(&mut out, name, help);
    }
    let push_to_ack = state.xds.push_to_ack.lock().unwrap().clone();
    push_to_ack.render(
        &mut out,
        "signpost_xds_push_to_ack_seconds",
        "From an xDS response written to the client's ACK of it.",
    );

    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// `GET /v1/lifecycle`: hook actions under way and the last completed ones.
async fn lifecycle_actions(State(state): State<ApiState>) -> Response {
    let (active, recent) = state.lifecycle.actions();
    Json(json!({ "active": active, "recent": recent })).into_response()
}
