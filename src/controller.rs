//! `signpost controller`: wires the fleet, the registry, health checks and
//! the API together, and shuts them down cleanly on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::info;

use crate::api::{self, ApiState};
use crate::cloud::{self, AwsFleet};
use crate::config::Config;
use crate::events::{EventCounts, EventQueue};
use crate::health::{HealthScheduler, NetProbe};
use crate::push::hub::{Hub, PING_INTERVAL};
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

    let aws = cloud::sdk_config(&config.aws).await;
    let trigger = Arc::new(Notify::new());
    let reconciler = Reconciler {
        cloud: AwsFleet::new(&aws, &config),
        registry: registry.clone(),
        status: status_tx,
        resync_interval: config.resync_interval,
        trigger: trigger.clone(),
    };
    let health = HealthScheduler::new(NetProbe::default(), registry.clone(), config.health.clone());
    let mut tasks = vec![
        tokio::spawn(reconciler.run(stop_rx.clone())),
        tokio::spawn(health.run(stop_rx.clone())),
    ];
    let event_counts = Arc::new(EventCounts::default());
    if let Some(queue_url) = &config.events.queue_url {
        let queue = EventQueue {
            sqs: event_client(&aws, &config),
            queue_url: queue_url.clone(),
            wait: config.events.wait_time,
            counts: event_counts.clone(),
        };
        tasks.push(tokio::spawn(queue.run(trigger, stop_rx.clone())));
    }

    // The hub is where a later stage (lifecycle hooks) waits for every
    // router to ack a revision (`Hub::wait_acked`).
    let hub = Hub::new(registry.subscribe(), PING_INTERVAL, stop_rx.clone());
    let app = api::router(ApiState {
        registry: registry.subscribe(),
        sync: status_rx,
        resync_interval: config.resync_interval,
        events: event_counts,
        routers: hub.clone(),
    })
    .merge(hub.routes());
    let stop_tx = Arc::new(stop_tx);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown({
        // Watch streams never end on their own: stop them before the server
        // waits for open connections.
        let stop_tx = stop_tx.clone();
        async move {
            shutdown_signal().await;
            info!("shutting down");
            let _ = stop_tx.send(true);
        }
    })
    .await;
    let _ = stop_tx.send(true);
    served.context("API server failed")?;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// An SQS client whose attempt timeout leaves room for the long poll, which
/// by design waits up to `events.wait_time` for an answer.
fn event_client(aws: &aws_config::SdkConfig, config: &Config) -> aws_sdk_sqs::Client {
    let long_poll = config.events.wait_time + Duration::from_secs(10);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(config.aws.attempt_timeout.max(long_poll))
        .operation_timeout(config.aws.operation_timeout.max(long_poll))
        .build();
    let sqs = aws_sdk_sqs::config::Builder::from(aws)
        .timeout_config(timeouts)
        .build();
    aws_sdk_sqs::Client::from_conf(sqs)
}

pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
