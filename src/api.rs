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
use crate::model::{Endpoint, GroupProblem, Revision, Service, ServiceSettings, Snapshot};
use crate::reconcile::SyncStatus;

#[derive(Clone)]
pub struct ApiState {
    pub registry: watch::Receiver<Arc<Snapshot>>,
    pub sync: watch::Receiver<SyncStatus>,
    pub resync_interval: Duration,
    pub events: Arc<EventCounts>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(get_service))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
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
