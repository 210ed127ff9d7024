//! `signpost controller`: wires the fleet, the registry, health checks and
//! the API together, and shuts them down cleanly on SIGTERM or SIGINT.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::info;

use crate::api::{self, ApiState};
use crate::cloud::AwsFleet;
use crate::config::Config;
use crate::health::{HealthScheduler, NetProbe};
use crate::reconcile::{Reconciler, SyncStatus};
use crate::registry::Registry;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (config key listen)", config.listen))?;
    info!(listen = %listener.local_addr()?, resync_interval = ?config.resync_interval, "controller starting");

    let registry = Arc::new(Registry::new());
    let (status_tx, status_rx) = watch::channel(SyncStatus::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    let reconciler = Reconciler {
        cloud: AwsFleet::connect(&config).await,
        registry: registry.clone(),
        status: status_tx,
        resync_interval: config.resync_interval,
        trigger: Arc::new(Notify::new()),
    };
    let health = HealthScheduler::new(NetProbe::default(), registry.clone(), config.health.clone());
    let tasks = [
        tokio::spawn(reconciler.run(stop_rx.clone())),
        tokio::spawn(health.run(stop_rx.clone())),
    ];

    let app = api::router(ApiState {
        registry: registry.subscribe(),
        sync: status_rx,
        resync_interval: config.resync_interval,
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("API server failed")?;

    info!("shutting down");
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
