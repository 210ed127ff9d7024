//! `signpost controller`: wires the fleet, the registry, health checks and
//! the API together, and shuts them down cleanly when told to.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_config::timeout::TimeoutConfig;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use signpost_protocol::Epoch;

use crate::api::{self, ApiState};
use crate::auth::{tokens::Tokens, Gate, Rate};
use crate::cloud::{self, AutoScaling, AwsFleet, Hints};
use crate::config::{Config, ConfigError, TlsConfig};
use crate::endpoints::Endpoints;
use crate::events::{EventCounts, EventQueue};
use crate::guard::RemovalGuard;
use crate::health::{HealthScheduler, NetProbe};
use crate::lease::{self, Candidate, DynamoLease, Leaders, Leadership};
use crate::lifecycle::{Lifecycle, LifecycleLog};
use crate::listener::{ApiListener, Peer};
use crate::model::Fleet;
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

    // Routers are served once the registry has warmed up (first listing
    // applied, first health verdicts in: long enough for a healthy endpoint
    // to pass its checks) and this replica leads.
    let (warm_tx, warm) = watch::channel(false);
    let checks = config.health.defaults();
    let warm_limit = checks.interval * checks.healthy_threshold + checks.timeout;
    tasks.push(tokio::spawn({
        let warmed = reconcile::warmed_up(status_rx.clone(), registry.subscribe(), warm_limit);
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = warmed => {
                    info!("registry warmed up");
                    let _ = warm_tx.send(true);
                }
                // Stopping before the first listing (AWS unreachable, say)
                // must not leave shutdown waiting on this task.
                _ = stop.cancelled() => {}
            }
        }
    }));
    let (serving_tx, serving) = watch::channel(None);
    let replica = config
        .ha
        .replica_id
        .clone()
        .unwrap_or_else(default_replica_id);
    let (leadership_tx, leadership) = watch::channel(match &config.ha.table {
        None => Leadership::Single,
        Some(_) => Leadership::Follower { leader: None },
    });
    let lease_calls = Arc::new(lease::LeaseCalls::default());
    if let Some(table) = &config.ha.table {
        let timing = lease::Timing::new(config.ha.lease_duration);
        let store = DynamoLease {
            client: lease_client(&aws, &endpoints, &config, timing),
            table: table.clone(),
            name: config.ha.lease_name.clone(),
        };
        let me = Candidate {
            id: replica.clone(),
            address: config.advertised(),
        };
        info!(%table, replica = %me.id, address = %me.address, lease = ?timing.lease, "high availability: electing a leader");
        tasks.push(tokio::spawn(lease::run(
            store,
            me,
            timing,
            leadership_tx,
            lease_calls.clone(),
            stop.clone(),
        )));
    }

    let leaders = Leaders {
        leadership: leadership.clone(),
        replica,
        address: config.advertised(),
        calls: lease_calls,
    };
    let epoch = new_epoch();
    info!(%epoch, "controller epoch");
    let routers = Arc::new(Routers::expecting(epoch, config.routers.clone()));
    let hub = Hub::new(
        registry.subscribe(),
        routers.clone(),
        PING_INTERVAL,
        stop.clone(),
        serving.clone(),
        leaders.clone(),
    );

    let xds_metrics = Arc::new(XdsMetrics::default());
    if let Some(listen) = config.xds.listen {
        // Bound before anything is served, so that a taken port fails the
        // start with the config key that names it.
        let xds_tcp = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (config key xds.listen)"))?;
        // Its own configs of the same files: gRPC needs HTTP/2 by ALPN,
        // which the API does not speak.
        let xds_tls = tls_configs(&config, tls::grpc_server_config, &stop)?;
        info!(%listen, tls = xds_tls.is_some(), authentication = gate.required, "xDS server (ADS, LRS) listening");
        let xds_listener = ApiListener::new(xds_tcp, xds_tls)?;
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
            leadership: leadership.clone(),
            gate: gate.clone(),
        });
        let lrs = Arc::new(xds::lrs::Lrs {
            registry: registry.subscribe(),
            routers: routers.clone(),
            stop: stop.clone(),
            gate: gate.clone(),
        });
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = xds::serve(xds_listener, ads, lrs, stop).await {
                tracing::error!(error = %e, "xDS server failed");
            }
        }));
    }

    tasks.push(tokio::spawn(terms(
        leadership.clone(),
        warm,
        serving_tx,
        {
            let registry = registry.clone();
            let routers = routers.clone();
            let config = config.lifecycle.clone();
            let log = lifecycle_log.clone();
            let leadership = leadership.clone();
            move || Lifecycle {
                cloud: cloud.clone(),
                registry: registry.clone(),
                routers: routers.clone(),
                config: config.clone(),
                log: log.clone(),
                serving: serving.clone(),
                leadership: leadership.clone(),
            }
        },
        fleet_rx,
        stop.clone(),
    )));

    let app = api::routes(ApiState {
        registry: registry.subscribe(),
        sync: status_rx,
        resync_interval: config.resync_interval,
        events: event_counts,
        routers,
        lifecycle: lifecycle_log,
        xds: xds_metrics,
        leaders,
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

/// One term of leadership after another: while this replica leads and its
/// registry is warm, routers are served (`serving` says since when: the
/// router grace counts from the takeover) and the lifecycle runs, taking up
/// every waiting action again from the newest listing. When the term ends,
/// both stop and router streams close, so that routers go to the new leader.
async fn terms<C: AutoScaling>(
    mut leadership: watch::Receiver<Leadership>,
    mut warm: watch::Receiver<bool>,
    serving: watch::Sender<Option<Instant>>,
    lifecycle: impl Fn() -> Lifecycle<C>,
    fleets: watch::Receiver<Arc<Fleet>>,
    stop: CancellationToken,
) {
    loop {
        let ready = async {
            warm.wait_for(|w| *w).await.ok()?;
            leadership.wait_for(Leadership::is_leader).await.ok()
        };
        tokio::select! {
            r = ready => if r.is_none() { return },
            _ = stop.cancelled() => return,
        }
        let token = leadership.borrow().acting(Instant::now());
        info!(
            ?token,
            "leading: serving routers and completing lifecycle actions"
        );
        serving.send_replace(Some(Instant::now()));
        let term = stop.child_token();
        let mut fleets = fleets.clone();
        // The newest listing is taken up at once, not at the next resync.
        fleets.mark_changed();
        let running = tokio::spawn(lifecycle().run(fleets, term.clone()));
        tokio::select! {
            _ = leadership.wait_for(|l| !l.is_leader()) => {}
            _ = stop.cancelled() => {}
        }
        term.cancel();
        serving.send_replace(None);
        let _ = running.await;
        if stop.is_cancelled() {
            return;
        }
        info!(
            ?token,
            "no longer leading: router streams closed, lifecycle actions left to the leader"
        );
    }
}

/// The lease's DynamoDB client: each call must end within a renew period,
/// so that a slow store cannot hold a leader past its deadline unnoticed.
fn lease_client(
    aws: &aws_config::SdkConfig,
    endpoints: &Endpoints,
    config: &Config,
    timing: lease::Timing,
) -> aws_sdk_dynamodb::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1).min(timing.renew_every / 2))
        .operation_attempt_timeout(config.aws.attempt_timeout.min(timing.renew_every / 2))
        .operation_timeout(timing.renew_every)
        .build();
    let dynamodb = endpoints.dynamodb(aws).timeout_config(timeouts).build();
    aws_sdk_dynamodb::Client::from_conf(dynamodb)
}

/// The host name and process id: unique among replicas, readable in logs.
fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "controller".into());
    format!("{host}-{}", std::process::id())
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
    let tls = tls_configs(config, tls::server_config, stop)?;
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
        expected: config.routers.expected.clone(),
        rate: config
            .auth
            .required(&config.tls)
            .then(|| Rate::per_second(config.limits.requests_per_second)),
    });
    Ok((ApiListener::new(tcp, tls)?, gate))
}

/// The server configs of `[tls]` (by `build`), re-read when its files
/// change; `None` without `tls.cert`.
fn tls_configs(
    config: &Config,
    build: fn(&[Vec<u8>]) -> Result<ServerConfig, ConfigError>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(watch::Receiver<Arc<ServerConfig>>, TlsConfig)>> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return Ok(None);
    };
    let mut files = vec![
        KeyedFile::new("tls.cert", cert.clone()),
        KeyedFile::new("tls.key", key.clone()),
    ];
    if let Some(ca) = &config.tls.client_ca {
        files.push(KeyedFile::new("tls.client_ca", ca.clone()));
    }
    let every = config.tls.reload_interval;
    let configs = reload::watch_files(files, every, Box::new(build), stop.clone())?;
    Ok(Some((configs, config.tls.clone())))
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
