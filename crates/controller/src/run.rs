//! `signpost controller`: wires the fleet, the registry, health checks and
//! the API together, and shuts them down cleanly when told to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use signpost_protocol::Epoch;

use crate::api::{self, ApiState};
use crate::auth::{tokens::Tokens, Gate};
use crate::cloud::{self, AwsFleet, Hints};
use crate::config::Config;
use crate::endpoints::Endpoints;
use crate::events::{EventCounts, EventQueue};
use crate::guard::RemovalGuard;
use crate::health::{HealthScheduler, NetProbe};
use crate::lifecycle::{Lifecycle, LifecycleLog};
use crate::listener::{ApiListener, Peer};
use crate::push::hub::{Hub, PING_INTERVAL};
use crate::reconcile::{self, Reconciler, SyncStatus};
use crate::registry::Registry;
use crate::reload::{self, KeyedFile};
use crate::routers::Routers;
use crate::tls;
use crate::xds::{self, ads::XdsMetrics};

/// Runs the controller until `shutdown` resolves, then stops serving, lets
/// every task finish and returns. The caller owns signals (the binary) or
/// time (tests).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tcp = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (config key listen)", config.listen))?;
    let stop = CancellationToken::new();
    let listen = tcp.local_addr()?;
    let (listener, gate) = secure(tcp, &config, &stop)?;
    info!(%listen, tls = config.tls.cert.is_some(), authentication = gate.required, resync_interval = ?config.resync_interval, "controller starting");

    let registry = Arc::new(Registry::new());
    let (status_tx, status_rx) = watch::channel(SyncStatus::default());

    let aws = cloud::sdk_config(&config.aws).await;
    let endpoints = Endpoints::resolve(&aws, &config.aws);
    for (service, url, source) in endpoints.chosen() {
        info!(%service, url, ?source, "AWS endpoint");
    }
    let hints = Arc::new(Hints::default());
    let cloud = Arc::new(AwsFleet::new(&aws, &endpoints, &config, hints.clone()));
    let trigger = Arc::new(Notify::new());
    let (fleet_tx, fleet_rx) = watch::channel(Arc::default());
    let reconciler = Reconciler {
        cloud: cloud.clone(),
        registry: registry.clone(),
        status: status_tx,
        fleet: fleet_tx,
        resync_interval: config.resync_interval,
        trigger: trigger.clone(),
        guard: std::sync::Mutex::new(RemovalGuard::new(config.removal_guard.clone())),
    };
    let health = HealthScheduler::new(NetProbe::default(), registry.clone(), config.health.clone());
    let mut tasks = vec![
        tokio::spawn(reconciler.run(stop.clone())),
        tokio::spawn(health.run(stop.clone())),
    ];
    let event_counts = Arc::new(EventCounts::default());
    let lifecycle_log = Arc::new(LifecycleLog::default());
    if let Some(queue_url) = &config.events.queue_url {
        let queue = EventQueue {
            sqs: event_client(&aws, &endpoints, &config),
            queue_url: queue_url.clone(),
            wait: config.events.wait_time,
            counts: event_counts.clone(),
            lifecycle: lifecycle_log.clone(),
            hints,
        };
        tasks.push(tokio::spawn(queue.run(trigger, stop.clone())));
    }

    // Routers are served once the registry has warmed up: first listing
    // applied, first health verdicts in. Long enough for a healthy endpoint
    // to pass its checks.
    let (serving_tx, serving) = watch::channel(None);
    let checks = config.health.defaults();
    let warm_limit = checks.interval * checks.healthy_threshold + checks.timeout;
    tasks.push(tokio::spawn({
        let warmed = reconcile::warmed_up(status_rx.clone(), registry.subscribe(), warm_limit);
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = warmed => {
                    info!("registry warmed up; serving routers");
                    let _ = serving_tx.send(Some(tokio::time::Instant::now()));
                }
                // Stopping before the first listing (AWS unreachable, say)
                // must not leave shutdown waiting on this task.
                _ = stop.cancelled() => {}
            }
        }
    }));
    let epoch = new_epoch();
    info!(%epoch, "controller epoch");
    let routers = Arc::new(Routers::new(epoch));
    let hub = Hub::new(
        registry.subscribe(),
        routers.clone(),
        PING_INTERVAL,
        stop.clone(),
        serving.clone(),
    );

    let xds_metrics = Arc::new(XdsMetrics::default());
    if let Some(listen) = config.xds.listen {
        // Bound before anything is served, so that a taken port fails the
        // start with the config key that names it.
        let xds_listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (config key xds.listen)"))?;
        let (resources_tx, resources_rx) = watch::channel(None);
        tasks.push(tokio::spawn(xds::publish(
            registry.subscribe(),
            xds::resources::Settings {
                envoy_listener: config.xds.envoy_listener,
            },
            serving.clone(),
            resources_tx,
            stop.clone(),
        )));
        let ads = Arc::new(xds::ads::Ads {
            resources: resources_rx,
            routers: routers.clone(),
            metrics: xds_metrics.clone(),
            stop: stop.clone(),
        });
        let lrs = Arc::new(xds::lrs::Lrs {
            registry: registry.subscribe(),
            routers: routers.clone(),
            stop: stop.clone(),
        });
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = xds::serve(xds_listener, ads, lrs, stop).await {
                tracing::error!(error = %e, "xDS server failed");
            }
        }));
    }

    let lifecycle = Lifecycle {
        cloud,
        registry: registry.clone(),
        routers: routers.clone(),
        config: config.lifecycle.clone(),
        log: lifecycle_log.clone(),
        serving,
    };
    tasks.push(tokio::spawn(lifecycle.run(fleet_rx, stop.clone())));

    let app = api::routes(ApiState {
        registry: registry.subscribe(),
        sync: status_rx,
        resync_interval: config.resync_interval,
        events: event_counts,
        routers,
        lifecycle: lifecycle_log,
        xds: xds_metrics,
        refusals: gate.refusals.clone(),
    })
    .merge(hub.routes())
    .layer(axum::middleware::from_fn_with_state(gate, Gate::check))
    .layer(axum::extract::DefaultBodyLimit::max(config.limits.max_body));
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown({
            // Watch streams never end on their own: stop them before the server
            // waits for open connections.
            let stop = stop.clone();
            async move {
                shutdown.await;
                info!("shutting down");
                stop.cancel();
            }
        })
        .await;
    stop.cancel();
    served.context("API server failed")?;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// The API listener (TLS when `tls.cert` is set) and the gate that
/// authenticates its callers, with their files re-read on change.
fn secure(
    tcp: TcpListener,
    config: &Config,
    stop: &CancellationToken,
) -> anyhow::Result<(ApiListener, Arc<Gate>)> {
    if config.insecure_plaintext {
        warn!(listen = %config.listen, "insecure_plaintext = true: off loopback, the API may run without TLS or authentication, and anyone reaching it could ack in a router's name");
    }
    let every = config.tls.reload_interval;
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let mut files = vec![
                KeyedFile::new("tls.cert", cert.clone()),
                KeyedFile::new("tls.key", key.clone()),
            ];
            if let Some(ca) = &config.tls.client_ca {
                files.push(KeyedFile::new("tls.client_ca", ca.clone()));
            }
            let build = Box::new(|f: &[Vec<u8>]| tls::server_config(f));
            let configs = reload::watch_files(files, every, build, stop.clone())?;
            Some((configs, config.tls.clone()))
        }
        _ => None,
    };
    let tokens = match &config.auth.tokens_file {
        Some(path) => {
            let file = KeyedFile::new("auth.tokens_file", path.clone());
            let build = Box::new(|f: &[Vec<u8>]| Tokens::parse(&f[0]));
            Some(reload::watch_files(vec![file], every, build, stop.clone())?)
        }
        None => None,
    };
    let gate = Arc::new(Gate {
        required: config.auth.required(&config.tls),
        tokens,
        certificate_roles: config.auth.roles.clone(),
        refusals: Arc::default(),
        subscriptions_per_identity: config.limits.subscriptions_per_identity,
        subscriptions: Arc::default(),
    });
    Ok((ApiListener::new(tcp, tls)?, gate))
}

/// An SQS client whose attempt timeout leaves room for the long poll, which
/// by design waits up to `events.wait_time` for an answer.
fn event_client(
    aws: &aws_config::SdkConfig,
    endpoints: &Endpoints,
    config: &Config,
) -> aws_sdk_sqs::Client {
    let long_poll = config.events.wait_time + Duration::from_secs(10);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(config.aws.attempt_timeout.max(long_poll))
        .operation_timeout(config.aws.operation_timeout.max(long_poll))
        .build();
    let sqs = endpoints.sqs(aws).timeout_config(timeouts).build();
    aws_sdk_sqs::Client::from_conf(sqs)
}

/// A fresh epoch for this controller lifetime: std's per-process random
/// hasher keys (from the OS), mixed with the time and the process id.
fn new_epoch() -> Epoch {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    Epoch::from_bits(h.finish())
}
