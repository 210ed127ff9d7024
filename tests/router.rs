//! `signpost router` against the real controller, the emulator and real
//! backends at the instances' addresses: requests go through the router's
//! proxy port and are counted where they land.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ids, wait_for, Backends, Cloud, Controller, Emulator, Router, Scene};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PORT: u16 = common::BACKEND_PORT;

fn tags<'a>(service: &'a str, route: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("signpost:service", service),
        ("signpost:port", "18080"),
        ("signpost:route", route),
    ]
}

fn cache_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signpost-router-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    let _ = std::fs::remove_file(&path);
    path
}

/// Waits until the registry lists exactly `ids` for the service (any state)
/// and returns the revision of that listing.
async fn wait_listed(controller: &Controller, service: &str, ids: &[String]) -> u64 {
    wait_for(
        &format!("{service} to list exactly {ids:?}"),
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get(&format!("/v1/services/{service}")).await;
            let mut listed: Vec<String> = body["endpoints"]
                .as_array()?
                .iter()
                .map(|e| e["instance_id"].as_str().unwrap().to_owned())
                .collect();
            listed.sort();
            (listed == ids).then(|| body["revision"].as_u64().unwrap())
        },
    )
    .await
}

/// Sends `n` requests through the router; every one must succeed. Returns
/// how many each instance answered.
async fn send(router: &Router, path: &str, n: usize) -> HashMap<String, usize> {
    let mut answered = HashMap::new();
    for _ in 0..n {
        let (status, body) = router.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        let instance = body.trim().strip_prefix("instance=").unwrap().to_owned();
        *answered.entry(instance).or_default() += 1;
    }
    answered
}

fn hits(backends: &Backends, instances: &[(String, IpAddr)]) -> Vec<usize> {
    instances.iter().map(|(_, ip)| backends.hits(*ip)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_spreads_over_every_healthy_instance() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(PORT);
    cloud
        .create_group("users", &tags("users", "/users"), 3)
        .await;
    cloud
        .create_group("admin", &tags("admin", "/users/admin"), 1)
        .await;
    let users = cloud.instances("users").await;
    let admin = cloud.instances("admin").await;
    backends.follow(&users).await;
    backends.start(&admin[0].0, admin[0].1).await;
    let controller = Controller::start(&emulator, "").await;
    controller
        .wait_endpoints("users", "healthy", &ids(&users))
        .await;
    controller
        .wait_endpoints("admin", "healthy", &ids(&admin))
        .await;
    let router = Router::start(&controller.url(""), "r1", &cache_file("prefix"), &[]).await;
    controller.wait_in_sync(&router).await;

    let answered = send(&router, "/users/42", 60).await;
    let mut who: Vec<&String> = answered.keys().collect();
    who.sort();
    assert_eq!(who, ids(&users).iter().collect::<Vec<_>>(), "{answered:?}");
    for (instance, n) in &answered {
        assert!(*n >= 5, "{instance} got only {n} of 60: {answered:?}");
    }
    assert_eq!(backends.hits(admin[0].1), 0, "/users/42 is not admin's");

    let answered = send(&router, "/users/admin/settings", 10).await;
    assert_eq!(answered.get(&admin[0].0), Some(&10), "longest prefix wins");
    let answered = send(&router, "/users/administrator", 5).await;
    assert!(
        !answered.contains_key(&admin[0].0),
        "prefixes match whole segments"
    );

    let (status, body) = router.get("/nothing/here?x=1").await;
    assert_eq!(status, 404);
    assert!(body.contains("/nothing/here"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_gets_traffic_only_once_healthy_and_scale_in_none_after_the_ack() {
    let Scene {
        emulator: _emulator,
        cloud,
        mut backends,
        controller,
        instances: two,
    } = Scene::start(PORT, "users", &tags("users", "/users"), 2, "").await;
    let router = Router::start(&controller.url(""), "r1", &cache_file("scale"), &[]).await;
    controller.wait_in_sync(&router).await;

    // Scale out. The new instances' applications run and would answer any
    // request, but their health checks fail: they must get nothing.
    cloud.set_desired("users", 4).await;
    let four = cloud.instances("users").await;
    let new: Vec<(String, IpAddr)> = four.iter().filter(|i| !two.contains(i)).cloned().collect();
    assert_eq!(new.len(), 2);
    for (id, ip) in &new {
        backends.set_health(*ip, false);
        backends.start(id, *ip).await;
    }
    let revision = wait_listed(&controller, "users", &ids(&four)).await;
    wait_for(
        "the router to ack the scale-out",
        Duration::from_secs(20),
        || async { (controller.acked("r1").await >= Some(revision)).then_some(()) },
    )
    .await;
    send(&router, "/users/x", 40).await;
    assert_eq!(hits(&backends, &new), [0, 0], "not healthy, not routed");

    for (_, ip) in &new {
        backends.set_health(*ip, true);
    }
    controller
        .wait_endpoints("users", "healthy", &ids(&four))
        .await;
    wait_for(
        "both new instances to get traffic",
        Duration::from_secs(20),
        || async {
            send(&router, "/users/x", 10).await;
            hits(&backends, &new).iter().all(|n| *n > 0).then_some(())
        },
    )
    .await;

    // Scale in. The removed instances' applications keep running, so any
    // request routed to them would be counted.
    cloud.set_desired("users", 2).await;
    let remaining = cloud.instances("users").await;
    let removed: Vec<(String, IpAddr)> = four
        .iter()
        .filter(|i| !remaining.contains(i))
        .cloned()
        .collect();
    assert_eq!(removed.len(), 2);
    let revision = wait_listed(&controller, "users", &ids(&remaining)).await;
    wait_for(
        "the router to ack the scale-in",
        Duration::from_secs(20),
        || async { (controller.acked("r1").await >= Some(revision)).then_some(()) },
    )
    .await;
    let before = hits(&backends, &removed);
    let answered = send(&router, "/users/x", 40).await;
    assert_eq!(
        hits(&backends, &removed),
        before,
        "removed instances get nothing"
    );
    assert_eq!(answered.len(), 2, "{answered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_endpoints_get_no_traffic_and_none_healthy_is_503() {
    let Scene {
        emulator: _emulator,
        cloud: _,
        mut backends,
        controller,
        instances: two,
    } = Scene::start(PORT, "users", &tags("users", "/users"), 2, "").await;
    let router = Router::start(&controller.url(""), "r1", &cache_file("unhealthy"), &[]).await;

    // The application still answers; only its health check fails.
    backends.set_health(two[0].1, false);
    controller
        .wait_endpoints("users", "unhealthy", &[two[0].0.clone()])
        .await;
    controller.wait_in_sync(&router).await;
    let before = backends.hits(two[0].1);
    let answered = send(&router, "/users/x", 30).await;
    assert_eq!(backends.hits(two[0].1), before, "{answered:?}");
    assert_eq!(answered.get(&two[1].0), Some(&30));

    backends.set_health(two[1].1, false);
    controller.wait_endpoints("users", "healthy", &[]).await;
    controller.wait_in_sync(&router).await;
    let (status, body) = router.get("/users/x").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("users"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_elsewhere_and_repeated_failures_eject() {
    // Probe once, then not for an hour: the registry keeps calling a dead
    // backend healthy, so only the router's own failures can steer around it.
    let Scene {
        emulator: _emulator,
        cloud: _,
        mut backends,
        controller,
        instances: two,
    } = Scene::start(
        PORT,
        "users",
        &tags("users", "/users"),
        2,
        "[health.services.users]\ninterval = \"1h\"\nhealthy_threshold = 1\n",
    )
    .await;
    let router = Router::start(&controller.url(""), "r1", &cache_file("eject"), &[]).await;
    controller.wait_in_sync(&router).await;

    backends.stop(two[0].1);
    let answered = send(&router, "/users/x", 30).await;
    assert_eq!(
        answered.get(&two[1].0),
        Some(&30),
        "every request answered, by the live instance"
    );
    let ejection = wait_for(
        "the ejection to reach /v1/routers",
        Duration::from_secs(10),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            let ejected = body["routers"][0]["ejected"].as_array()?.first()?.clone();
            Some(ejected)
        },
    )
    .await;
    assert_eq!(ejection["service"], "users");
    assert_eq!(ejection["instance"], two[0].0.as_str());
    assert_eq!(ejection["reason"], "connect_failures");
    assert!(ejection["remaining_ms"].as_u64().unwrap() > 0);
    assert_eq!(
        controller.endpoints("users", "healthy").await,
        ids(&two),
        "the registry stays the authority on health"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_both_ack_each_revision() {
    let Scene {
        emulator: _emulator,
        cloud,
        mut backends,
        controller,
        ..
    } = Scene::start(PORT, "users", &tags("users", "/users"), 1, "").await;
    let r1 = Router::start(&controller.url(""), "r1", &cache_file("two-1"), &[]).await;
    let r2 = Router::start(
        &controller.url(""),
        "r2",
        &cache_file("two-2"),
        &["--balance", "round-robin"],
    )
    .await;

    for desired in [1, 3, 2] {
        cloud.set_desired("users", desired).await;
        let instances = cloud.instances("users").await;
        backends.follow(&instances).await;
        controller
            .wait_endpoints("users", "healthy", &ids(&instances))
            .await;
        let revision = controller.get("/v1/services/users").await.1["revision"]
            .as_u64()
            .unwrap();
        wait_for(
            &format!("both routers to ack revision {revision}"),
            Duration::from_secs(20),
            || async {
                let a = controller.acked("r1").await?;
                let b = controller.acked("r2").await?;
                (a >= revision && b >= revision).then_some(())
            },
        )
        .await;
        let answered = send(&r2, "/users/x", 3 * instances.len()).await;
        assert_eq!(
            answered.len(),
            instances.len(),
            "round robin visits all: {answered:?}"
        );
    }

    // One read of /v1/routers in which both have acked its revision (a
    // health verdict may move the registry on between two reads).
    let body = wait_for(
        "both routers to ack the registry's revision",
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            let revision = &body["revision"];
            let routers = body["routers"].as_array()?;
            routers
                .iter()
                .all(|r| r["acked_revision"] == *revision)
                .then_some(body.clone())
        },
    )
    .await;
    let revision = body["revision"].as_u64().unwrap();
    let routers = body["routers"].as_array().unwrap();
    assert_eq!(routers.len(), 2, "{body}");
    for (r, id) in routers.iter().zip(["r1", "r2"]) {
        assert_eq!(r["id"], id);
        assert!(
            r["address"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
        assert_eq!(r["connected"], true);
        assert_eq!(r["acked_revision"], revision);
        assert_eq!(r["lag"], 0);
        assert!(r["connected_since"].as_str().unwrap().ends_with('Z'), "{r}");
        assert!(r["last_seen"].is_string(), "{r}");
        assert!(r["in_flight"].is_object(), "{r}");
    }

    let status = r1.terminate().await;
    assert!(status.success(), "{status:?}");
    wait_for(
        "r1 to show as disconnected",
        Duration::from_secs(10),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            (body["routers"][0]["connected"] == false).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_keep_routing_without_the_controller_and_restart_from_the_cache() {
    let Scene {
        emulator: _emulator,
        cloud: _,
        backends: _backends,
        controller,
        instances: two,
    } = Scene::start(PORT, "users", &tags("users", "/users"), 2, "").await;
    let cache = cache_file("outage");
    let controller_url = controller.url("");
    let router = Router::start(&controller_url, "r1", &cache, &[]).await;
    controller.wait_in_sync(&router).await;
    wait_for(
        "the cache file to hold the routes",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(&cache).ok()?;
            two.iter()
                .all(|(id, _)| text.contains(id.as_str()))
                .then_some(())
        },
    )
    .await;

    controller.kill().await;
    wait_for("the router to notice", Duration::from_secs(20), || async {
        (router.admin("/readyz").await.1["connected"] == false).then_some(())
    })
    .await;
    let answered = send(&router, "/users/x", 20).await;
    assert_eq!(answered.len(), 2, "still spread over both: {answered:?}");
    let (status, body) = router.admin("/readyz").await;
    assert_eq!(
        status, 200,
        "a router on its last snapshot is still ready: {body}"
    );

    // A router started while the controller is still away.
    router.kill().await;
    let router = Router::start(&controller_url, "r1", &cache, &[]).await;
    let ready = router.wait_ready().await;
    assert_eq!(ready["source"], "cache", "{ready}");
    let answered = send(&router, "/users/x", 20).await;
    assert_eq!(answered.len(), 2, "routes from the cache: {answered:?}");
}

/// A fake controller that serves a scripted stream per watch connection,
/// records acked revisions, and answers 503 after the script until `release`.
struct FakeController {
    url: String,
    watches: Arc<AtomicUsize>,
    /// (epoch, revision) of every ack.
    acks: Arc<Mutex<Vec<(u64, u64)>>>,
    release: Arc<AtomicBool>,
}

impl FakeController {
    async fn start(script: Vec<String>, after_release: String) -> FakeController {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let watches = Arc::new(AtomicUsize::new(0));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(AtomicBool::new(false));
        let (w, a, r) = (watches.clone(), acks.clone(), release.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let request = read_request(&mut stream).await;
                if request.starts_with("POST") {
                    let body = request.split("\r\n\r\n").nth(1).unwrap_or_default();
                    let ack: serde_json::Value = serde_json::from_str(body).unwrap();
                    a.lock().unwrap().push((
                        ack["epoch"].as_u64().unwrap(),
                        ack["revision"].as_u64().unwrap(),
                    ));
                    let _ = stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                        .await;
                    continue;
                }
                let n = w.fetch_add(1, Ordering::SeqCst);
                let lines = match script.get(n) {
                    Some(lines) => lines.clone(),
                    None if r.load(Ordering::SeqCst) => after_release.clone(),
                    None => {
                        let _ = stream
                            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        continue;
                    }
                };
                // A body delimited by the connection's close, as HTTP/1.1 allows.
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(lines.as_bytes()).await;
                held.push(stream);
            }
        });
        FakeController {
            url,
            watches,
            acks,
            release,
        }
    }
}

/// Reads one request head and, for a POST, its Content-Length body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_push_or_protocol_mismatch_keeps_the_snapshot_and_reconnects() {
    let subnet = common::Subnet::reserve();
    let ip = subnet.ip(4);
    let mut backends = Backends::new(PORT);
    backends.start("i-fake", ip).await;
    let snapshot = |protocol: u32, epoch: u64, revision: u64| {
        format!(
            "{{\"type\":\"snapshot\",\"protocol\":{protocol},\"epoch\":{epoch},\"revision\":{revision},\"services\":[{{\"name\":\"users\",\"route\":\"/users\",\"endpoints\":[{{\"instance\":\"i-fake\",\"address\":\"{ip}\",\"port\":{PORT},\"zone\":\"a\",\"state\":\"healthy\"}}]}}]}}\n"
        )
    };
    let remove_all = |base: u64| {
        format!(
            "{{\"type\":\"delta\",\"protocol\":2,\"epoch\":9,\"revision\":{},\"base\":{base},\"changes\":[{{\"op\":\"remove_service\",\"name\":\"users\"}}]}}\n",
            base + 1
        )
    };
    let script = vec![
        // A good snapshot, then garbage.
        snapshot(2, 9, 5) + "{\"type\":\"delta\",\"protoc\n",
        // A snapshot of a protocol this router does not speak.
        snapshot(3, 9, 6),
        // A delta for a revision the router does not have.
        remove_all(99),
        // The same controller lifetime going backwards.
        snapshot(2, 9, 4),
    ];
    // After the release: a restarted controller (new epoch), whose
    // revisions start again from 1.
    let fake = FakeController::start(script, snapshot(2, 10, 1)).await;
    let router = Router::start(&fake.url, "r1", &cache_file("fake"), &[]).await;

    wait_for(
        "the router to reconnect after each bad stream",
        Duration::from_secs(20),
        || async { (fake.watches.load(Ordering::SeqCst) >= 5).then_some(()) },
    )
    .await;
    let (_, ready) = router.admin("/readyz").await;
    assert_eq!(
        ready["revision"], 5,
        "the last good snapshot is kept: {ready}"
    );
    let answered = send(&router, "/users/x", 5).await;
    assert_eq!(answered.get("i-fake"), Some(&5));
    let log = router.log();
    assert!(log.contains("malformed message"), "{log}");
    assert!(log.contains("protocol version 3 not supported"), "{log}");
    assert!(log.contains("delta for revision 99"), "{log}");
    assert!(
        log.contains("revision went backwards within epoch 9: 4 after 5"),
        "{log}"
    );

    fake.release.store(true, Ordering::SeqCst);
    wait_for(
        "the router to apply the new controller lifetime's snapshot",
        Duration::from_secs(20),
        || async { (router.admin("/readyz").await.1["revision"] == 1).then_some(()) },
    )
    .await;
    wait_for(
        "the ack of epoch 10's revision 1",
        Duration::from_secs(10),
        || async { fake.acks.lock().unwrap().contains(&(10, 1)).then_some(()) },
    )
    .await;
    let acks = fake.acks.lock().unwrap().clone();
    assert!(
        acks.iter().all(|a| *a == (9, 5) || *a == (10, 1)),
        "only applied revisions are acked, each with its epoch: {acks:?}"
    );
    assert!(router.log().contains("a new controller lifetime"));
}
