//! Lifecycle hooks end to end: the emulator with hooks (localstack/
//! lifecycle_hooks.py), the real controller and routers, and backends that
//! live exactly as long as their instances (`FollowedGroup`): a backend
//! stops the moment its instance leaves the group, so a request routed to a
//! terminated instance fails, as it would on AWS.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{
    completed, hold_launches_and_terminations, in_state, ip_of, wait_for, wait_in_service, Cloud,
    Controller, FollowedGroup, Load, Router, Scene,
};

const PORT: u16 = common::BACKEND_PORT;

/// Short waits so the tests run in seconds; the router grace covers the
/// routers' reconnect after a controller restart.
const LIFECYCLE: &str =
    "[lifecycle]\nrouter_grace = \"3s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"20s\"\n";

/// Health checks a loaded 2-core CI machine passes reliably (the backends
/// share the test process with the load generator).
const HEALTH: (&str, &str) = ("500ms", "400ms");

/// The two zero-failure tests each run an emulator, a controller, a router
/// and 100 requests/s: one at a time, so that neither starves the other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tags(service: &str) -> Vec<(&str, &str)> {
    vec![
        ("signpost:service", service),
        ("signpost:port", "18080"),
        ("signpost:route", "/"),
    ]
}

fn cache_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("signpost-lifecycle-test-{}", std::process::id()));
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

/// Waits until an instance of the group is in `state`; returns one such.
async fn wait_one_in(cloud: &Cloud, group: &str, state: &str) -> String {
    wait_for(
        &format!("an instance of {group} in {state}"),
        Duration::from_secs(20),
        || async { in_state(cloud, group, state).await.pop() },
    )
    .await
}

async fn wait_completed(controller: &Controller, instance: &str) -> serde_json::Value {
    wait_for(
        &format!("the lifecycle action of {instance} to complete"),
        Duration::from_secs(30),
        || completed(controller, instance),
    )
    .await
}

/// Waits until `/metrics` has `sample` at `at_least`.
async fn wait_metric(controller: &Controller, sample: &str, at_least: f64) {
    wait_for(
        &format!("{sample} >= {at_least}"),
        Duration::from_secs(30),
        || async { (controller.metric(sample).await? >= at_least).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_continues_only_once_healthy_and_acked_by_every_router() {
    let scene =
        Scene::start_with_health(PORT, "web-launch", &tags("web"), 1, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    // A 3s heartbeat timeout whose default is ABANDON: without heartbeats
    // the emulator would terminate the instance while it waits.
    cloud
        .put_hook("web-launch", "signpost-launch", "launching", 3, "ABANDON")
        .await;
    let a = Router::start(&controller.url(""), "a", &cache_file("launch-a"), &[]).await;
    let b = Router::start(&controller.url(""), "b", &cache_file("launch-b"), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut backends = backends;
    backends.new_failing = true;
    let followed = FollowedGroup::start(&cloud, "web-launch", backends);

    cloud.set_desired("web-launch", 2).await;
    let new = wait_one_in(&cloud, "web-launch", "Pending:Wait").await;
    // Unhealthy for longer than the heartbeat timeout: heartbeats hold it.
    wait_metric(
        &controller,
        "signpost_lifecycle_heartbeats_total{result=\"ok\"}",
        4.0,
    )
    .await;
    assert_eq!(
        in_state(&cloud, "web-launch", "Pending:Wait").await,
        vec![new.clone()]
    );
    controller
        .wait_endpoints("web", "unhealthy", std::slice::from_ref(&new))
        .await;

    // Healthy, but router b is frozen and cannot ack: still waiting.
    signal(b.pid(), "-STOP");
    let ip = ip_of(&cloud.instances("web-launch").await, &new);
    followed.backends.lock().await.set_health(ip, true);
    wait_for(
        "the new endpoint to be healthy",
        Duration::from_secs(10),
        || async {
            let healthy = controller.endpoints("web", "healthy").await;
            healthy.contains(&new).then_some(())
        },
    )
    .await;
    controller.wait_in_sync(&a).await;
    let (_, lifecycle) = controller.get("/v1/lifecycle").await;
    assert_eq!(
        lifecycle["active"][0]["stage"], "waiting_for_routers",
        "{lifecycle}"
    );
    assert_eq!(
        in_state(&cloud, "web-launch", "Pending:Wait").await,
        vec![new.clone()]
    );
    let (status, body) = a.get("/").await;
    assert_eq!(status, 200, "{body}");

    // Router b acks once it runs again, and only then does the hook complete.
    signal(b.pid(), "-CONT");
    let record = wait_completed(&controller, &new).await;
    assert_eq!(record["result"], "continue", "{record}");
    assert!(record["acked_ms"].as_u64() >= record["healthy_ms"].as_u64());
    wait_in_service(&cloud, "web-launch", 2, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_not_healthy_in_time_is_abandoned() {
    let toml = "[lifecycle]\nrouter_grace = \"0s\"\nlaunch_timeout = \"2s\"\n";
    let scene = Scene::start_with_health(PORT, "web-abandon", &tags("web"), 1, toml, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        mut backends,
        controller,
        ..
    } = scene;
    // DefaultResult CONTINUE: an ABANDON can only have come from signpost.
    cloud
        .put_hook(
            "web-abandon",
            "signpost-launch",
            "launching",
            300,
            "CONTINUE",
        )
        .await;
    backends.new_failing = true;
    let _followed = FollowedGroup::start(&cloud, "web-abandon", backends);
    cloud.set_desired("web-abandon", 2).await;
    let new = wait_one_in(&cloud, "web-abandon", "Pending:Wait").await;
    let record = wait_completed(&controller, &new).await;
    assert_eq!(record["result"], "abandon", "{record}");
    assert!(
        record["note"].as_str().unwrap().contains("launch_timeout"),
        "{record}"
    );
    assert!(record["healthy_ms"].is_null());
    wait_for(
        "the abandoned instance to terminate",
        Duration::from_secs(10),
        || async {
            let state = cloud.ec2_state(&new).await;
            matches!(state.as_str(), "shutting-down" | "terminated").then_some(())
        },
    )
    .await;
    assert!(
        controller
            .metric("signpost_lifecycle_timeouts_total{stage=\"launch\"}")
            .await
            >= Some(1.0)
    );
    assert!(
        controller
            .metric("signpost_lifecycle_actions_total{transition=\"launch\",result=\"abandon\"}")
            .await
            >= Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_drains_requests_in_flight_then_continues() {
    let scene =
        Scene::start_with_health(PORT, "web-drain", &tags("web"), 1, LIFECYCLE, HEALTH).await;
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
    let router = Router::start(&controller.url(""), "r1", &cache_file("drain"), &[]).await;
    router.wait_ready().await;
    controller.wait_in_sync(&router).await;
    let (id, ip) = instances[0].clone();
    let followed = FollowedGroup::start(&cloud, "web-drain", backends);

    // A request that stays in flight for 4s.
    let slow = tokio::spawn({
        let url = format!("http://127.0.0.1:{}/slow/4000", router.port);
        async move {
            let answer = common::http_get(&url).await;
            (answer, SystemTime::now())
        }
    });
    wait_for(
        "the router to report the request in flight",
        Duration::from_secs(10),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            let n = body["routers"][0]["in_flight"]["web"][&id].as_u64();
            (n == Some(1)).then_some(())
        },
    )
    .await;

    cloud.set_desired("web-drain", 0).await;
    controller
        .wait_endpoints("web", "draining", std::slice::from_ref(&id))
        .await;
    controller.wait_in_sync(&router).await;
    let hits_at_ack = followed.backends.lock().await.hits(ip);
    assert_eq!(
        in_state(&cloud, "web-drain", "Terminating:Wait").await,
        vec![id.clone()],
        "held while its request is in flight"
    );
    let (status, body) = router.get("/").await;
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
    let record = wait_completed(&controller, &id).await;
    assert_eq!(record["result"], "continue", "{record}");
    assert!(record["note"].is_null(), "no timeout: {record}");
    let since = humantime::parse_rfc3339(record["since"].as_str().unwrap()).unwrap();
    let completed_at = since + Duration::from_millis(record["completed_ms"].as_u64().unwrap());
    assert!(
        completed_at >= answered_at,
        "CONTINUE only after the request in flight was answered"
    );
    wait_in_service(&cloud, "web-drain", 0, Duration::from_secs(10)).await;
    assert_eq!(
        followed.backends.lock().await.hits(ip),
        hits_at_ack,
        "no request after the ack"
    );
}

/// Cycles the group 2 → 6 → 2 `cycles` times under load through a router
/// and returns (requests sent, failures). With `kill_during_scale_in`, the
/// controller is SIGKILLed as the first instance of every scale-in starts to
/// wait, and restarted on the same port.
async fn cycle_under_load(
    group: &str,
    cycles: usize,
    kill_during_scale_in: bool,
) -> (usize, Vec<String>) {
    let _alone = HEAVY.lock().await;
    let scene = Scene::start_with_health(PORT, group, &tags("web"), 2, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator,
        cloud,
        backends,
        mut controller,
        ..
    } = scene;
    hold_launches_and_terminations(&cloud, group).await;
    let router = Router::start(&controller.url(""), "r1", &cache_file(group), &[]).await;
    router.wait_ready().await;
    controller.wait_in_sync(&router).await;
    let _followed = FollowedGroup::start(&cloud, group, backends);
    let load = Load::start(format!("http://127.0.0.1:{}/", router.port), 100);
    let started = std::time::Instant::now();

    for cycle in 0..cycles {
        cloud.set_desired(group, 6).await;
        // Four launches, each healthy and acked first: 30 s was once too
        // short on a loaded CI machine (none of them had failed).
        let six = wait_in_service(&cloud, group, 6, Duration::from_secs(60)).await;
        controller.wait_endpoints("web", "healthy", &six).await;
        cloud.set_desired(group, 2).await;
        if kill_during_scale_in {
            wait_one_in(&cloud, group, "Terminating:Wait").await;
            let port = controller.port;
            controller.kill().await;
            controller = Controller::start_at(&emulator, port, LIFECYCLE, HEALTH.0, HEALTH.1).await;
        }
        // 600s heartbeat timeouts: within 30s, only signpost can have let them go.
        let two = wait_in_service(&cloud, group, 2, Duration::from_secs(30)).await;
        controller.wait_endpoints("web", "healthy", &two).await;
        eprintln!("{group}: cycle {} done", cycle + 1);
    }
    let (sent, failures) = load.finish().await;
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{group}: {sent} requests at {rate:.0}/s, {} failed",
        failures.len()
    );
    assert!(rate >= 50.0, "at least 50 requests/s: {rate:.0}/s");
    let (_, lifecycle) = controller.get("/v1/lifecycle").await;
    assert_eq!(
        lifecycle["active"],
        serde_json::json!([]),
        "nothing left waiting"
    );
    (sent, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_while_the_group_cycles_2_6_2_five_times() {
    let (sent, failures) = cycle_under_load("web-cycle", 5, false).await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_with_the_controller_killed_during_each_scale_in() {
    let (sent, failures) = cycle_under_load("web-restart", 2, true).await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

/// A controller restarted while AWS is away for longer than the router grace,
/// during a scale-in the old controller never pushed (it was frozen first):
/// the routers still route to the terminating instances, and keep acking
/// the previous controller's revisions (they have requests in flight). The
/// new controller must count none of those acks and must not start the
/// grace before it serves routers; a CONTINUE before both routers have the
/// draining revision of the new epoch fails requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_when_a_controller_restarts_while_aws_is_away_during_a_scale_in() {
    let _alone = HEAVY.lock().await;
    let group = "web-epoch";
    let scene = Scene::start_with_health(PORT, group, &tags("web"), 2, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    hold_launches_and_terminations(&cloud, group).await;
    let routers = [
        Router::start(&controller.url(""), "r1", &cache_file("epoch-r1"), &[]).await,
        Router::start(&controller.url(""), "r2", &cache_file("epoch-r2"), &[]).await,
    ];
    let _followed = FollowedGroup::start(&cloud, group, backends);
    cloud.set_desired(group, 6).await;
    let six = wait_in_service(&cloud, group, 6, Duration::from_secs(30)).await;
    controller.wait_endpoints("web", "healthy", &six).await;
    for router in &routers {
        controller.wait_in_sync(router).await;
    }
    // Quick requests, and slow ones that keep every router reporting (and
    // so acking) every second.
    let loads: Vec<Load> = routers
        .iter()
        .flat_map(|r| {
            [
                Load::start(format!("http://127.0.0.1:{}/", r.port), 50),
                Load::start(format!("http://127.0.0.1:{}/slow/300", r.port), 10),
            ]
        })
        .collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The old controller never sees the scale-in.
    signal(controller.pid(), "-STOP");
    cloud.set_desired(group, 2).await;
    wait_one_in(&cloud, group, "Terminating:Wait").await;
    emulator.pause();
    let port = controller.port;
    controller.kill().await;
    let controller = Controller::start_at(&emulator, port, LIFECYCLE, HEALTH.0, HEALTH.1).await;
    wait_for(
        "both routers to subscribe to the new controller",
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get("/v1/routers").await;
            let connected = body["routers"]
                .as_array()?
                .iter()
                .filter(|r| r["connected"] == true)
                .count();
            (connected == 2).then_some(())
        },
    )
    .await;
    // AWS stays away well past the router grace (3 s): the fault itself, not
    // a wait for a condition.
    tokio::time::sleep(Duration::from_secs(6)).await;
    emulator.resume();

    let two = wait_in_service(&cloud, group, 2, Duration::from_secs(60)).await;
    controller.wait_endpoints("web", "healthy", &two).await;
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
    let ignored = controller
        .metric("signpost_acks_ignored_total{reason=\"other_epoch\"}")
        .await;
    assert!(
        ignored >= Some(1.0),
        "the routers did ack the previous controller's revisions: {ignored:?}"
    );
}

/// `[routers] expected`: a router that is expected but missing holds a
/// termination up to `drain_timeout` (it may be routing from its cache),
/// and `/v1/lifecycle`, `/readyz` and `/metrics` say which; an id that is
/// not expected may not subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_expected_router_holds_a_termination_until_drain_timeout_and_says_why() {
    const DRAIN: Duration = Duration::from_secs(6);
    let config =
        "[lifecycle]\nrouter_grace = \"1s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"6s\"\n\
                  [routers]\nexpected = [\"r1\", \"r2\"]\n";
    let scene =
        Scene::start_with_health(PORT, "web-expected", &tags("web"), 1, config, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        instances,
    } = scene;
    cloud
        .put_hook(
            "web-expected",
            "signpost-terminate",
            "terminating",
            300,
            "CONTINUE",
        )
        .await;
    let (status, body) = controller.get("/v1/watch?protocol=1&router=r9").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("routers.expected"),
        "{body}"
    );

    let router = Router::start(&controller.url(""), "r1", &cache_file("expected"), &[]).await;
    router.wait_ready().await;
    controller.wait_in_sync(&router).await;
    let (_, ready) = controller.get("/readyz").await;
    assert_eq!(
        ready["routers_missing"],
        serde_json::json!(["r2 (expected, not connected)"])
    );
    assert_eq!(
        controller.metric("signpost_routers_missing").await,
        Some(1.0)
    );
    let _followed = FollowedGroup::start(&cloud, "web-expected", backends);

    let (id, _) = instances[0].clone();
    cloud.set_desired("web-expected", 0).await;
    let asked = SystemTime::now();
    let waiting = wait_for(
        "the termination to wait, naming r2",
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get("/v1/lifecycle").await;
            let active = body["active"].as_array()?.clone();
            let note = active.iter().find(|a| a["instance"] == id.as_str())?["note"]
                .as_str()?
                .to_owned();
            note.contains("r2 (expected, not connected)")
                .then_some(note)
        },
    )
    .await;
    eprintln!("while waiting: {waiting}");
    let record = wait_completed(&controller, &id).await;
    let completed_at = SystemTime::now();
    assert_eq!(record["result"], "continue", "{record}");
    let note = record["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("drain_timeout") && note.contains("r2 (expected, not connected)"),
        "the completion says why it waited: {record}"
    );
    let held = completed_at.duration_since(asked).unwrap();
    assert!(
        held >= DRAIN - Duration::from_millis(500),
        "held {held:?}, less than drain_timeout: r1 alone had acked long before"
    );
}
