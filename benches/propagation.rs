//! Propagation benchmark: time from a registry change to every one of N
//! subscribed routers having acked it, for N = 1, 100, 1000, over both of
//! the controller's protocols: signpost's NDJSON push and xDS (ADS).
//!
//! The controller side is the real one (registry + push hub on a loopback
//! HTTP listener, or registry + `xds::publish` + the ADS service on a
//! loopback gRPC listener); the routers are lightweight in-process clients
//! that speak the protocol (NDJSON: stream, apply to a `Mirror`, POST the
//! ack; xDS: one ADS stream subscribed to every cluster and to the
//! service's endpoints, ACKing each response), so what is measured is the
//! controller's fan-out and ack handling.
//!
//! Beside each row: the process's resident memory with the routers
//! connected, and its CPU time per change (controller side and clients
//! together: an upper bound for the controller alone).
//!
//! Run: `cargo bench --bench propagation` (benches/router.sh runs it).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use signpost_controller::auth::Gate;
use signpost_controller::listener::{ApiListener, Peer};
use signpost_controller::model::{
    Change, Endpoint, EndpointState, HealthCheck, ServiceSettings, Snapshot,
};
use signpost_controller::push::encode;
use signpost_controller::push::hub::{Hub, PING_INTERVAL};
use signpost_controller::registry::Registry;
use signpost_controller::routers::Routers;
use signpost_controller::xds;
use signpost_protocol::{Ack, Epoch, Message, Mirror, PROTOCOL};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const ENDPOINTS: u8 = 20;

/// Each row runs in a process of its own (this binary, re-run with `row
/// <protocol> <routers> <changes>`), so that its memory is its own: an
/// allocator keeps what an earlier row freed.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "clients") {
        let protocol = Protocol::named(&args[at + 1]);
        let address: SocketAddr = args[at + 2].parse().unwrap();
        let routers: usize = args[at + 3].parse().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(clients(protocol, address, routers));
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "row") {
        let protocol = Protocol::named(&args[at + 1]);
        let (routers, changes) = (args[at + 2].parse().unwrap(), args[at + 3].parse().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(protocol, routers, changes));
        return;
    }
    println!("| protocol | routers | changes | p50 | p99 | max | controller memory with them connected | controller CPU per change | routers' CPU per change | bytes to each router per change |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let me = std::env::current_exe().unwrap();
    for protocol in ["ndjson", "xds"] {
        for (routers, changes) in [("1", "200"), ("100", "100"), ("1000", "50")] {
            let status = std::process::Command::new(&me)
                .args(["row", protocol, routers, changes])
                .status()
                .expect("run a row");
            assert!(status.success(), "{protocol} with {routers} routers failed");
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Ndjson,
    Xds,
}

impl Protocol {
    fn named(name: &str) -> Protocol {
        match name {
            "ndjson" => Protocol::Ndjson,
            _ => Protocol::Xds,
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Protocol::Ndjson => "ndjson",
            Protocol::Xds => "xds",
        }
    }
}

/// The routers: a process of their own (this binary, re-run with `clients
/// <protocol> <address> <routers>`), so that the controller's CPU and memory
/// are measured apart from theirs. It runs until killed.
async fn clients(protocol: Protocol, address: SocketAddr, routers: usize) {
    let mut tasks = Vec::new();
    match protocol {
        Protocol::Ndjson => {
            let http: Http = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(usize::MAX)
                .build(HttpConnector::new());
            let base = format!("http://{address}");
            for i in 0..routers {
                let (http, base) = (http.clone(), base.clone());
                tasks.push(tokio::spawn(subscriber(http, base, format!("bench-{i}"))));
            }
        }
        Protocol::Xds => {
            for i in 0..routers {
                tasks.push(tokio::spawn(xds_client(address, format!("bench-{i}"))));
            }
        }
    }
    std::future::pending::<()>().await;
}

/// Kills the routers' process when the row ends, however it ends.
struct RouterProcess(std::process::Child);

impl RouterProcess {
    fn start(protocol: Protocol, address: SocketAddr, routers: usize) -> RouterProcess {
        let me = std::env::current_exe().unwrap();
        let child = std::process::Command::new(me)
            .args([
                "clients",
                protocol.arg(),
                &address.to_string(),
                &routers.to_string(),
            ])
            .spawn()
            .expect("start the routers' process");
        RouterProcess(child)
    }

    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.0.id()))
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn run(protocol: Protocol, routers: usize, changes: usize) {
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = tokio::sync::watch::channel(Some(tokio::time::Instant::now())).1;
    let mut tasks = Vec::new();
    match protocol {
        Protocol::Ndjson => {
            let hub = Hub::new(
                registry.subscribe(),
                routers_set.clone(),
                PING_INTERVAL,
                stop.clone(),
                serving,
                signpost_controller::lease::Leaders::single(),
            );
            // Served as the controller serves it: the hub reads the peer
            // from `ApiListener`'s connect info.
            let listener = ApiListener::new(listener, None).unwrap();
            tasks.push(tokio::spawn(async move {
                let routes = hub.routes();
                let _ = axum::serve(
                    listener,
                    routes.into_make_service_with_connect_info::<Peer>(),
                )
                .await;
            }));
        }
        Protocol::Xds => {
            let (tx, resources) = tokio::sync::watch::channel(None);
            let settings = xds_settings();
            tasks.push(tokio::spawn(xds::publish(
                registry.subscribe(),
                settings,
                serving,
                tx,
                stop.clone(),
            )));
            let gate = Arc::new(Gate::open());
            let ads = Arc::new(xds::ads::Ads {
                resources,
                routers: routers_set.clone(),
                metrics: Arc::default(),
                stop: stop.clone(),
                leadership: signpost_controller::lease::Leaders::single().leadership,
                gate: gate.clone(),
            });
            let lrs = Arc::new(xds::lrs::Lrs {
                registry: registry.subscribe(),
                routers: routers_set.clone(),
                stop: stop.clone(),
                gate,
            });
            let listener = ApiListener::new(listener, None).unwrap();
            let stopping = stop.clone();
            tasks.push(tokio::spawn(async move {
                let _ = xds::serve(listener, ads, lrs, stopping).await;
            }));
        }
    }
    let clients = RouterProcess::start(protocol, address, routers);
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

    // The routers run in a process of their own: memory and CPU here are
    // the controller side's.
    let rss = resident_mib();
    let cpu_before = cpu_seconds();
    let clients_cpu_before = clients.cpu_seconds();
    // The changes are made and waited on from a task, as the controller's
    // lifecycle waits are: a wait in `block_on` would wake this thread from
    // its futex at every ack.
    let changing = tokio::spawn({
        let (registry, routers_set) = (registry.clone(), routers_set.clone());
        async move {
            let mut samples = Vec::with_capacity(changes);
            let mut bytes = 0;
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
                let before = registry.snapshot();
                let start = Instant::now();
                let revision = registry
                    .apply(&[change], SystemTime::now())
                    .expect("every change changes something");
                routers_set
                    .wait_acked(revision, Duration::from_secs(60))
                    .await
                    .expect("every router acks");
                samples.push(start.elapsed());
                bytes += sent_per_router(protocol, &before, &registry.snapshot());
            }
            (samples, bytes)
        }
    });
    let (mut samples, bytes) = changing.await.expect("the changes are made");
    let cpu_per_change = (cpu_seconds() - cpu_before) / changes as f64;
    let clients_cpu_per_change = (clients.cpu_seconds() - clients_cpu_before) / changes as f64;
    drop(clients);
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    let name = match protocol {
        Protocol::Ndjson => "NDJSON",
        Protocol::Xds => "xDS (ADS)",
    };
    println!(
        "| {name} | {routers} | {changes} | {:.2} ms | {:.2} ms | {:.2} ms | {rss:.0} MiB | {:.2} ms | {:.2} ms | {} |",
        ms(at(0.50)),
        ms(at(0.99)),
        ms(*samples.last().unwrap()),
        cpu_per_change * 1000.0,
        clients_cpu_per_change * 1000.0,
        bytes / changes,
    );
    stop.cancel();
    for task in tasks {
        task.abort();
    }
}

/// What the controller sends each router for the change from `before` to
/// `after`, in bytes: the NDJSON line (delta or snapshot, whichever the hub
/// would send), or the xDS resources that changed, whole (xDS sends a
/// changed resource whole: here the service's ClusterLoadAssignment). Framing
/// (HTTP chunks, gRPC and HTTP/2 frames, the xDS response's own fields) is
/// not counted.
fn sent_per_router(protocol: Protocol, before: &Snapshot, after: &Snapshot) -> usize {
    match protocol {
        Protocol::Ndjson => {
            let epoch = Epoch::from_bits(1);
            encode::delta(epoch, before, after)
                .unwrap_or_else(|| encode::snapshot(epoch, after))
                .to_line()
                .len()
        }
        Protocol::Xds => {
            let settings = xds_settings();
            let view = |snapshot: &Snapshot| {
                xds::resources::Resources::from_snapshot(snapshot, &settings).view(
                    xds::ResourceType::Endpoints,
                    &xds::resources::Subscription::Wildcard,
                    xds::resources::Balancing::LeastRequest,
                )
            };
            let (old, new) = (view(before), view(after));
            new.iter()
                .filter(|(name, resource)| old.get(*name) != Some(resource))
                .map(|(_, resource)| resource.value.len())
                .sum()
        }
    }
}

fn xds_settings() -> xds::resources::Settings {
    xds::resources::Settings {
        envoy_listener: "127.0.0.1:10000".parse().unwrap(),
    }
}

/// This process's resident memory (Linux), in MiB.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// CPU time (user + system) this process has used, in seconds (Linux).
fn cpu_seconds() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}

/// CPU time (user + system) of the process whose `stat` file this is.
fn cpu_seconds_of(stat: &str) -> f64 {
    let stat = std::fs::read_to_string(stat).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th of them, in clock ticks (100 a second).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A router reduced to the protocol: read lines, apply, ack.
async fn subscriber(http: Http, base: String, id: String) {
    let uri = format!("{base}/v1/watch?router={id}&protocol={PROTOCOL}");
    let response = http.get(uri.parse().unwrap()).await.expect("subscribe");
    // A refused subscription must stop the bench, not leave it waiting.
    assert!(
        response.status().is_success(),
        "subscribe: {}",
        response.status()
    );
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

/// An xDS client reduced to the protocol: one ADS stream, every cluster and
/// the service's endpoints, each response ACKed. Like Envoy, it reconnects
/// when the stream fails (1,000 connecting at once can overflow the
/// listener's accept queue).
async fn xds_client(address: SocketAddr, id: String) {
    loop {
        let _ = xds_session(address, &id).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn xds_session(address: SocketAddr, id: &str) -> Result<(), Box<dyn std::error::Error>> {
    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{address}")).await?;
    let node = Node {
        id: id.into(),
        user_agent_name: "envoy".into(),
        ..Default::default()
    };
    let request = |type_url: &str| DiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.into(),
        resource_names: if type_url == EDS {
            vec!["users".into()]
        } else {
            vec![]
        },
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(request(CDS)).await?;
    tx.send(request(EDS)).await?;
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        let mut ack = request(&response.type_url);
        ack.version_info = response.version_info;
        ack.response_nonce = response.nonce;
        tx.send(ack).await?;
    }
    Ok(())
}
