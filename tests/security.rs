//! The control plane's authentication, end to end: real TLS on loopback
//! with certificates made by the test (`common::pki`), the real controller
//! and real routers presenting client certificates or tokens.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use signpost_router::transport::{Controller as Link, Credentials};

use common::pki::{Ca, Name, Pair};
use common::{
    completed, in_state, wait_for, Backends, Cloud, Controller, Emulator, FollowedGroup, Router,
};

const PORT: u16 = common::BACKEND_PORT;

fn dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signpost-security-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn credentials(ca: &Ca, pair: Option<&Pair>, token_file: Option<&Path>) -> Credentials {
    Credentials {
        controller_ca: Some(ca.cert.clone()),
        client_cert: pair.map(|p| p.cert.clone()),
        client_key: pair.map(|p| p.key.clone()),
        token_file: token_file.map(Path::to_owned),
    }
}

fn link(credentials: &Credentials) -> Link {
    Link::new(credentials, true, Duration::from_secs(2)).unwrap()
}

/// One request: status and body, or why it got no answer.
async fn call(
    link: &Link,
    method: Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Result<(u16, String), String> {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), link.send(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    // A watch stream never ends: its status is all a test needs.
    if status == 200 && response.headers()["content-type"] == "application/x-ndjson" {
        return Ok((status, String::new()));
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn tls_toml(server: &Pair, client_ca: Option<&Ca>, rest: &str) -> String {
    let ca = client_ca.map_or(String::new(), |ca| {
        format!("client_ca = {:?}\n", ca.cert.display().to_string())
    });
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{ca}reload_interval = \"200ms\"\n{rest}",
        server.cert.display().to_string(),
        server.key.display().to_string()
    )
}

fn watch_path(router: &str) -> String {
    let protocol = signpost_protocol::PROTOCOL;
    format!("/v1/watch?router={router}&protocol={protocol}")
}

fn watch(controller: &Controller, router: &str) -> String {
    controller.url(&watch_path(router))
}

/// An ack as a router would send it, for the controller's current epoch
/// and revision, saying nothing is in flight.
async fn all_clear(controller: &Controller) -> serde_json::Value {
    let (_, routers) = controller.get("/v1/routers").await;
    serde_json::json!({
        "epoch": routers["epoch"],
        "revision": routers["revision"],
        "in_flight": {},
        "ejected": [],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_a_router_subscribes_and_acks_only_as_itself() {
    let dir = dir("mtls");
    let ca = Ca::new(&dir, "signpost");
    let server = ca.server("controller");
    let edge_a = ca.client("edge-a", Name::Cn("edge-a"));
    let edge_b = ca.client("edge-b", Name::Cn("edge-b"));
    let ops = ca.client("ops", Name::Cn("ops"));
    let emulator = Emulator::start().await;
    let config = tls_toml(&server, Some(&ca), "[auth.roles]\nops = \"admin\"\n");
    let controller =
        Controller::start_tls(&emulator, &config, &credentials(&ca, Some(&ops), None)).await;

    // Real routers, each with its own certificate, subscribe and ack.
    let router_flags = |pair: &Pair| {
        vec![
            "--controller-ca".to_owned(),
            ca.cert.display().to_string(),
            "--client-cert".to_owned(),
            pair.cert.display().to_string(),
            "--client-key".to_owned(),
            pair.key.display().to_string(),
        ]
    };
    let start_router = |id: &'static str, pair: &Pair| {
        let flags = router_flags(pair);
        let url = controller.url("");
        let cache = dir.join(format!("{id}.json"));
        async move {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Router::start(&url, id, &cache, &flags).await
        }
    };
    let a = start_router("edge-a", &edge_a).await;
    let b = start_router("edge-b", &edge_b).await;
    controller.wait_in_sync(&a).await;
    controller.wait_in_sync(&b).await;

    // A's certificate under B's id: refused, naming both.
    let as_a = link(&credentials(&ca, Some(&edge_a), None));
    let (status, body) = call(&as_a, Method::GET, watch(&controller, "edge-b"), None)
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(
        error.contains("\"edge-b\"") && error.contains("\"edge-a\""),
        "{error}"
    );
    // An ack for B from A: refused, and B's record is untouched.
    let before = controller.get("/v1/routers").await.1;
    let ack = all_clear(&controller).await;
    let url = controller.url("/v1/routers/edge-b/ack");
    let (status, body) = call(&as_a, Method::POST, url, Some(ack.clone()))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let record = |routers: &serde_json::Value| {
        routers["routers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "edge-b")
            .map(|r| r["last_seen"].clone())
    };
    assert_eq!(
        record(&controller.get("/v1/routers").await.1),
        record(&before)
    );
    // A router reads nothing.
    let (status, _) = call(&as_a, Method::GET, controller.url("/v1/services"), None)
        .await
        .unwrap();
    assert_eq!(status, 403);
    let refused = controller
        .metric("signpost_auth_refusals_total{reason=\"not_itself\"}")
        .await;
    assert_eq!(refused, Some(2.0));

    // A certificate of another CA, an expired one: no TLS session at all.
    let other = Ca::new(&dir.join("other"), "other");
    let foreign = other.client("foreign", Name::Cn("edge-a"));
    let expired = ca.expired_client("expired", "edge-a");
    // No certificate: a session (probes need one), and nothing but probes.
    let anonymous = link(&credentials(&ca, None, None));
    let answer = call(&anonymous, Method::GET, watch(&controller, "edge-a"), None).await;
    assert_eq!(answer.map(|a| a.0), Ok(401));
    let answer = call(&anonymous, Method::GET, controller.url("/readyz"), None).await;
    assert!(matches!(answer, Ok((200 | 503, _))), "{answer:?}");
    for (what, pair) in [
        ("another CA's certificate", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
    ] {
        let client = link(&credentials(&ca, pair, None));
        let answer = call(&client, Method::GET, watch(&controller, "edge-a"), None).await;
        assert!(answer.is_err(), "{what}: {answer:?}");
    }
    // Plain HTTP to the TLS listener gets no HTTP answer.
    let plain = common::http_get(&format!("http://127.0.0.1:{}/healthz", controller.port)).await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_uri_names_the_router_when_configured() {
    let dir = dir("spiffe");
    let ca = Ca::new(&dir, "signpost");
    let server = ca.server("controller");
    let uri = ca.client("uri", Name::Uri("spiffe://signpost/router/edge-u"));
    let cn_only = ca.client("cn", Name::Cn("edge-u"));
    let ops = ca.client("ops", Name::Uri("spiffe://signpost/router/ops"));
    let emulator = Emulator::start().await;
    let config = tls_toml(
        &server,
        Some(&ca),
        "identity = \"uri_san\"\n[auth.roles]\nops = \"admin\"\n",
    );
    let controller =
        Controller::start_tls(&emulator, &config, &credentials(&ca, Some(&ops), None)).await;
    let (status, body) = call(
        &link(&credentials(&ca, Some(&uri), None)),
        Method::GET,
        watch(&controller, "edge-u"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &link(&credentials(&ca, Some(&cn_only), None)),
        Method::GET,
        watch(&controller, "edge-u"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "a CN is not a URI SAN: {body}");
    assert!(body.contains("no URI SAN"), "{body}");
}

fn token_entry(token: &str, identity: &str, role: &str) -> String {
    format!(
        "[[token]]\nsha256 = \"{}\"\nidentity = \"{identity}\"\nrole = \"{role}\"\n",
        signpost_controller::auth::tokens::sha256_hex(token.as_bytes())
    )
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_give_roles_and_a_changed_tokens_file_applies_without_restart() {
    let dir = dir("tokens");
    let ca = Ca::new(&dir, "signpost");
    let server = ca.server("controller");
    let tokens = dir.join("tokens.toml");
    let entries = |list: &[(&str, &str, &str)]| {
        list.iter()
            .map(|(t, i, r)| token_entry(t, i, r))
            .collect::<String>()
    };
    std::fs::write(
        &tokens,
        entries(&[
            ("ops-token", "ops", "admin"),
            ("grafana-token", "grafana", "reader"),
            ("edge-1-token", "edge-1", "router"),
        ]),
    )
    .unwrap();
    let emulator = Emulator::start().await;
    let config = tls_toml(
        &server,
        None,
        &format!("[auth]\ntokens_file = {:?}\n", tokens.display().to_string()),
    );
    let ops = write_token(&dir, "ops", "ops-token");
    let controller =
        Controller::start_tls(&emulator, &config, &credentials(&ca, None, Some(&ops))).await;

    let as_token = |token: &str| {
        let file = write_token(&dir, &format!("{token}.file"), token);
        link(&credentials(&ca, None, Some(&file)))
    };
    let grafana = as_token("grafana-token");
    let get = |client: &Link, path: &str| {
        let url = controller.url(path);
        let client = client.clone();
        async move { call(&client, Method::GET, url, None).await.unwrap() }
    };
    assert_eq!(get(&grafana, "/v1/services").await.0, 200);
    assert_eq!(get(&grafana, "/metrics").await.0, 200);
    let (status, body) = get(&grafana, &watch_path("grafana")).await;
    assert_eq!(status, 403, "a reader cannot subscribe: {body}");

    let nobody = link(&credentials(&ca, None, None));
    assert_eq!(get(&nobody, "/v1/services").await.0, 401);
    assert_eq!(get(&nobody, "/healthz").await.0, 200, "probes stay open");
    let stranger = as_token("made-up");
    assert_eq!(get(&stranger, "/v1/services").await.0, 401);

    let edge_1 = as_token("edge-1-token");
    assert_eq!(get(&edge_1, &watch_path("edge-1")).await.0, 200);
    assert_eq!(get(&edge_1, &watch_path("edge-2")).await.0, 403);

    // A real router with its token file subscribes and acks.
    let router_token = write_token(&dir, "router-token", "edge-1-token");
    let flags = [
        "--controller-ca",
        ca.cert.to_str().unwrap(),
        "--token-file",
        router_token.to_str().unwrap(),
    ];
    let router = Router::start(
        &controller.url(""),
        "edge-1",
        &dir.join("edge-1.json"),
        &flags,
    )
    .await;
    controller.wait_in_sync(&router).await;

    // The file changes: edge-2 is added, grafana removed; no restart.
    std::fs::write(
        &tokens,
        entries(&[
            ("ops-token", "ops", "admin"),
            ("edge-1-token", "edge-1", "router"),
            ("edge-2-token", "edge-2", "router"),
        ]),
    )
    .unwrap();
    let edge_2 = as_token("edge-2-token");
    wait_for(
        "the new token to be accepted",
        Duration::from_secs(5),
        || async { (get(&edge_2, &watch_path("edge-2")).await.0 == 200).then_some(()) },
    )
    .await;
    assert_eq!(
        get(&grafana, "/v1/services").await.0,
        401,
        "a removed token stops working"
    );

    // A broken file keeps the last good tokens.
    std::fs::write(&tokens, "[[token]]\nsha256 = \"nope\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&edge_2, &watch_path("edge-2")).await.0, 200);
}

/// A controller over TLS that knows its callers by bearer token: `ops`
/// (admin, the harness's) and `holders` (identity, role), each with the
/// token `<identity>-token`; `limits` are lines of its `[limits]`.
struct TokenScene {
    dir: PathBuf,
    ca: Ca,
    _emulator: Emulator,
    controller: Controller,
}

impl TokenScene {
    async fn start(test: &str, holders: &[(&str, &str)], limits: &str) -> TokenScene {
        let dir = dir(test);
        let ca = Ca::new(&dir, "signpost");
        let server = ca.server("controller");
        let tokens = dir.join("tokens.toml");
        let entries: String = std::iter::once(("ops", "admin"))
            .chain(holders.iter().copied())
            .map(|(identity, role)| token_entry(&format!("{identity}-token"), identity, role))
            .collect();
        std::fs::write(&tokens, entries).unwrap();
        let emulator = Emulator::start().await;
        let rest = format!(
            "[auth]\ntokens_file = {:?}\n[limits]\n{limits}\n",
            tokens.display().to_string()
        );
        let ops = write_token(&dir, "ops", "ops-token");
        let controller = Controller::start_tls(
            &emulator,
            &tls_toml(&server, None, &rest),
            &credentials(&ca, None, Some(&ops)),
        )
        .await;
        TokenScene {
            dir,
            ca,
            _emulator: emulator,
            controller,
        }
    }

    /// A client presenting `identity`'s token.
    fn link(&self, identity: &str) -> Link {
        let token = write_token(&self.dir, identity, &format!("{identity}-token"));
        link(&credentials(&self.ca, None, Some(&token)))
    }
}

/// The forged-ack attack: a router of the fleet (valid certificate, its
/// own identity `mallory`) posts "revision applied, nothing in flight" in
/// the real router's name while that router still has a request in flight
/// to the terminating instance. The hook must keep waiting for the real
/// router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_ack_cannot_complete_a_scale_in() {
    let dir = dir("forged");
    let ca = Ca::new(&dir, "signpost");
    let server = ca.server("controller");
    let edge = ca.client("edge", Name::Cn("r1"));
    let mallory = ca.client("mallory", Name::Cn("mallory"));
    let ops = ca.client("ops", Name::Cn("ops"));

    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let group = "web-forged";
    let tags = [
        ("signpost:service", "web"),
        ("signpost:port", "18080"),
        ("signpost:route", "/"),
    ];
    cloud.create_group(group, &tags, 1).await;
    let instances = cloud.instances(group).await;
    let mut backends = Backends::new(PORT);
    backends.follow(&instances).await;
    let config = tls_toml(
        &server,
        Some(&ca),
        "[auth.roles]\nops = \"admin\"\n[lifecycle]\nrouter_grace = \"3s\"\ndrain_timeout = \"20s\"\n",
    );
    let controller =
        Controller::start_tls(&emulator, &config, &credentials(&ca, Some(&ops), None)).await;
    let (id, _) = instances[0].clone();
    controller
        .wait_endpoints("web", "healthy", std::slice::from_ref(&id))
        .await;
    cloud
        .put_hook(group, "signpost-terminate", "terminating", 300, "CONTINUE")
        .await;
    let flags = [
        "--controller-ca",
        ca.cert.to_str().unwrap(),
        "--client-cert",
        edge.cert.to_str().unwrap(),
        "--client-key",
        edge.key.to_str().unwrap(),
    ];
    let router = Router::start(&controller.url(""), "r1", &dir.join("r1.json"), &flags).await;
    router.wait_ready().await;
    controller.wait_in_sync(&router).await;
    let _followed = FollowedGroup::start(&cloud, group, backends);

    // A request that stays in flight for 8s (longer than `http_get`'s
    // limit, so through a client without one).
    let slow = tokio::spawn({
        let url = format!("http://127.0.0.1:{}/slow/8000", router.port);
        let plain = Link::new(&Credentials::default(), false, Duration::from_secs(2)).unwrap();
        async move {
            let request = Request::get(url).body(Full::default()).unwrap();
            let status = plain.send(request).await.map(|r| r.status().as_u16());
            (status, SystemTime::now())
        }
    });
    wait_for(
        "the router to report the request in flight",
        Duration::from_secs(10),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            (body["routers"][0]["in_flight"]["web"][&id].as_u64() == Some(1)).then_some(())
        },
    )
    .await;

    cloud.set_desired(group, 0).await;
    controller
        .wait_endpoints("web", "draining", std::slice::from_ref(&id))
        .await;
    // The attacker acks the drain in r1's name, again and again.
    let attacker = link(&credentials(&ca, Some(&mallory), None));
    let url = controller.url("/v1/routers/r1/ack");
    let mut answers = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let ack = all_clear(&controller).await;
        answers.push(
            call(&attacker, Method::POST, url.clone(), Some(ack))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        in_state(&cloud, group, "Terminating:Wait").await,
        vec![id.clone()],
        "held while the real router has its request in flight"
    );
    assert!(completed(&controller, &id).await.is_none());
    assert!(
        answers.len() > 5 && answers.iter().all(|(status, _)| *status == 403),
        "{answers:?}"
    );

    let (answer, answered_at) = slow.await.unwrap();
    assert_eq!(answer.expect("the slow request is answered"), 200);
    let record = wait_for("the hook to complete", Duration::from_secs(30), || {
        completed(&controller, &id)
    })
    .await;
    assert_eq!(record["result"], "continue", "{record}");
    let since = humantime::parse_rfc3339(record["since"].as_str().unwrap()).unwrap();
    let completed_at = since + Duration::from_millis(record["completed_ms"].as_u64().unwrap());
    assert!(
        completed_at >= answered_at,
        "CONTINUE only after r1 drained: {record}"
    );
    // The audit names the acks that justified it: r1's own, nothing in flight.
    let acks = &record["acks"];
    assert!(acks[0]["revision"].as_u64().is_some(), "{record}");
    assert_eq!(
        *acks,
        serde_json::json!([{
            "router": "r1", "identity": "r1",
            "revision": acks[0]["revision"], "in_flight": 0,
        }]),
        "{record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_holds_at_most_its_share_of_subscriptions() {
    let scene = TokenScene::start(
        "limits",
        &[("edge", "router")],
        "subscriptions_per_identity = 2",
    )
    .await;
    let controller = &scene.controller;
    let edge = scene.link("edge");
    let open = || async {
        let request = Request::get(watch(controller, "edge"))
            .body(Full::default())
            .unwrap();
        edge.send(request).await.unwrap()
    };
    let first = open().await;
    let second = open().await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await;
    assert_eq!(third.status(), 429);
    let body = third.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("subscriptions_per_identity"),
        "{body:?}"
    );
    assert_eq!(
        controller
            .metric("signpost_auth_refusals_total{reason=\"too_many_subscriptions\"}")
            .await,
        Some(1.0)
    );
    // A stream that ends gives its slot back.
    drop(first);
    wait_for("a slot to free up", Duration::from_secs(20), || async {
        let again = open().await;
        (again.status() == 200).then_some(again)
    })
    .await;
}

/// `limits.requests_per_second`: an identity that sends more is answered
/// 429 with `Retry-After`, counted; other identities are not slowed, and
/// the caller is served again once its rate allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_request_rate_is_refused_and_others_are_not() {
    let scene = TokenScene::start(
        "rate",
        &[("grafana", "reader"), ("edge", "router")],
        "requests_per_second = 5",
    )
    .await;
    let controller = &scene.controller;
    let grafana = scene.link("grafana");
    let read = || async {
        let request = Request::get(controller.url("/v1/services"))
            .body(Full::default())
            .unwrap();
        grafana.send(request).await.unwrap()
    };
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        let response = read().await;
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
        }
        statuses.push(response.status().as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        statuses[..5].iter().all(|s| *s == 200) && refused >= 10,
        "a second's worth served, then refused: {statuses:?}"
    );
    assert_eq!(retry_after.expect("Retry-After on a 429"), "1");
    assert!(
        controller
            .metric("signpost_auth_refusals_total{reason=\"rate_limited\"}")
            .await
            >= Some(10.0)
    );

    let edge = scene.link("edge");
    let (status, _) = call(&edge, Method::GET, watch(controller, "edge"), None)
        .await
        .unwrap();
    assert_eq!(status, 200, "another identity is not slowed");
    wait_for(
        "grafana's rate to allow it again",
        Duration::from_secs(5),
        || async { (read().await.status() == 200).then_some(()) },
    )
    .await;
}
