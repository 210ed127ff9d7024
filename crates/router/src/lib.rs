//! `signpost router`: the data plane. Routes each request by the longest
//! matching path prefix to a service, and balances it over the service's
//! healthy endpoints, on the endpoint sets the controller pushes.
//!
//! ```text
//!  controller ──/v1/watch (NDJSON)──► client:: Mirror ──build──► table:: RouteTable
//!      ▲                                  │                        │ ArcSwap (no lock)
//!      └──── POST /v1/routers/{id}/ack ◄──┤ report()               ▼
//!                                         └─► cache:: file   proxy:: balance:: upstream:: ─► endpoints
//! ```
//!
//! The router keeps routing on its last applied snapshot whatever happens to
//! the controller, and a router started while the controller is away routes
//! from its cache file.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod balance;
pub mod cache;
pub mod client;
pub mod controllers;
pub mod http1;
pub mod proxy;
pub mod table;
pub mod transport;
pub mod upstream;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

use balance::Balance;
use signpost_protocol::Mirror;
use table::RouteTable;

/// How long the router waits for any line (the controller pings every
/// `PING_INTERVAL`) before it declares the stream dead.
const IDLE: Duration = Duration::from_secs(15);

pub struct Config {
    /// Base URL of the controller's API, e.g. `http://controller:7070`, or
    /// the URLs of several replicas separated by commas (see `controllers`).
    pub controller: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub cache: Option<PathBuf>,
    /// Stable id: how the controller tells this router from others, across
    /// reconnects.
    pub id: String,
    /// How the router proves who it is to the controller, over TLS or not.
    pub credentials: transport::Credentials,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Proxy threads, each with its own event loop (see `Proxy::start`).
    pub threads: usize,
}

/// Where the router's current routes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Controller,
    Cache,
}

/// The last applied snapshot, for the ack reporter, the cache writer and
/// `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub source: Option<Source>,
    pub mirror: Arc<Mirror>,
}

/// What the router's tasks share.
pub struct RouterState {
    /// Read by every request; replaced whole on every applied revision.
    pub table: Arc<ArcSwap<RouteTable>>,
    pub applied: watch::Sender<Applied>,
    /// Whether a subscription is open right now (`/readyz` detail).
    pub connected: AtomicBool,
    pub ejected: Arc<Notify>,
    /// The endpoints of the table in use, by (service, instance), so that
    /// the next table keeps their in-flight counts: the subscriber's alone.
    known: Mutex<HashMap<(String, String), Arc<table::Endpoint>>>,
}

impl RouterState {
    pub fn new() -> Arc<RouterState> {
        Arc::new(RouterState {
            table: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            applied: watch::Sender::new(Applied::default()),
            connected: AtomicBool::new(false),
            ejected: Arc::new(Notify::new()),
            known: Mutex::default(),
        })
    }
}

/// Runs the router until `shutdown` resolves, then refuses new connections,
/// finishes the requests in flight and returns. The caller owns signals (the
/// binary) or time (tests).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;
    info!(
        id = %config.id,
        controller = %config.controller,
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        balance = ?config.balance,
        threads = config.threads,
        "router starting"
    );
    upstream::set_shards(config.threads);
    let state = RouterState::new();
    let stop = CancellationToken::new();

    let proxy = Arc::new(proxy::Proxy::new(
        state.table.clone(),
        config.balance,
        config.connect_timeout,
        config.response_timeout,
        state.ejected.clone(),
    ));
    let workers = proxy
        .start(config.threads, &stop)
        .context("cannot start the proxy threads")?;
    let proxy = tokio::spawn(proxy::accept(listener, workers, stop.clone()));
    let admin = tokio::spawn({
        axum::serve(admin, admin_routes(state.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future()
    });
    let controllers = Arc::new(controllers::Controllers::new(&config.controller));
    let link = transport::Controller::new(
        &config.credentials,
        config.controller.contains("https://"),
        config.connect_timeout,
    )?;
    let subscriber = client::Subscriber {
        controllers: controllers.clone(),
        id: config.id.clone(),
        link: link.clone(),
        cache: config.cache.clone(),
        connect_timeout: config.connect_timeout,
        idle: IDLE,
        state: state.clone(),
    };
    let mut background = vec![
        tokio::spawn(subscriber.run(stop.clone())),
        tokio::spawn(client::report(
            controllers,
            config.id.clone(),
            state.clone(),
            link,
            stop.clone(),
        )),
    ];
    if let Some(path) = config.cache.clone() {
        background.push(tokio::spawn(cache::keep(path, state.applied.subscribe())));
    }

    shutdown.await;
    info!("shutting down: finishing open requests");
    stop.cancel();
    let _ = proxy.await;
    let _ = admin.await;
    for task in background {
        task.abort();
    }
    Ok(())
}

fn admin_routes(state: Arc<RouterState>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Ready once the router has routes, from the controller or the cache: a
/// router that lost its controller still serves, so it stays ready.
async fn readyz(State(state): State<Arc<RouterState>>) -> Response {
    let applied = state.applied.borrow().clone();
    let revision = applied.mirror.revision;
    let status = if revision.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": revision.is_some(),
        "revision": revision,
        "source": applied.source,
        "connected": state.connected.load(Ordering::Relaxed),
    });
    (status, Json(body)).into_response()
}
