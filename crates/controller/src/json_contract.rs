//! The JSON the HTTP API answers, pinned byte for byte: operators' scripts,
//! dashboards and the benches read these fields, so a change of the types
//! behind them (states as enums rather than strings, say) must not change a
//! byte. Each answer is produced by the real route; only values that depend
//! on the wall clock are masked.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use signpost_protocol::{Ack, Epoch};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::api::{self, ApiState};
use crate::cloud::{ErrorKind, FakeAutoScaling};
use crate::config::LifecycleConfig;
use crate::lifecycle::{Lifecycle, LifecycleLog};
use crate::model::{
    Ec2Instance, Endpoint, EndpointState, Fleet, GroupProblem, HealthCheck, LifecycleHook,
    ObservedGroup, ObservedInstance, Service, ServiceSettings, Snapshot, Transition,
};
use crate::push::hub::Hub;
use crate::reconcile::SyncStatus;
use crate::registry::Registry;
use crate::routers::Routers;

/// 2023-11-14T22:13:20Z
const T0: Duration = Duration::from_secs(1_700_000_000);

async fn get(app: axum::Router, path: &str) -> String {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Replaces the value of every `"key":` in `json` (up to the next `,` or
/// `}`) with `"*"`: for the few values that depend on the clock.
fn mask(json: &str, key: &str) -> String {
    let needle = format!("\"{key}\":");
    let mut out = String::new();
    let mut rest = json;
    while let Some(at) = rest.find(&needle) {
        let value = at + needle.len();
        out.push_str(&rest[..value]);
        out.push_str("\"*\"");
        let end = rest[value..]
            .find([',', '}'])
            .map_or(rest.len(), |n| value + n);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn endpoint(id: &str, octet: u8, state: EndpointState) -> Endpoint {
    Endpoint {
        instance_id: id.into(),
        address: [127, 42, 1, octet].into(),
        port: 8080,
        zone: "eu-west-1a".into(),
        group: "users-blue".into(),
        state,
        since: SystemTime::UNIX_EPOCH + T0,
    }
}

/// A registry with one service of two endpoints, one misconfigured group of
/// that service and one naming no usable service.
fn snapshot() -> Snapshot {
    let endpoints = [
        endpoint("i-1", 4, EndpointState::Healthy),
        endpoint("i-2", 5, EndpointState::Starting),
    ];
    let service = Service {
        name: "users".into(),
        settings: ServiceSettings {
            route: "/users".into(),
            port: 8080,
            health: HealthCheck::Http {
                path: "/health".into(),
            },
        },
        groups: BTreeSet::from(["users-blue".to_string()]),
        endpoints: endpoints
            .into_iter()
            .map(|e| (e.instance_id.clone(), e))
            .collect(),
    };
    let problems = [
        GroupProblem {
            group: "users-green".into(),
            service: Some("users".into()),
            reason: "signpost:port: not a port".into(),
        },
        GroupProblem {
            group: "orphan".into(),
            service: None,
            reason: "signpost:service is empty".into(),
        },
    ];
    Snapshot {
        revision: 7,
        services: BTreeMap::from([("users".to_string(), Arc::new(service))]),
        problems: problems.into_iter().map(|p| (p.group.clone(), p)).collect(),
    }
}

fn api_state(snapshot: Snapshot, routers: Arc<Routers>, lifecycle: Arc<LifecycleLog>) -> ApiState {
    ApiState {
        registry: watch::channel(Arc::new(snapshot)).1,
        sync: watch::channel(SyncStatus::default()).1,
        resync_interval: Duration::from_secs(30),
        events: Arc::default(),
        routers,
        lifecycle,
        xds: Arc::default(),
        leaders: crate::lease::Leaders::single(),
        refusals: Arc::default(),
    }
}

#[tokio::test]
async fn services_json_is_unchanged() {
    let app = api::routes(api_state(
        snapshot(),
        Arc::new(Routers::new(Epoch::from_bits(7))),
        Arc::default(),
    ));
    let endpoints = concat!(
        r#""endpoints":["#,
        r#"{"instance_id":"i-1","address":"127.42.1.4","port":8080,"zone":"eu-west-1a","group":"users-blue","state":"healthy","since":"2023-11-14T22:13:20.000Z"},"#,
        r#"{"instance_id":"i-2","address":"127.42.1.5","port":8080,"zone":"eu-west-1a","group":"users-blue","state":"starting","since":"2023-11-14T22:13:20.000Z"}]"#,
    );
    let green = r#"{"group":"users-green","service":"users","reason":"signpost:port: not a port"}"#;
    let orphan = r#"{"group":"orphan","service":null,"reason":"signpost:service is empty"}"#;
    let service = format!(
        r#"{{"name":"users","route":"/users","port":8080,"health":"http:/health","groups":["users-blue"],"healthy":1,{endpoints},"problems":[{green}]}}"#
    );
    assert_eq!(
        get(app.clone(), "/v1/services").await,
        format!(r#"{{"revision":7,"services":[{service}],"problems":[{orphan},{green}]}}"#)
    );
    // One service goes through a `serde_json::Value`: every object's keys
    // come sorted.
    let green_sorted =
        r#"{"group":"users-green","reason":"signpost:port: not a port","service":"users"}"#;
    assert_eq!(
        get(app.clone(), "/v1/services/users").await,
        format!(
            r#"{{"endpoints":[{},{}],"groups":["users-blue"],"health":"http:/health","healthy":1,"name":"users","port":8080,"problems":[{green_sorted}],"revision":7,"route":"/users"}}"#,
            r#"{"address":"127.42.1.4","group":"users-blue","instance_id":"i-1","port":8080,"since":"2023-11-14T22:13:20.000Z","state":"healthy","zone":"eu-west-1a"}"#,
            r#"{"address":"127.42.1.5","group":"users-blue","instance_id":"i-2","port":8080,"since":"2023-11-14T22:13:20.000Z","state":"starting","zone":"eu-west-1a"}"#,
        )
    );
    assert_eq!(
        get(app, "/v1/services/nope").await,
        r#"{"error":"no service named \"nope\""}"#
    );
}

#[tokio::test]
async fn routers_json_is_unchanged() {
    let routers = Arc::new(Routers::new(Epoch::from_bits(7)));
    let connection = routers.connect("edge-1", SocketAddr::from(([127, 0, 0, 1], 40000)));
    routers.sent("edge-1", connection, 5);
    let ack = Ack {
        epoch: Epoch::from_bits(7),
        revision: 5,
        in_flight: BTreeMap::from([(
            "users".to_string(),
            BTreeMap::from([("i-1".to_string(), 2)]),
        )]),
        ejected: serde_json::from_str(
            r#"[{"service":"users","instance":"i-2","reason":"server_errors","remaining_ms":4000},
                {"service":"users","instance":"i-3","reason":"connect_failures","remaining_ms":100}]"#,
        )
        .unwrap(),
    };
    routers.acked("edge-1", ack).expect("the ack counts");
    routers.connect("edge-2", SocketAddr::from(([127, 0, 0, 2], 40001)));
    let hub = Hub::new(
        watch::channel(Arc::new(snapshot())).1,
        routers,
        Duration::from_secs(5),
        CancellationToken::new(),
        watch::channel(Some(tokio::time::Instant::now())).1,
        crate::lease::Leaders::single(),
    );
    let body = get(hub.routes(), "/v1/routers").await;
    let body = mask(&mask(&body, "connected_since"), "last_seen");
    // Through `json!`, so every object's keys come sorted.
    let edge_1 = concat!(
        r#"{"acked_revision":5,"address":"127.0.0.1:40000","connected":true,"connected_since":"*","#,
        r#""ejected":[{"instance":"i-2","reason":"server_errors","remaining_ms":4000,"service":"users"},"#,
        r#"{"instance":"i-3","reason":"connect_failures","remaining_ms":100,"service":"users"}],"#,
        r#""id":"edge-1","in_flight":{"users":{"i-1":2}},"kind":"signpost","lag":2,"last_seen":"*","sent_revision":5}"#
    );
    let edge_2 = concat!(
        r#"{"acked_revision":null,"address":"127.0.0.2:40001","connected":true,"connected_since":"*","#,
        r#""ejected":[],"id":"edge-2","in_flight":{},"kind":"signpost","lag":7,"last_seen":"*","sent_revision":null}"#
    );
    assert_eq!(
        body,
        format!(r#"{{"epoch":7,"revision":7,"routers":[{edge_1},{edge_2}]}}"#)
    );
}

fn waiting(id: &str, state: &str, launched: Option<SystemTime>) -> ObservedInstance {
    ObservedInstance {
        id: id.into(),
        lifecycle_state: state.into(),
        zone: "eu-west-1a".into(),
        ec2: Some(Ec2Instance {
            state: "running".into(),
            private_ip: Some([127, 42, 1, 9].into()),
            launch_time: launched,
        }),
    }
}

#[tokio::test]
async fn lifecycle_json_is_unchanged() {
    let registry = Arc::new(Registry::new());
    let log = Arc::new(LifecycleLog::default());
    // No router is connected and i-2 has no endpoint: its terminate action
    // completes at once; i-1 waits for a health check that never comes.
    let lifecycle = Lifecycle {
        cloud: Arc::new(FakeAutoScaling::default()),
        registry: registry.clone(),
        routers: Arc::new(Routers::new(Epoch::from_bits(7))),
        config: LifecycleConfig {
            router_grace: Duration::ZERO,
            ..LifecycleConfig::default()
        },
        log: log.clone(),
        serving: watch::channel(Some(tokio::time::Instant::now())).1,
        leadership: watch::channel(crate::lease::Leadership::Single).1,
    };
    let hook = |name: &str, transition| LifecycleHook {
        name: name.into(),
        transition,
        heartbeat_timeout: Duration::from_secs(3600),
    };
    let fleet = Fleet {
        groups: vec![ObservedGroup {
            name: "users-blue".into(),
            service: Some("users".into()),
            settings: Err("not needed for hooks".into()),
            instances: vec![
                waiting("i-1", "Pending:Wait", Some(SystemTime::UNIX_EPOCH + T0)),
                waiting("i-2", "Terminating:Wait", None),
            ],
            hooks: vec![
                hook("signpost-launch", Transition::Launching),
                hook("signpost-terminate", Transition::Terminating),
            ],
        }],
    };
    let (fleets, fleets_rx) = watch::channel(Arc::new(Fleet::default()));
    let stop = CancellationToken::new();
    let task = tokio::spawn(lifecycle.run(fleets_rx, stop.clone()));
    fleets.send_replace(Arc::new(fleet));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.actions().1.is_empty() || log.actions().0.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the terminate action to complete"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let app = api::routes(api_state(
        snapshot(),
        Arc::new(Routers::new(Epoch::from_bits(7))),
        log,
    ));
    let body = get(app, "/v1/lifecycle").await;
    stop.cancel();
    task.await.unwrap();
    let body = ["since", "acked_ms", "completed_ms"]
        .iter()
        .fold(body, |body, key| mask(&body, key));
    // Through `json!`, so every object's keys come sorted.
    let launch = concat!(
        r#"{"acked_ms":"*","completed_ms":"*","group":"users-blue","healthy_ms":null,"#,
        r#""hook":"signpost-launch","instance":"i-1","note":null,"registered_ms":null,"result":null,"#,
        r#""since":"*","since_from":"launch_time","stage":"waiting_for_health","transition":"launch"}"#
    );
    let terminate = concat!(
        r#"{"acked_ms":"*","completed_ms":"*","group":"users-blue","healthy_ms":null,"#,
        r#""hook":"signpost-terminate","instance":"i-2","note":null,"registered_ms":null,"result":"continue","#,
        r#""since":"*","since_from":"seen","stage":"done","transition":"terminate"}"#
    );
    assert_eq!(
        body,
        // A single controller (no `[ha]`) says so; with a lease it names the
        // replica, its role and token.
        format!(
            r#"{{"active":[{launch}],"leadership":{{"role":"single"}},"recent":[{terminate}]}}"#
        )
    );
}

#[tokio::test]
async fn readyz_counts_failures_under_api_slash_kind_keys() {
    let mut state = api_state(
        snapshot(),
        Arc::new(Routers::new(Epoch::from_bits(7))),
        Arc::default(),
    );
    let sync = SyncStatus {
        failures_total: BTreeMap::from([
            (("DescribeInstances", ErrorKind::Timeout), 2),
            (("DescribeAutoScalingGroups", ErrorKind::Throttled), 1),
        ]),
        ..SyncStatus::default()
    };
    state.sync = watch::channel(sync).1;
    let body = get(api::routes(state), "/readyz").await;
    let failures = r#""failures_total":{"DescribeAutoScalingGroups/throttled":1,"DescribeInstances/timeout":2}"#;
    assert!(body.contains(failures), "{body}");
}

/// A follower sends a subscriber to the leader named in the lease, with the
/// same query; it answers 503 while it knows no leader, or only itself (it
/// just stepped down and its own item has not expired yet).
#[tokio::test]
async fn a_follower_redirects_subscriptions_to_the_leader() {
    use crate::lease::{Leaders, Leadership, LeaseItem};
    let leader = |address: &str| Leadership::Follower {
        leader: Some(LeaseItem {
            owner: "b".into(),
            address: address.into(),
            token: 4,
            expires: SystemTime::now() + Duration::from_secs(60),
        }),
    };
    let (tx, rx) = watch::channel(leader("http://10.0.0.2:7070"));
    let hub = Hub::new(
        watch::channel(Arc::new(snapshot())).1,
        Arc::new(Routers::new(Epoch::from_bits(7))),
        Duration::from_secs(5),
        CancellationToken::new(),
        watch::channel(None).1,
        Leaders {
            leadership: rx,
            replica: "a".into(),
            address: "http://10.0.0.1:7070".into(),
            calls: Arc::default(),
        },
    );
    let app = hub
        .routes()
        .layer(axum::extract::connect_info::MockConnectInfo(
            crate::listener::Peer {
                address: SocketAddr::from(([127, 0, 0, 1], 40000)),
                certificate: None,
            },
        ));
    let path = format!(
        "/v1/watch?router=r1&protocol={}",
        signpost_protocol::PROTOCOL
    );
    let subscribe = || async {
        let request = Request::get(path.as_str()).body(Body::empty()).unwrap();
        app.clone().oneshot(request).await.unwrap()
    };
    let redirected = subscribe().await;
    assert_eq!(redirected.status(), 307);
    assert_eq!(
        redirected.headers()["location"],
        format!("http://10.0.0.2:7070{path}").as_str()
    );
    tx.send_replace(leader("http://10.0.0.1:7070"));
    assert_eq!(subscribe().await.status(), 503, "not to itself");
    tx.send_replace(Leadership::Follower { leader: None });
    assert_eq!(subscribe().await.status(), 503);
}
