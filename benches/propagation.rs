//! Propagation benchmark: time from a registry change to every one of N
//! subscribed routers having acked it, for N = 1, 100, 1000.
//!
//! The controller side is the real one (registry + push hub on a loopback
//! HTTP listener); the routers are lightweight in-process subscribers that
//! speak the wire protocol (stream, apply to a `Mirror`, POST the ack), so
//! what is measured is the controller's fan-out and ack handling.
//!
//! Run: `cargo bench --bench propagation` (benches/router.sh runs it).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use signpost_controller::model::{Change, Endpoint, EndpointState, HealthCheck, ServiceSettings};
use signpost_controller::push::hub::{Hub, PING_INTERVAL};
use signpost_controller::registry::Registry;
use signpost_controller::routers::Routers;
use signpost_protocol::{Ack, Epoch, Message, Mirror, PROTOCOL};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const ENDPOINTS: u8 = 20;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| routers | changes | p50 | p99 | max |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (routers, changes) in [(1, 200), (100, 100), (1000, 50)] {
        runtime.block_on(run(routers, changes));
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn run(routers: usize, changes: usize) {
    let registry = Arc::new(Registry::new());
    let now = SystemTime::now();
    let mut seed = vec![Change::PutService {
        name: "users".into(),
        settings: ServiceSettings {
            route: "/users".into(),
            port: 8080,
            health: HealthCheck::Tcp,
        },
        groups: BTreeSet::from(["users".to_string()]),
    }];
    for i in 0..ENDPOINTS {
        seed.push(Change::AddEndpoint {
            service: "users".into(),
            endpoint: Endpoint {
                instance_id: format!("i-{i}").as_str().into(),
                address: [127, 42, 1, i + 4].into(),
                port: 8080,
                zone: "a".into(),
                group: "users".into(),
                state: EndpointState::Starting,
                since: now,
            },
        });
    }
    registry.apply(&seed, now);

    let stop = CancellationToken::new();
    let routers_set = Arc::new(Routers::new(Epoch::from_bits(1)));
    let hub = Hub::new(
        registry.subscribe(),
        routers_set.clone(),
        PING_INTERVAL,
        stop.clone(),
        tokio::sync::watch::channel(Some(tokio::time::Instant::now())).1,
        signpost_controller::lease::Leaders::single(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        axum::serve(
            listener,
            hub.routes()
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .into_future(),
    );
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(HttpConnector::new());
    let subscribers: Vec<_> = (0..routers)
        .map(|i| tokio::spawn(subscriber(http.clone(), base.clone(), format!("bench-{i}"))))
        .collect();
    let current = registry.snapshot().revision;
    tokio::time::timeout(Duration::from_secs(60), async {
        while routers_set.list().len() < routers {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every subscriber connects");
    routers_set
        .wait_acked(current, Duration::from_secs(60))
        .await
        .expect("every subscriber acks the snapshot");

    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let n = (i % ENDPOINTS as usize) as u8;
        let state = if (i / ENDPOINTS as usize).is_multiple_of(2) {
            EndpointState::Healthy
        } else {
            EndpointState::Unhealthy
        };
        let change = Change::SetState {
            service: "users".into(),
            instance: format!("i-{n}").as_str().into(),
            address: [127, 42, 1, n + 4].into(),
            port: 8080,
            state,
        };
        let start = Instant::now();
        let revision = registry
            .apply(&[change], SystemTime::now())
            .expect("every change changes something");
        routers_set
            .wait_acked(revision, Duration::from_secs(60))
            .await
            .expect("every router acks");
        samples.push(start.elapsed());
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "| {routers} | {changes} | {:.2} ms | {:.2} ms | {:.2} ms |",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(*samples.last().unwrap())
    );
    stop.cancel();
    for s in subscribers {
        s.abort();
    }
    server.abort();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

use std::future::IntoFuture;

/// A router reduced to the protocol: read lines, apply, ack.
async fn subscriber(http: Http, base: String, id: String) {
    let uri = format!("{base}/v1/watch?router={id}&protocol={PROTOCOL}");
    let response = http.get(uri.parse().unwrap()).await.expect("subscribe");
    let mut body = response.into_body();
    let ack_uri = format!("{base}/v1/routers/{id}/ack");
    let mut mirror = Mirror::default();
    let mut buf = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let message = Message::from_line(&line[..pos]).expect("well-formed");
            if mirror.apply(message).expect("applies") {
                let ack = Ack {
                    epoch: mirror.epoch.unwrap(),
                    revision: mirror.revision.unwrap(),
                    in_flight: Default::default(),
                    ejected: Vec::new(),
                };
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(&ack_uri)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&ack).unwrap())))
                    .unwrap();
                let response = http.request(request).await.expect("ack");
                let _ = response.into_body().collect().await;
            }
        }
    }
}
