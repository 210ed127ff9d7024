//! Several controller replicas, one leader by a DynamoDB lease (moto serves
//! DynamoDB): exactly one leads; a killed leader is replaced within the
//! lease plus 2 s and its scale-in completes without a failed request; a
//! paused leader completes nothing once it has lost the lease; without
//! DynamoDB nobody leads and routers keep routing; DynamoDB misbehaving
//! (throttled, 500, reset, stalled, malformed: a fault proxy in front of
//! each replica's lease calls) makes the leader step down before its lease
//! can expire, and never leaves two replicas leading.
//!
//! Each replica signs its AWS calls with its own access key id, so the
//! emulator's record of CompleteLifecycleAction calls says who completed
//! what, and when (`Emulator::complete_calls`).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::faults::{most_within, Fault, FaultProxy, Times};
use common::{
    hold_launches_and_terminations, in_state, wait_for, wait_in_service, Backends, Cloud,
    CompleteCall, Controller, Emulator, FollowedGroup, Load, Router, TcpProxy,
};

const PORT: u16 = common::BACKEND_PORT;
const TABLE: &str = "signpost-lease";
/// Short, so that takeovers take seconds: renewals every 1 s, a leader
/// stops acting 2 s after its last successful renewal was sent.
const LEASE: Duration = Duration::from_secs(3);
const HEALTH: (&str, &str) = ("500ms", "400ms");

/// Each test runs an emulator, two or three controllers and routers: one
/// at a time on a 2-core machine.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tags() -> Vec<(&'static str, &'static str)> {
    vec![
        ("signpost:service", "web"),
        ("signpost:port", "18080"),
        ("signpost:route", "/"),
    ]
}

/// The controller TOML of replica `id`; the router grace covers the
/// routers' reconnect back-off (at most 5 s) after a takeover.
fn replica_toml(id: &str, lifecycle: &str, dynamodb: Option<&str>) -> String {
    let endpoint = dynamodb
        .map(|url| format!("[aws.endpoints]\ndynamodb = \"{url}\"\n"))
        .unwrap_or_default();
    format!(
        "[ha]\ntable = \"{TABLE}\"\nlease_duration = \"{}s\"\nreplica_id = \"{id}\"\n{lifecycle}{endpoint}",
        LEASE.as_secs()
    )
}

const LIFECYCLE: &str =
    "[lifecycle]\nrouter_grace = \"6s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"20s\"\n";

async fn replica(emulator: &Emulator, id: &str, toml: String) -> Controller {
    Controller::start_at_with_env(
        emulator,
        common::free_port(),
        &toml,
        HEALTH.0,
        HEALTH.1,
        &[("AWS_ACCESS_KEY_ID", &format!("key-{id}"))],
        None,
    )
    .await
}

fn cache_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signpost-ha-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    let _ = std::fs::remove_file(&path);
    path
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A replica's leadership as `/readyz` shows it.
async fn leadership(c: &Controller) -> serde_json::Value {
    c.fetch("/readyz")
        .await
        .ok()
        .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .map(|b| b["leadership"].clone())
        .unwrap_or_default()
}

/// Waits until exactly one of `replicas` leads and every other names it;
/// returns the leader's index and its token.
async fn one_leader(replicas: &[&Controller], limit: Duration) -> (usize, u64) {
    wait_for("exactly one leader, named by the others", limit, || async {
        let mut views = Vec::new();
        for r in replicas {
            views.push(leadership(r).await);
        }
        let leaders: Vec<usize> = (0..views.len())
            .filter(|i| views[*i]["role"] == "leader")
            .collect();
        let [leader] = leaders[..] else { return None };
        let id = views[leader]["replica"].clone();
        let named = views
            .iter()
            .enumerate()
            .all(|(i, v)| i == leader || v["leader"]["replica"] == id);
        named.then(|| (leader, views[leader]["token"].as_u64().unwrap()))
    })
    .await
}

/// When the replica's current term began, by its own report (wall clock).
async fn leading_since(c: &Controller) -> f64 {
    let since = leadership(c).await["since"].as_str().unwrap().to_owned();
    humantime::parse_rfc3339(&since)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_started_together_elect_one_leader() {
    let _alone = HEAVY.lock().await;
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let (a, b, c) = tokio::join!(
        replica(&emulator, "a", replica_toml("a", "", None)),
        replica(&emulator, "b", replica_toml("b", "", None)),
        replica(&emulator, "c", replica_toml("c", "", None)),
    );
    let (leader, token) = one_leader(&[&a, &b, &c], Duration::from_secs(10)).await;
    // Nobody took the lease from another: only the leader ever wrote it.
    // (Token 2 when the leader's first take timed out on its side after
    // DynamoDB applied it: it follows "itself" until that lease expires,
    // then takes it again. Seen with moto slow at start on a loaded
    // machine.)
    for (i, r) in [&a, &b, &c].into_iter().enumerate() {
        let took = r
            .metric("signpost_lease_calls_total{call=\"UpdateItem\",result=\"ok\"}")
            .await;
        if i != leader {
            assert_eq!(took, None, "replica {i} never took the lease");
        }
    }
    assert!(token <= 2, "at most the leader's own retake: token {token}");
    let mut leaders = 0.0;
    for r in [&a, &b, &c] {
        leaders += r.metric("signpost_leader").await.unwrap();
    }
    assert_eq!(leaders, 1.0, "signpost_leader is 1 on the leader alone");
    let renewals = [&a, &b, &c][leader]
        .metric("signpost_lease_calls_total{call=\"UpdateItem\",result=\"ok\"}")
        .await;
    assert!(
        renewals >= Some(1.0),
        "the leader's take counted: {renewals:?}"
    );
}

/// The product under failover: continuous load through two routers while
/// the group scales 2 -> 6 -> 2; the leader is SIGKILLed as the scale-in
/// starts to wait. The follower must take over within the lease plus 2 s,
/// the routers must follow it, and the scale-in must complete (600 s
/// heartbeat timeouts: only signpost can complete within the test's waits)
/// without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_mid_scale_in_without_a_failed_request() {
    let _alone = HEAVY.lock().await;
    let group = "web-ha-kill";
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(PORT);
    cloud.create_group(group, &tags(), 2).await;
    backends.follow(&cloud.instances(group).await).await;
    hold_launches_and_terminations(&cloud, group).await;
    let mut replicas = [
        Some(replica(&emulator, "a", replica_toml("a", LIFECYCLE, None)).await),
        Some(replica(&emulator, "b", replica_toml("b", LIFECYCLE, None)).await),
    ];
    let (leader, token) = {
        let [Some(a), Some(b)] = &replicas[..] else {
            unreachable!()
        };
        one_leader(&[a, b], Duration::from_secs(10)).await
    };
    let follower = 1 - leader;
    let both = format!(
        "{},{}",
        replicas[0].as_ref().unwrap().url(""),
        replicas[1].as_ref().unwrap().url("")
    );
    let routers = [
        Router::start(&both, "r1", &cache_file("kill-r1"), &[]).await,
        Router::start(&both, "r2", &cache_file("kill-r2"), &[]).await,
    ];
    let lead = replicas[leader].as_ref().unwrap();
    for router in &routers {
        router.wait_ready().await;
        lead.wait_in_sync(router).await;
    }
    let _followed = FollowedGroup::start(&cloud, group, backends);
    let loads: Vec<Load> = routers
        .iter()
        .map(|r| Load::start(format!("http://127.0.0.1:{}/", r.port), 50))
        .collect();
    let started = Instant::now();

    cloud.set_desired(group, 6).await;
    let six = wait_in_service(&cloud, group, 6, Duration::from_secs(30)).await;
    lead.wait_endpoints("web", "healthy", &six).await;
    cloud.set_desired(group, 2).await;
    wait_for(
        "the scale-in to wait on the hook",
        Duration::from_secs(20),
        || async { in_state(&cloud, group, "Terminating:Wait").await.pop() },
    )
    .await;
    replicas[leader].take().unwrap().kill().await;
    let killed = Instant::now();
    let new = replicas[follower].as_ref().unwrap();
    wait_for(
        "the follower to take over",
        Duration::from_secs(30),
        || async { (leadership(new).await["role"] == "leader").then_some(()) },
    )
    .await;
    let takeover = killed.elapsed();
    eprintln!("{group}: takeover {takeover:?} after the kill");
    assert!(
        takeover <= LEASE + Duration::from_secs(2),
        "took over within the lease + 2 s: {takeover:?}"
    );
    let new_token = leadership(new).await["token"].as_u64().unwrap();
    assert!(
        new_token > token,
        "the fencing token grew: {token} -> {new_token}"
    );

    let two = wait_in_service(&cloud, group, 2, Duration::from_secs(40)).await;
    new.wait_endpoints("web", "healthy", &two).await;
    for router in &routers {
        new.wait_in_sync(router).await;
    }
    let mut sent = 0;
    let mut failures = Vec::new();
    for load in loads {
        let (n, failed) = load.finish().await;
        sent += n;
        failures.extend(failed);
    }
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{group}: {sent} requests at {rate:.0}/s, {} failed",
        failures.len()
    );
    assert!(rate >= 50.0, "at least 50 requests/s: {rate:.0}/s");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
    let (_, lifecycle) = new.get("/v1/lifecycle").await;
    assert_eq!(
        lifecycle["active"],
        serde_json::json!([]),
        "nothing left waiting"
    );
    assert_eq!(lifecycle["leadership"]["token"], new_token);
}

/// A leader paused (SIGSTOP) for longer than the lease while a launch it
/// handles runs out its launch timeout: when it wakes, its own timers say
/// ABANDON at once, but the lease is another's by then. The emulator's
/// record must show no CompleteLifecycleAction from it after the new
/// leader's term began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_completes_nothing_after_losing_the_lease() {
    let _alone = HEAVY.lock().await;
    let group = "web-ha-pause";
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(PORT);
    cloud.create_group(group, &tags(), 1).await;
    backends.follow(&cloud.instances(group).await).await;
    hold_launches_and_terminations(&cloud, group).await;
    // Launches never get healthy (no backend follows the group): each ends
    // by the launch timeout, which runs out while the leader sleeps.
    let lifecycle =
        "[lifecycle]\nrouter_grace = \"1s\"\nlaunch_timeout = \"4s\"\ndrain_timeout = \"5s\"\n";
    let a = replica(&emulator, "a", replica_toml("a", lifecycle, None)).await;
    let b = replica(&emulator, "b", replica_toml("b", lifecycle, None)).await;
    let (leader, _) = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let (old, new) = if leader == 0 { (&a, &b) } else { (&b, &a) };
    let old_key = format!("key-{}", if leader == 0 { "a" } else { "b" });
    old.wait_endpoints(
        "web",
        "healthy",
        &common::ids(&cloud.instances(group).await),
    )
    .await;
    wait_for(
        "the router grace to pass",
        Duration::from_secs(10),
        || async {
            let (_, body) = old.get("/v1/lifecycle").await;
            let since = humantime::parse_rfc3339(body["leadership"]["since"].as_str()?).ok()?;
            (since.elapsed().ok()? > Duration::from_secs(2)).then_some(())
        },
    )
    .await;

    cloud.set_desired(group, 2).await;
    wait_for(
        "the leader to take up the launch",
        Duration::from_secs(20),
        || async {
            let (_, body) = old.get("/v1/lifecycle").await;
            (body["active"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    signal(old.pid(), "-STOP");
    wait_for(
        "the follower to take over",
        Duration::from_secs(20),
        || async { (leadership(new).await["role"] == "leader").then_some(()) },
    )
    .await;
    let new_since = leading_since(new).await;
    // Paused well past the old leader's launch timeout (4 s) and its lease:
    // the fault itself, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(5)).await;
    signal(old.pid(), "-CONT");
    let woke = now();
    wait_for(
        "the old leader to say it follows",
        Duration::from_secs(10),
        || async { (leadership(old).await["role"] == "follower").then_some(()) },
    )
    .await;
    // The new leader completes the launch (ABANDON: never healthy).
    wait_for(
        "the new leader to complete an action",
        Duration::from_secs(20),
        || async {
            let calls = emulator.complete_calls();
            calls
                .iter()
                .any(|c| c.caller != old_key && c.time >= new_since)
                .then_some(())
        },
    )
    .await;
    let calls = emulator.complete_calls();
    let late: Vec<_> = calls
        .iter()
        .filter(|c| c.caller == old_key && c.time >= new_since)
        .collect();
    eprintln!("{group}: new leader since {new_since:.3}, old woke at {woke:.3}; calls: {calls:#?}");
    assert!(
        late.is_empty(),
        "the old leader completed after it lost the lease: {late:#?}"
    );
    // A follower waits on no action: the one it held when paused is dropped
    // as soon as it learns that it follows (the failure seen in CI: it was
    // shown as still waiting for health, and taken up again at every listing).
    wait_for(
        "the old leader to drop the actions it held",
        Duration::from_secs(5),
        || async {
            let (_, body) = old.get("/v1/lifecycle").await;
            body["active"].as_array()?.is_empty().then_some(())
        },
    )
    .await;
}

/// A leader at an address its certificate does not name, as a pod IP behind
/// a Kubernetes Service is: here replica b advertises 127.0.0.2 (forwarded
/// to it) while the harness's certificate names 127.0.0.1 only. A router
/// given replica a's URL follows a's redirect and verifies b under the name
/// it verified a as, so it subscribes to b; before, the leader's
/// certificate was checked against 127.0.0.2, the handshake failed, and the
/// router went back to a, which redirected it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_follows_a_redirect_to_a_leader_at_an_address_its_certificate_does_not_name() {
    if common::Pki::plaintext() {
        return; // nothing is verified on plain HTTP
    }
    let _alone = HEAVY.lock().await;
    let group = "web-ha-vouch";
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let cloud = Cloud::new(&emulator).await;
    cloud.create_group(group, &tags(), 1).await;
    let b_port = common::free_port();
    let forward = TcpProxy::start_on(
        [127, 0, 0, 2].into(),
        SocketAddr::from(([127, 0, 0, 1], b_port)),
    )
    .await;
    let advertised = format!("https://127.0.0.2:{}", forward.port);
    let toml_b = replica_toml("b", LIFECYCLE, None).replacen(
        "[ha]\n",
        &format!("[ha]\nadvertise = \"{advertised}\"\n"),
        1,
    );
    let b = Controller::start_at_with_env(
        &emulator,
        b_port,
        &toml_b,
        HEALTH.0,
        HEALTH.1,
        &[("AWS_ACCESS_KEY_ID", "key-b")],
        None,
    )
    .await;
    one_leader(&[&b], Duration::from_secs(10)).await;
    let a = replica(&emulator, "a", replica_toml("a", LIFECYCLE, None)).await;
    let (leader, _) = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    assert_eq!(leader, 1, "b, started first, leads");
    assert_eq!(
        leadership(&a).await["leader"]["address"],
        advertised.as_str()
    );

    let router = Router::start(&a.url(""), "r1", &cache_file("vouch-r1"), &[]).await;
    b.wait_in_sync(&router).await;
    let record = b.router_record("r1").await.expect("r1 subscribed to b");
    assert_eq!(record["connected"], true, "{record}");
    drop(forward);
}

/// DynamoDB out of reach (its endpoint only; Auto Scaling and EC2 answer):
/// the leader steps down within its renew deadline, nobody completes the
/// launch that becomes ready meanwhile, routers keep routing on what they
/// have; when DynamoDB returns, a leader is elected and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dynamodb_nobody_leads_routers_keep_routing_and_leadership_returns() {
    let _alone = HEAVY.lock().await;
    let group = "web-ha-ddb";
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let mut dynamodb = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], emulator.port))).await;
    let cloud = Cloud::new(&emulator).await;
    cloud.create_group(group, &tags(), 1).await;
    hold_launches_and_terminations(&cloud, group).await;
    let toml = |id| replica_toml(id, LIFECYCLE, Some(&dynamodb.url()));
    let a = replica(&emulator, "a", toml("a")).await;
    let b = replica(&emulator, "b", toml("b")).await;
    let (leader, token) = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    let lead = [&a, &b][leader];
    let both = format!("{},{}", a.url(""), b.url(""));
    let router = Router::start(&both, "r1", &cache_file("ddb-r1"), &[]).await;
    let _followed = FollowedGroup::start(&cloud, group, Backends::new(PORT));
    let one = wait_in_service(&cloud, group, 1, Duration::from_secs(30)).await;
    lead.wait_endpoints("web", "healthy", &one).await;
    router.wait_ready().await;
    lead.wait_in_sync(&router).await;
    let load = Load::start(format!("http://127.0.0.1:{}/", router.port), 50);

    dynamodb.cut();
    let cut = Instant::now();
    let cut_wall = now();
    wait_for("no replica to lead", Duration::from_secs(10), || async {
        let roles = [leadership(&a).await, leadership(&b).await];
        roles.iter().all(|r| r["role"] == "follower").then_some(())
    })
    .await;
    let stepped_down = cut.elapsed();
    eprintln!("{group}: stepped down {stepped_down:?} after DynamoDB went away");
    // The renew deadline is 2 s; what safety needs is that the leader stops
    // before its lease runs out, when another replica could take it.
    assert!(
        stepped_down < LEASE,
        "stepped down before the lease ran out: {stepped_down:?}"
    );
    // A launch becomes ready to complete while nobody leads.
    cloud.set_desired(group, 2).await;
    wait_for(
        "the new instance to be healthy",
        Duration::from_secs(20),
        || async {
            let pending = in_state(&cloud, group, "Pending:Wait").await;
            let [id] = &pending[..] else { return None };
            let healthy = a.endpoints("web", "healthy").await;
            healthy.contains(id).then_some(())
        },
    )
    .await;
    // DynamoDB stays away a while longer: the fault itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        in_state(&cloud, group, "Pending:Wait").await.len(),
        1,
        "nobody completed the launch without a lease"
    );
    dynamodb.restore().await;
    let back = now();
    let calls = emulator.complete_calls();
    let unleaded: Vec<_> = calls
        .iter()
        .filter(|c| c.time >= cut_wall + (LEASE * 2 / 3).as_secs_f64() && c.time < back)
        .collect();
    assert!(
        unleaded.is_empty(),
        "completed without a lease: {unleaded:#?}"
    );

    let (_, new_token) = one_leader(&[&a, &b], Duration::from_secs(10)).await;
    assert!(new_token > token, "a new term: {token} -> {new_token}");
    wait_in_service(&cloud, group, 2, Duration::from_secs(30)).await;
    let (sent, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

// DynamoDB misbehaving under the lease: each replica's DynamoDB endpoint
// is a fault proxy of its own (`common::faults`), so that a fault can hit
// every replica (DynamoDB failing) or the leader alone (cut off from it).

/// The lease's DynamoDB calls (`lease.rs`): a consistent GetItem to look,
/// a conditional UpdateItem to take or renew.
const LEASE_CALLS: [&str; 2] = ["GetItem", "UpdateItem"];
/// `lease::Timing` for `LEASE`: a leader acts until two renew periods
/// after it sent its last successful renewal, a third of the lease before
/// anyone may take the lease.
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
/// How much later than the moment itself the harness may see a replica
/// step down: `/readyz` is polled every 50 ms on a loaded 2-core machine.
const SEEN_LATE: Duration = Duration::from_millis(500);
/// The longest wait between a router's reconnects: 5 s, plus a jitter of
/// up to as much again (`router::client`, backon's `with_jitter`).
const ROUTER_BACKOFF: Duration = Duration::from_secs(10);
/// The SDK's standard retries, so that a retry storm would show at the
/// proxies; the lease's own client cuts an attempt to half a renew period
/// and a call to one (`run::lease_client`).
const MAX_ATTEMPTS: usize = 3;
const AWS_RETRYING: &str = "max_attempts = 3\nattempt_timeout = \"2s\"\noperation_timeout = \"4s\"";
/// Launches only (the tests scale out), so a short router grace is enough.
const LEASE_FAULTS_LIFECYCLE: &str =
    "[lifecycle]\nrouter_grace = \"2s\"\nlaunch_timeout = \"60s\"\ndrain_timeout = \"20s\"\n";

/// The kind `/readyz` gives a lease call failing with `fault` when the
/// failure, not the lease's deadline, ends the call.
fn lease_fault_kind(fault: Fault) -> &'static str {
    match fault {
        Fault::Error { .. } | Fault::Throttle { .. } => "throttled",
        Fault::Status(_) => "unavailable",
        Fault::Reset => "connection",
        Fault::Stall(_) => "timeout",
        _ => "malformed",
    }
}

/// Each fault held on the lease's calls until the test clears it.
fn lease_faults() -> Vec<Fault> {
    vec![
        // DynamoDB's own throttling of a table, then the JSON APIs' generic one.
        Fault::Error {
            status: 400,
            code: "ProvisionedThroughputExceededException",
        },
        Fault::Throttle { retry_after: None },
        Fault::Status(500),
        Fault::Reset,
        // Past the lease client's attempt (0.5 s) and call (1 s) timeouts,
        // and past the lease itself.
        Fault::Stall(Duration::from_secs(5)),
        Fault::Malformed,
    ]
}

/// Every replica's leadership as its `/readyz` shows it, polled every
/// 50 ms for the whole test: who led when, seen from outside.
struct Watched {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One answer of one replica, and when it came (monotonic; wall, in Unix
/// seconds).
#[derive(Clone, Debug)]
struct Seen {
    replica: usize,
    at: Instant,
    wall: f64,
    leadership: serde_json::Value,
}

/// One term of one replica as seen from outside: from when the replica
/// says it sent the UpdateItem that won the lease (no later than its term
/// began) to the first answer that shows it not leading (no earlier than
/// its term ended).
#[derive(Clone, Debug)]
struct SeenTerm {
    replica: usize,
    token: u64,
    since: f64,
    ended: Option<(Instant, f64)>,
}

impl SeenTerm {
    fn end_wall(&self) -> f64 {
        self.ended.map_or(f64::INFINITY, |(_, wall)| wall)
    }

    fn holds(&self, wall: f64) -> bool {
        self.since <= wall && wall <= self.end_wall()
    }
}

impl Watched {
    fn start(replicas: Vec<Arc<Controller>>) -> Watched {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                loop {
                    for (replica, c) in replicas.iter().enumerate() {
                        let leadership = leadership(c).await;
                        if leadership.is_null() {
                            continue;
                        }
                        let (at, wall) = (Instant::now(), now());
                        seen.lock().unwrap().push(Seen {
                            replica,
                            at,
                            wall,
                            leadership,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Watched { seen, task }
    }

    fn terms(&self) -> Vec<SeenTerm> {
        let seen = self.seen.lock().unwrap().clone();
        let mut terms: Vec<SeenTerm> = Vec::new();
        let mut open: HashMap<usize, usize> = HashMap::new();
        for s in &seen {
            let token = s.leadership["token"].as_u64();
            let leading = s.leadership["role"] == "leader";
            if let Some(&k) = open.get(&s.replica) {
                if leading && Some(terms[k].token) == token {
                    continue;
                }
                terms[k].ended = Some((s.at, s.wall));
                open.remove(&s.replica);
            }
            if leading {
                let since = s.leadership["since"].as_str().expect("a leader's since");
                let since = humantime::parse_rfc3339(since)
                    .unwrap()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64();
                open.insert(s.replica, terms.len());
                terms.push(SeenTerm {
                    replica: s.replica,
                    token: token.expect("a leader's token"),
                    since,
                    ended: None,
                });
            }
        }
        terms
    }

    /// Term `token` of `replica` once it has been seen to end (the leader
    /// stepping down); panics if another replica is seen leading before
    /// that: two leaders at once.
    async fn ended(&self, replica: usize, token: u64) -> SeenTerm {
        wait_for(
            &format!("the leader to step down (term {token} of replica {replica} seen ending)"),
            Duration::from_secs(5),
            || async {
                let terms = self.terms();
                let old = terms
                    .iter()
                    .find(|t| t.replica == replica && t.token == token)?;
                let other = terms
                    .iter()
                    .find(|t| t.replica != replica && t.token > token && t.since < old.end_wall());
                assert!(
                    other.is_none(),
                    "two replicas led at once: {old:?} and {other:?}"
                );
                old.ended.is_some().then(|| old.clone())
            },
        )
        .await
    }

    /// The first term of `replica` with a token above `after`, once seen.
    async fn began(&self, replica: usize, after: u64) -> SeenTerm {
        wait_for(
            &format!("a term of replica {replica} after token {after} to be seen"),
            Duration::from_secs(5),
            || async {
                self.terms()
                    .into_iter()
                    .find(|t| t.replica == replica && t.token > after)
            },
        )
        .await
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// No two replicas led at once, and the emulator's record of
/// CompleteLifecycleAction calls has each within a term of the replica
/// that sent it (by its access key, `keys[replica]`) and within no other
/// replica's term.
fn assert_one_leader_at_a_time(terms: &[SeenTerm], completions: &[CompleteCall], keys: &[&str]) {
    for a in terms {
        for b in terms.iter().filter(|b| b.replica > a.replica) {
            assert!(
                a.end_wall() <= b.since || b.end_wall() <= a.since,
                "two replicas led at once: {a:?} and {b:?}"
            );
        }
    }
    for c in completions {
        let replica = keys
            .iter()
            .position(|k| *k == c.caller)
            .unwrap_or_else(|| panic!("a completion by an unknown caller: {c:?}"));
        // The emulator records the call a little after the replica checked
        // its deadline and sent it.
        let own = terms
            .iter()
            .any(|t| t.replica == replica && t.since <= c.time && c.time <= t.end_wall() + 0.2);
        assert!(own, "completed outside its own terms: {c:?}; {terms:#?}");
        let other = terms
            .iter()
            .find(|t| t.replica != replica && t.holds(c.time));
        assert!(
            other.is_none(),
            "completed while another replica led: {c:?}, {other:?}"
        );
    }
}

/// The lease calls of replica `c` that failed, by call, from
/// `signpost_lease_calls_total{result="error"}`.
async fn lease_errors(c: &Controller) -> [f64; 2] {
    let mut errors = [0.0; 2];
    for (i, call) in LEASE_CALLS.iter().enumerate() {
        let sample = format!(r#"signpost_lease_calls_total{{call="{call}",result="error"}}"#);
        errors[i] = c.metric(&sample).await.unwrap_or(0.0);
    }
    errors
}

/// Calls at `proxy` since `since`, and the most in any one second.
fn calls_since(proxy: &FaultProxy, since: Instant) -> (usize, usize) {
    let calls = proxy.all_calls();
    let since = tokio::time::Instant::from_std(since);
    let during = calls.iter().filter(|t| **t >= since).count();
    (during, most_within(&calls, since, Duration::from_secs(1)))
}

/// When the last UpdateItem that `proxy` forwarded untouched before
/// `before` arrived: the leader's last renewal that DynamoDB got.
fn last_renewal(proxy: &FaultProxy, before: Instant) -> Instant {
    proxy
        .forwarded("UpdateItem")
        .into_iter()
        .map(tokio::time::Instant::into_std)
        .filter(|t| *t <= before)
        .max()
        .expect("a renewal before the fault")
}

fn inject_lease_fault(proxy: &FaultProxy, fault: Fault) {
    for call in LEASE_CALLS {
        proxy.inject(call, fault, Times::Always);
    }
}

fn clear_lease_fault(proxy: &FaultProxy) {
    for call in LEASE_CALLS {
        proxy.clear(call);
    }
}

/// Two replicas whose lease calls go through a fault proxy each (their
/// other AWS calls go straight to the emulator), a group with hooks whose
/// instances run real backends, a router given both replicas, and checked
/// load through it.
struct LeaseRig {
    load: Load,
    router: Router,
    watched: Watched,
    replicas: [Arc<Controller>; 2],
    proxies: [FaultProxy; 2],
    _followed: FollowedGroup,
    cloud: Cloud,
    emulator: Emulator,
    group: &'static str,
}

const KEYS: [&str; 2] = ["key-a", "key-b"];

/// A leader's term ended by a fault, as `LeaseRig::stepped_down_in_time`
/// saw it.
struct SteppedDown {
    old: SeenTerm,
    /// The lease's expiry (Unix seconds) as DynamoDB holds it.
    expires: f64,
    /// From its last renewal to the end of its term.
    after_renewal: Duration,
    /// Seconds from the end of its term to the lease's expiry.
    margin: f64,
}

impl LeaseRig {
    async fn start(group: &'static str) -> LeaseRig {
        let emulator = Emulator::start().await;
        emulator.create_lease_table(TABLE).await;
        let cloud = Cloud::new(&emulator).await;
        cloud.create_group(group, &tags(), 1).await;
        hold_launches_and_terminations(&cloud, group).await;
        let proxies = [
            FaultProxy::start(&emulator.endpoint()).await,
            FaultProxy::start(&emulator.endpoint()).await,
        ];
        let behind = |id: &'static str, proxy: &FaultProxy| {
            let toml = replica_toml(id, LEASE_FAULTS_LIFECYCLE, Some(&proxy.url()));
            let emulator = &emulator;
            async move {
                let key = format!("key-{id}");
                let env = [("AWS_ACCESS_KEY_ID", key.as_str())];
                Controller::start_with_aws_and_health(emulator, &toml, AWS_RETRYING, HEALTH, &env)
                    .await
            }
        };
        let (a, b) = tokio::join!(behind("a", &proxies[0]), behind("b", &proxies[1]));
        let replicas = [Arc::new(a), Arc::new(b)];
        let (leader, _) =
            one_leader(&[&*replicas[0], &*replicas[1]], Duration::from_secs(10)).await;
        let followed = FollowedGroup::start(&cloud, group, Backends::new(PORT));
        let one = wait_in_service(&cloud, group, 1, Duration::from_secs(30)).await;
        replicas[leader]
            .wait_endpoints("web", "healthy", &one)
            .await;
        let both = format!("{},{}", replicas[0].url(""), replicas[1].url(""));
        let router = Router::start(&both, "r1", &cache_file(&format!("{group}-r1")), &[]).await;
        router.wait_ready().await;
        replicas[leader].wait_in_sync(&router).await;
        let watched = Watched::start(replicas.to_vec());
        let load = Load::start(format!("http://127.0.0.1:{}/", router.port), 50);
        LeaseRig {
            load,
            router,
            watched,
            replicas,
            proxies,
            _followed: followed,
            cloud,
            emulator,
            group,
        }
    }

    async fn one_leader(&self, limit: Duration) -> (usize, u64) {
        one_leader(&[&*self.replicas[0], &*self.replicas[1]], limit).await
    }

    /// Waits for the term `token` of `leader` to end after a fault injected
    /// at `injected`, and checks that it ended in time: with the lease
    /// still its own, within the renew deadline of its last renewal, and
    /// so well before that renewal's expiry.
    async fn stepped_down_in_time(
        &self,
        leader: usize,
        token: u64,
        injected: Instant,
        name: &str,
    ) -> SteppedDown {
        let old = self.watched.ended(leader, token).await;
        let (owner, _, expires) = lease_item(&self.emulator).await;
        assert_eq!(
            owner, IDS[leader],
            "{name}: the lease was still the old leader's when it stepped down"
        );
        let margin = expires - old.end_wall();
        let after_renewal = old.ended.unwrap().0 - last_renewal(&self.proxies[leader], injected);
        assert!(
            after_renewal <= RENEW_DEADLINE + SEEN_LATE,
            "{name}: the leader stepped down {after_renewal:?} after its last renewal"
        );
        assert!(
            margin >= (LEASE - RENEW_DEADLINE - SEEN_LATE).as_secs_f64(),
            "{name}: the leader stepped down only {margin:.3} s before its lease expired"
        );
        SteppedDown {
            old,
            expires,
            after_renewal,
            margin,
        }
    }

    /// The checks that hold over the whole test: one leader at a time, no
    /// completion outside its sender's term, no failed request.
    async fn finish(self, name: &str) {
        let terms = self.watched.terms();
        let completions = self.emulator.complete_calls();
        assert_one_leader_at_a_time(&terms, &completions, &KEYS);
        let (sent, failures) = self.load.finish().await;
        eprintln!(
            "{name}: {} terms, {} completions, each in its sender's term; {sent} requests through the router, {} failed",
            terms.len(),
            completions.len(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} of {sent} failed: {failures:#?}",
            failures.len()
        );
    }
}

/// The lease item as DynamoDB holds it, read straight from the emulator
/// (not through a proxy): owner, token, and `expires` in Unix seconds.
async fn lease_item(emulator: &Emulator) -> (String, u64, f64) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let shared = common::sdk_config(&emulator.endpoint()).await;
    let item = aws_sdk_dynamodb::Client::new(&shared)
        .get_item()
        .table_name(TABLE)
        .key("name", AttributeValue::S("signpost-controller".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("read the lease item")
        .item
        .expect("a lease item");
    let s = |k: &str| item[k].as_s().unwrap().clone();
    let n = |k: &str| item[k].as_n().unwrap().parse::<u64>().unwrap();
    (s("owner"), n("token"), n("expires") as f64 / 1000.0)
}

const IDS: [&str; 2] = ["a", "b"];

/// DynamoDB failing for every replica, one fault after another on the
/// lease's calls (throttled, as DynamoDB and as the JSON APIs say it; 500;
/// connection reset; stalled past the attempt timeout; a body that is not
/// JSON): the leader steps down within its renew deadline of its last
/// renewal, at least a third of the lease (less the harness's lateness)
/// before the expiry DynamoDB holds; then nobody leads, and a launch that
/// becomes ready meanwhile waits; each replica's lease calls stay within
/// two calls' attempts a second; once the fault clears a leader is elected
/// within the lease plus 2 s, the router follows it and the launch
/// completes. Over the whole test no two replicas lead at once and every
/// completion falls within its sender's term; no request through the
/// router fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_faults_make_the_leader_step_down_in_time_and_leadership_returns() {
    let _alone = HEAVY.lock().await;
    let rig = LeaseRig::start("web-ha-ddb-faults").await;
    let mut desired = 1;
    for fault in lease_faults() {
        let (leader, token) = rig.one_leader(Duration::from_secs(10)).await;
        let errors_before = [
            lease_errors(&rig.replicas[0]).await,
            lease_errors(&rig.replicas[1]).await,
        ];
        let injected = Instant::now();
        for proxy in &rig.proxies {
            inject_lease_fault(proxy, fault);
        }
        let name = fault.name();
        // Nobody can take the lease meanwhile.
        let down = rig
            .stepped_down_in_time(leader, token, injected, &name)
            .await;
        let (stepped_down, margin) = (down.after_renewal, down.margin);
        wait_for(
            &format!("no replica to lead ({name})"),
            Duration::from_secs(10),
            || async {
                let roles = [
                    leadership(&rig.replicas[0]).await,
                    leadership(&rig.replicas[1]).await,
                ];
                roles.iter().all(|r| r["role"] == "follower").then_some(())
            },
        )
        .await;
        // `/readyz` names the failing lease call and its kind: the fault's
        // own, or `timeout` when the SDK's retries outlast the lease's
        // deadline and the call is cut.
        let failing = leadership(&rig.replicas[leader]).await["lease_failing"].clone();
        let kind = failing["kind"].as_str().unwrap_or_default();
        assert!(
            [lease_fault_kind(fault), "timeout"].contains(&kind),
            "{name}: /readyz names the failing lease call: {failing}"
        );
        eprintln!("{name}: /readyz lease_failing {}", failing["kind"]);

        // A launch becomes ready while nobody leads.
        desired += 1;
        rig.cloud.set_desired(rig.group, desired).await;
        let pending = wait_for(
            "the new instance to be healthy",
            Duration::from_secs(20),
            || async {
                let pending = in_state(&rig.cloud, rig.group, "Pending:Wait").await;
                let [id] = &pending[..] else { return None };
                let healthy = rig.replicas[0].endpoints("web", "healthy").await;
                healthy.contains(id).then(|| pending.clone())
            },
        )
        .await;
        // The fault held a while longer: whoever completed the launch now
        // would act without a lease.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            in_state(&rig.cloud, rig.group, "Pending:Wait").await,
            pending,
            "{name}: nobody completed the launch without a lease"
        );
        let held = injected.elapsed();
        let calls = [
            calls_since(&rig.proxies[0], injected),
            calls_since(&rig.proxies[1], injected),
        ];
        for (i, (_, peak)) in calls.iter().enumerate() {
            assert!(
                *peak <= 2 * MAX_ATTEMPTS,
                "{name}: replica {i} made {peak} lease calls in one second"
            );
        }
        // Measured, not asserted: one failed call in the store may be
        // several SDK attempts, and a call cut at the lease's deadline
        // counts once (`failed_lease_calls_are_counted_in_the_metrics`).
        let errors = [
            lease_errors(&rig.replicas[0]).await,
            lease_errors(&rig.replicas[1]).await,
        ];
        let faulted: usize = rig.proxies.iter().map(|p| calls_since(p, injected).0).sum();

        for proxy in &rig.proxies {
            clear_lease_fault(proxy);
        }
        let cleared = Instant::now();
        let (new_leader, new_token) = rig.one_leader(LEASE + Duration::from_secs(2)).await;
        let elected = cleared.elapsed();
        assert!(new_token > token, "a new term: {token} -> {new_token}");
        rig.replicas[new_leader].wait_in_sync(&rig.router).await;
        let serving = cleared.elapsed();
        // The router retries with its back-off while nobody leads; then it
        // follows a redirect or the next URL.
        assert!(
            serving <= LEASE + Duration::from_secs(2) + ROUTER_BACKOFF + Duration::from_secs(1),
            "{name}: the router acked the new leader {serving:?} after the clear"
        );
        wait_in_service(
            &rig.cloud,
            rig.group,
            desired as usize,
            Duration::from_secs(20),
        )
        .await;
        let completed = cleared.elapsed();
        let counted = |i: usize| {
            let [get, update] = [0, 1].map(|c| errors[i][c] - errors_before[i][c]);
            format!("GetItem {get}, UpdateItem {update}")
        };
        eprintln!(
            "lease fault, every replica | {name} | held {:.1} s | leader stepped down {:.2} s after its last renewal, {margin:.2} s before its lease expired | lease calls (busiest second): leader {} ({}), follower {} ({}) | counted as errors of the {faulted} faulted: leader {}; follower {} | elected {:.1} s, router on it {:.1} s, launch completed {:.1} s after the clear",
            held.as_secs_f64(),
            stepped_down.as_secs_f64(),
            calls[leader].0,
            calls[leader].1,
            calls[1 - leader].0,
            calls[1 - leader].1,
            counted(leader),
            counted(1 - leader),
            elected.as_secs_f64(),
            serving.as_secs_f64(),
            completed.as_secs_f64(),
        );
    }
    rig.finish("lease faults, every replica").await;
}

/// DynamoDB out of reach of the leader alone (its lease calls faulted, the
/// follower's answered), one fault after another, the replicas trading
/// places: the leader steps down within its renew deadline of its last
/// renewal while the lease is still its own; the follower takes the lease
/// only once the expiry DynamoDB holds has passed; a launch made as the
/// fault begins is completed by one of them within its own term; the old
/// leader's lease calls stay within two calls' attempts a second; once its
/// DynamoDB answers again it follows the new leader. Over the whole test
/// no two replicas lead at once, and no request through the router fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_dynamodb_steps_down_before_the_follower_takes_over() {
    let _alone = HEAVY.lock().await;
    let rig = LeaseRig::start("web-ha-ddb-split").await;
    let mut desired = 1;
    for fault in lease_faults() {
        let (leader, token) = rig.one_leader(Duration::from_secs(10)).await;
        let follower = 1 - leader;
        let name = fault.name();
        let errors_before = lease_errors(&rig.replicas[leader]).await;
        let injected = Instant::now();
        inject_lease_fault(&rig.proxies[leader], fault);
        desired += 1;
        rig.cloud.set_desired(rig.group, desired).await;
        let SteppedDown {
            old,
            expires,
            after_renewal: stepped_down,
            margin,
        } = rig
            .stepped_down_in_time(leader, token, injected, &name)
            .await;
        let new = rig.watched.began(follower, token).await;
        let took_over = injected.elapsed();
        // `since` is when the follower sent its winning UpdateItem, whose
        // condition compared the expiry with that same moment.
        assert!(
            new.since >= expires - 0.001,
            "{name}: the follower took the lease {:.3} s before it expired",
            expires - new.since
        );
        assert!(old.end_wall() <= new.since, "{name}: {old:?}, {new:?}");

        wait_in_service(
            &rig.cloud,
            rig.group,
            desired as usize,
            Duration::from_secs(20),
        )
        .await;
        let completed = injected.elapsed();
        // Who completed the launch, and when against the handover: the old
        // leader before it stepped down, or the new one after its takeover.
        let completion = rig.emulator.complete_calls().pop().expect("a completion");
        let by = if completion.caller == KEYS[leader] {
            format!(
                "the old leader, {:.2} s before it stepped down",
                old.end_wall() - completion.time
            )
        } else {
            format!(
                "the new leader, {:.2} s after its term began",
                completion.time - new.since
            )
        };
        let (calls, peak) = calls_since(&rig.proxies[leader], injected);
        let held = injected.elapsed();
        let errors = lease_errors(&rig.replicas[leader]).await;
        assert!(
            peak <= 2 * MAX_ATTEMPTS,
            "{name}: the old leader made {peak} lease calls in one second"
        );

        clear_lease_fault(&rig.proxies[leader]);
        let cleared = Instant::now();
        let (leading, _) = rig.one_leader(LEASE + Duration::from_secs(2)).await;
        assert_eq!(leading, follower, "the new leader keeps the lease");
        let rejoined = cleared.elapsed();
        rig.replicas[follower].wait_in_sync(&rig.router).await;
        eprintln!(
            "lease fault, leader only | {name} | held {:.1} s | stepped down {:.2} s after its last renewal, {margin:.2} s before its lease expired; follower leads from {:.2} s after that expiry ({:.1} s after the fault) | old leader's lease calls {calls} ({peak} in the busiest second), counted as errors: UpdateItem {} | launch completed by {by}, in service {:.1} s after the fault | old leader follows {:.1} s after the clear",
            held.as_secs_f64(),
            stepped_down.as_secs_f64(),
            new.since - expires,
            took_over.as_secs_f64(),
            errors[1] - errors_before[1],
            completed.as_secs_f64(),
            rejoined.as_secs_f64(),
        );
    }
    rig.finish("lease faults, leader only").await;
}

/// A lease call that the lease task cuts at its own deadline
/// (`tokio::time::timeout_at` in `lease::run`: a leader's renewal at its
/// renew deadline, a follower's call after a renew period) is counted in
/// `signpost_lease_calls_total{result="error"}`. It was not (issue 16):
/// `ask` was dropped before it counted, and with the SDK's retries on, that
/// is how a stalled, throttled, 500-answering or resetting DynamoDB usually
/// ends a call (7 lease calls answered 500 over 3.4 s, 0 counted). Here the
/// leader's one failed renewal (stalled) must be counted by the time it
/// steps down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lease_calls_are_counted_in_the_metrics() {
    let _alone = HEAVY.lock().await;
    let rig = LeaseRig::start("web-ha-ddb-counted").await;
    let (leader, token) = rig.one_leader(Duration::from_secs(10)).await;
    let before = lease_errors(&rig.replicas[leader]).await;
    let injected = Instant::now();
    inject_lease_fault(&rig.proxies[leader], Fault::Stall(Duration::from_secs(5)));
    let old = rig.watched.ended(leader, token).await;
    let stepped_down = old.ended.unwrap().0;
    // The step-down and its count come from one answer (or its absence):
    // half a second covers the harness seeing one but not the other.
    let counted = wait_for(
        "the failed renewal to be counted",
        Duration::from_millis(500),
        || async {
            let after = lease_errors(&rig.replicas[leader]).await;
            (after[1] > before[1]).then_some(after[1] - before[1])
        },
    )
    .await;
    let (faulted, _) = calls_since(&rig.proxies[leader], injected);
    eprintln!(
        "{faulted} lease calls stalled; stepped down {:.1} s after the fault; {counted} counted",
        (stepped_down - injected).as_secs_f64()
    );
    clear_lease_fault(&rig.proxies[leader]);
    rig.finish("lease calls counted").await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    eprintln!(
        "{name}: p50 {:?}, p99 {:?}, min {:?}, max {:?} ({} takeovers)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[0],
        samples[samples.len() - 1],
        samples.len()
    );
}

/// The README's takeover benchmark. Each round: the group scales by one (a
/// launch or a terminate waits on its hook), the leader is SIGKILLed at
/// once, and the time is taken from the kill to the follower leading, to
/// the router acking the new leader's revision, and to the new leader's
/// first CompleteLifecycleAction (the emulator's record); then the killed
/// replica starts again on its port as the next follower. Then the lease's
/// DynamoDB calls in one minute of steady state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --test ha -- --ignored --nocapture takeover"]
async fn takeover_times_over_20_kills() {
    let _alone = HEAVY.lock().await;
    let group = "web-ha-bench";
    let emulator = Emulator::start().await;
    emulator.create_lease_table(TABLE).await;
    let cloud = Cloud::new(&emulator).await;
    cloud.create_group(group, &tags(), 1).await;
    hold_launches_and_terminations(&cloud, group).await;
    let _followed = FollowedGroup::start(&cloud, group, Backends::new(PORT));
    let ports = [common::free_port(), common::free_port()];
    let start = |slot: usize, n: usize| {
        let id = format!("{}{n}", ["a", "b"][slot]);
        let emulator = &emulator;
        async move {
            let toml = replica_toml(&id, LIFECYCLE, None);
            let key = format!("key-{id}");
            let c = Controller::start_at_with_env(
                emulator,
                ports[slot],
                &toml,
                HEALTH.0,
                HEALTH.1,
                &[("AWS_ACCESS_KEY_ID", &key)],
                None,
            )
            .await;
            (c, key)
        }
    };
    let mut replicas = [Some(start(0, 0).await), Some(start(1, 0).await)];
    let urls = format!(
        "{},{}",
        replicas[0].as_ref().unwrap().0.url(""),
        replicas[1].as_ref().unwrap().0.url("")
    );
    let router = Router::start(&urls, "r1", &cache_file("bench-r1"), &[]).await;
    let (mut leading, mut serving, mut completing) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..20 {
        let views: Vec<&Controller> = replicas.iter().map(|r| &r.as_ref().unwrap().0).collect();
        let (leader, _) = one_leader(&views, Duration::from_secs(30)).await;
        let follower = 1 - leader;
        views[leader].wait_in_sync(&router).await;
        let desired = if round % 2 == 0 { 2 } else { 1 };
        cloud.set_desired(group, desired).await;
        let (old, _) = replicas[leader].take().unwrap();
        old.kill().await;
        let killed = Instant::now();
        let killed_wall = now();
        let (new, new_key) = replicas[follower].as_ref().unwrap();
        wait_for("the follower to lead", Duration::from_secs(30), || async {
            (leadership(new).await["role"] == "leader").then_some(())
        })
        .await;
        leading.push(killed.elapsed());
        new.wait_in_sync(&router).await;
        serving.push(killed.elapsed());
        wait_for(
            "the new leader's first completion",
            Duration::from_secs(60),
            || async {
                emulator
                    .complete_calls()
                    .iter()
                    .any(|c| c.caller == *new_key && c.found && c.time > killed_wall)
                    .then_some(())
            },
        )
        .await;
        completing.push(killed.elapsed());
        wait_in_service(&cloud, group, desired as usize, Duration::from_secs(60)).await;
        replicas[leader] = Some(start(leader, round + 1).await);
        eprintln!(
            "round {round}: leading {:?}, serving {:?}, completed {:?}",
            leading[round], serving[round], completing[round]
        );
    }
    summary("kill -> new leader", leading);
    summary("kill -> router acked the new leader", serving);
    summary("kill -> first completion", completing);

    // Steady state: one minute of the lease's DynamoDB calls on each replica.
    async fn calls(c: &Controller) -> f64 {
        let (_, body) = c.fetch("/metrics").await.unwrap();
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("signpost_lease_calls_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    }
    let before = [
        calls(&replicas[0].as_ref().unwrap().0).await,
        calls(&replicas[1].as_ref().unwrap().0).await,
    ];
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(60)).await;
    for (slot, was) in before.iter().enumerate() {
        let c = &replicas[slot].as_ref().unwrap().0;
        let role = leadership(c).await["role"].clone();
        eprintln!(
            "steady state, {role}: {} DynamoDB calls in 60 s (lease {:?})",
            calls(c).await - was,
            LEASE
        );
    }
}
