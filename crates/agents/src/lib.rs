//! Agents for the proxies people already run: `signpost haproxy` and
//! `signpost nginx`. Each runs beside its proxy, subscribes to the
//! controller as `signpost router` does (the same subscriber, cache file
//! and acks), makes the proxy route as the registry says, and acks a
//! revision only once the proxy confirms it; it reports the requests still
//! in flight to leaving endpoints, so that terminate hooks wait for them.
//!
//! ```text
//!  controller ──/v1/watch──► client::Subscriber ──publish──► agent::AgentState (desired)
//!      ▲                                                        │
//!      │                                         agent::drive ──┤ Proxy::apply / in_flight
//!      └── POST /v1/routers/{id}/ack ◄── client::report ◄───────┘ (applied, in flight)
//!                                                               ▼
//!                                  haproxy:: runtime API     nginx:: render, nginx -t, reload
//! ```

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod agent;
pub mod haproxy;
pub mod nginx;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use agent::{AgentState, Proxy};
use signpost_router::{cache, client, controllers, transport};

/// How long the agent waits for any line from the controller (it pings
/// every few seconds) before it declares the stream dead.
const IDLE: Duration = Duration::from_secs(15);

/// What every agent takes, whatever its proxy.
pub struct Config {
    /// Base URL of the controller's API, e.g. `http://controller:7070`, or
    /// the URLs of several replicas separated by commas (see
    /// `signpost_router::controllers`).
    pub controller: String,
    /// Stable id: how the controller tells this agent from other routers.
    pub id: String,
    /// `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    pub cache: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// TLS and credentials for the controller, as `signpost router` has them.
    pub credentials: transport::Credentials,
    /// How often the agent checks the proxy (its state, the requests in
    /// flight), besides on every change.
    pub poll: Duration,
}

/// Runs an agent for `proxy` until `shutdown` resolves.
pub async fn run<P: Proxy>(
    config: Config,
    proxy: P,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--admin-listen)", config.admin_listen))?;
    let controller = config.controller.trim_end_matches('/').to_owned();
    let controllers = Arc::new(controllers::Controllers::new(&controller));
    let link = transport::Controller::new(
        &config.credentials,
        controller.contains("https://"),
        config.connect_timeout,
    )?;
    info!(id = %config.id, %controller, kind = P::KIND, admin = %admin.local_addr()?, "agent starting");
    let state = AgentState::new(P::KIND);
    let stop = CancellationToken::new();
    let admin = tokio::spawn(
        axum::serve(admin, agent::admin_routes(state.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
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
            config.id,
            state.clone(),
            link,
            stop.clone(),
        )),
        tokio::spawn(agent::drive(
            proxy,
            state.clone(),
            config.poll,
            stop.clone(),
        )),
    ];
    if let Some(path) = config.cache {
        background.push(tokio::spawn(cache::keep(path, state.subscribe_applied())));
    }
    shutdown.await;
    info!("agent stopping; the proxy keeps routing on what it has");
    stop.cancel();
    let _ = admin.await;
    for task in background {
        task.abort();
    }
    Ok(())
}
