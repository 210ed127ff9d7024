//! AWS misbehaving under a running controller: every call goes through a
//! fault-injecting proxy (`common::faults`) in front of the emulator, while
//! a router carries steady, checked traffic to real backends.
//!
//! For each fault on DescribeAutoScalingGroups and on DescribeInstances:
//! nothing is removed while it lasts (the router answers every request),
//! `/readyz` and `/metrics` name the failing API and the kind of failure,
//! the calls stay within the configured budget (no tight retry loop), and a
//! scale-out made during the fault is listed within one resync once the
//! fault clears.

mod common;

use std::time::Duration;

use common::faults::{most_within, Fault, FaultProxy, Times};
use common::{ids, wait_for, Backends, Cloud, Controller, Emulator, Load, Router};
use tokio::time::Instant;

const GROUP: &str = "users-a";
const RESYNC: Duration = Duration::from_secs(1);
const CALLS_PER_SECOND: usize = 4;
const OPERATION_TIMEOUT: Duration = Duration::from_secs(4);
/// The SDK's standard retries (3 attempts), a 1 s attempt timeout, and a
/// small budget, so that a retry storm would show at the proxy.
const AWS: &str =
    "max_attempts = 3\nattempt_timeout = \"1s\"\noperation_timeout = \"4s\"\ncalls_per_second = 4";

fn tags() -> Vec<(&'static str, &'static str)> {
    vec![("signpost:service", "users"), ("signpost:port", "18080")]
}

/// Every fault (held until cleared), and the `kind` label its listing
/// failure must carry (none: the listing must succeed).
fn faults() -> Vec<(Fault, Times, Option<&'static str>)> {
    let always = [
        (Fault::Throttle { retry_after: None }, Some("throttled")),
        (
            Fault::Throttle {
                retry_after: Some(1),
            },
            Some("throttled"),
        ),
        (Fault::Status(500), Some("unavailable")),
        (Fault::Status(503), Some("unavailable")),
        (Fault::Reset, Some("connection")),
        (Fault::Stall(Duration::from_secs(6)), Some("timeout")),
        (Fault::Truncated, Some("malformed")),
        (Fault::Malformed, Some("malformed")),
        (Fault::BrokenPage, Some("unavailable")),
        (Fault::Slow(Duration::from_millis(600)), None),
    ];
    let mut faults: Vec<_> = always
        .into_iter()
        .map(|(fault, kind)| (fault, Times::Always, kind))
        .collect();
    // A short burst of throttling that the SDK's retries (3 attempts)
    // absorb: no listing fails at all.
    faults.push((Fault::Throttle { retry_after: None }, Times::Next(2), None));
    faults
}

/// Every endpoint the registry lists for `users`, whatever its state.
async fn listed(controller: &Controller) -> Vec<String> {
    let (_, body) = controller.get("/v1/services/users").await;
    let mut listed: Vec<String> = body["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .map(|e| e["instance_id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    listed.sort();
    listed
}

fn failures_sample(api: &str, kind: &str) -> String {
    format!(r#"signpost_sync_failures_total{{api="{api}",kind="{kind}"}}"#)
}

/// One fault after another on `api`, each held until the controller has
/// said so (or, for a slow answer, has listed through it), under load.
async fn faults_on(api: &str) {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(common::BACKEND_PORT);
    cloud.create_group(GROUP, &tags(), 2).await;
    let mut instances = cloud.instances(GROUP).await;
    backends.follow(&instances).await;
    let proxy = FaultProxy::start(&emulator.endpoint()).await;
    let controller =
        Controller::start_with_aws(&emulator, "", AWS, &[("AWS_ENDPOINT_URL", &proxy.url())]).await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
    let cache =
        std::env::temp_dir().join(format!("signpost-faults-{}-{api}.json", std::process::id()));
    let router = Router::start(&controller.url(""), "edge-1", &cache, &[]).await;
    controller.wait_in_sync(&router).await;
    let load = Load::start(format!("http://127.0.0.1:{}/users/x", router.port), 50);

    for (fault, times, kind) in faults() {
        let before = listed(&controller).await;
        let (_, readyz) = controller.get("/readyz").await;
        let failures_total = readyz["sync"]["failures_total"].clone();
        let failures_before = match kind {
            Some(kind) => controller
                .metric(&failures_sample(api, kind))
                .await
                .unwrap_or(0.0),
            None => 0.0,
        };
        let faulted_before = proxy.faulted(api);
        let started = Instant::now();
        proxy.inject(api, fault, times);
        // A scale-out during the fault: it can only be listed once the
        // listing works again.
        cloud.set_desired(GROUP, instances.len() as i32 + 1).await;
        instances = cloud.instances(GROUP).await;
        backends.follow(&instances).await;

        let reason = match kind {
            Some(kind) => {
                let sample = failures_sample(api, kind);
                let reason = wait_for(
                    &format!("/readyz to fail naming {api} ({})", fault.name()),
                    Duration::from_secs(20),
                    || async {
                        let (status, body) = controller.get("/readyz").await;
                        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
                        let counted = controller.metric(&sample).await.unwrap_or(0.0);
                        (status == 503 && reason.contains(api) && counted > failures_before)
                            .then_some(reason)
                    },
                )
                .await;
                assert_eq!(
                    listed(&controller).await,
                    before,
                    "{}: nothing removed or added while listings fail",
                    fault.name()
                );
                reason
            }
            None => {
                // A slow answer is an answer: the listing goes through.
                wait_for(
                    &format!("the scale-out listed through a {}", fault.name()),
                    Duration::from_secs(20),
                    || async { (listed(&controller).await == ids(&instances)).then_some(()) },
                )
                .await;
                let (status, body) = controller.get("/readyz").await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(
                    body["sync"]["failures_total"],
                    failures_total,
                    "{}: no listing failed",
                    fault.name()
                );
                String::new()
            }
        };
        let held = started.elapsed();
        let peak = most_within(&proxy.all_calls(), started, Duration::from_secs(1));
        let during = proxy.all_calls().iter().filter(|t| **t >= started).count();
        let faulted = proxy.faulted(api) - faulted_before;

        proxy.clear(api);
        let cleared = Instant::now();
        wait_for(
            &format!("the scale-out listed after the {} cleared", fault.name()),
            OPERATION_TIMEOUT + RESYNC * 3,
            || async { (listed(&controller).await == ids(&instances)).then_some(()) },
        )
        .await;
        let converged = cleared.elapsed();
        eprintln!(
            "{api} | {} ({times:?}) | {:.1} s | {during} calls ({peak} in the busiest second, {faulted} of them faulted) | converged {:.1} s | {reason}",
            fault.name(),
            held.as_secs_f64(),
            converged.as_secs_f64()
        );
        assert!(
            peak <= 2 * CALLS_PER_SECOND,
            "{}: {peak} calls in one second, budget {CALLS_PER_SECOND}/s with a burst of one second",
            fault.name()
        );
        assert!(
            converged <= OPERATION_TIMEOUT + RESYNC * 2,
            "{}: converged {converged:?} after the fault cleared",
            fault.name()
        );
        controller
            .wait_endpoints("users", "healthy", &ids(&instances))
            .await;
    }

    let (sent, failures) = load.finish().await;
    eprintln!(
        "{api}: {sent} requests through the router, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
    assert!(sent > 100, "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_auto_scaling_groups_faults_remove_nothing_and_converge() {
    faults_on("DescribeAutoScalingGroups").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_instances_faults_remove_nothing_and_converge() {
    faults_on("DescribeInstances").await;
}

/// A group of 2 with backends, and a controller behind the fault proxy
/// that learns of changes from the event queue: its resync is far longer
/// than a test, so only events explain a scale-out being listed; its
/// attempts outlast the 1 s long poll.
struct EventScene {
    _emulator: Emulator,
    cloud: Cloud,
    queue: String,
    backends: Backends,
    instances: Vec<(String, std::net::IpAddr)>,
    proxy: FaultProxy,
    controller: Controller,
}

impl EventScene {
    async fn start() -> EventScene {
        let emulator = Emulator::start().await;
        let cloud = Cloud::new(&emulator).await;
        let queue = cloud.event_queue().await;
        let mut backends = Backends::new(common::BACKEND_PORT);
        cloud.create_group(GROUP, &tags(), 2).await;
        let instances = cloud.instances(GROUP).await;
        backends.follow(&instances).await;
        let proxy = FaultProxy::start(&emulator.endpoint()).await;
        let controller = Controller::start_with_aws(
            &emulator,
            &format!("resync_interval = \"600s\"\n[events]\nqueue_url = \"{queue}\"\nwait_time = \"1s\""),
            "max_attempts = 3\nattempt_timeout = \"3s\"\noperation_timeout = \"8s\"\ncalls_per_second = 4",
            &[("AWS_ENDPOINT_URL", &proxy.url())],
        )
        .await;
        controller
            .wait_endpoints("users", "healthy", &ids(&instances))
            .await;
        EventScene {
            _emulator: emulator,
            cloud,
            queue,
            backends,
            instances,
            proxy,
            controller,
        }
    }
}

/// The event queue failing: each fault on ReceiveMessage is named in
/// `/readyz` and the metrics, receives back off instead of looping, the
/// listing is untouched, and once the fault clears an event makes the
/// controller list a scale-out long before its resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_message_faults_are_named_backed_off_and_events_resume() {
    let EventScene {
        _emulator,
        cloud,
        queue,
        mut backends,
        mut instances,
        proxy,
        controller,
    } = EventScene::start().await;

    for (fault, kind) in [
        (Fault::Throttle { retry_after: None }, "throttled"),
        (Fault::Status(500), "unavailable"),
        (Fault::Reset, "connection"),
        // Longer than a receive's attempt timeout: the long poll's wait
        // plus 10 s.
        (Fault::Stall(Duration::from_secs(15)), "timeout"),
        (Fault::Malformed, "malformed"),
    ] {
        let api = "ReceiveMessage";
        let sample = format!(r#"signpost_event_receive_failures_total{{kind="{kind}"}}"#);
        let counted_before = controller.metric(&sample).await.unwrap_or(0.0);
        let before = listed(&controller).await;
        let started = Instant::now();
        proxy.inject(api, fault, Times::Always);
        let failing = wait_for(
            &format!("/readyz to name the failing {api} ({})", fault.name()),
            Duration::from_secs(30),
            || async {
                let (_, body) = controller.get("/readyz").await;
                let failing = body["events"]["receive_failing"].clone();
                let counted = controller.metric(&sample).await.unwrap_or(0.0);
                (failing["api"] == api && failing["kind"] == kind && counted > counted_before)
                    .then_some(failing)
            },
        )
        .await;
        // Hold the fault a while longer to see how often receives come.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let calls = proxy.calls(api);
        let during = calls.iter().filter(|t| **t >= started).count();
        let peak = most_within(&calls, started, Duration::from_secs(1));
        let held = started.elapsed();
        assert_eq!(listed(&controller).await, before, "{}", fault.name());
        assert!(
            peak <= 2 * CALLS_PER_SECOND,
            "{}: {peak} receives in one second",
            fault.name()
        );

        proxy.clear(api);
        let cleared = Instant::now();
        cloud.set_desired(GROUP, instances.len() as i32 + 1).await;
        instances = cloud.instances(GROUP).await;
        backends.follow(&instances).await;
        let launched = common::launch_event(GROUP, &instances.last().unwrap().0);
        cloud.send_event(&queue, &launched).await;
        // The receive backoff grows to 30 s at most; events resume within it.
        wait_for(
            &format!(
                "the scale-out listed on an event after the {} cleared",
                fault.name()
            ),
            Duration::from_secs(40),
            || async { (listed(&controller).await == ids(&instances)).then_some(()) },
        )
        .await;
        eprintln!(
            "{api} | {} | {:.1} s | {during} receives ({peak} in the busiest second) | listed on an event {:.1} s after | {failing}",
            fault.name(),
            held.as_secs_f64(),
            cleared.elapsed().as_secs_f64()
        );
        wait_for("no receive failing", Duration::from_secs(10), || async {
            let (_, body) = controller.get("/readyz").await;
            body["events"]["receive_failing"].is_null().then_some(())
        })
        .await;
    }
}

/// CompleteLifecycleAction failing (500 on every call) while a launch and
/// then a scale-in wait on signpost: the instance stays held (no hook is
/// let go, none is lost), each failure is counted and retried at the next
/// listing within the call budget, and once the fault clears the action
/// completes within one operation timeout and two resyncs. DescribeLifecycleHooks
/// failing fails the listing whole: named in `/readyz`, nothing removed.
/// All under 50 checked requests a second through a router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_call_faults_hold_the_hooks_and_lose_no_action() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(common::BACKEND_PORT);
    cloud.create_group(GROUP, &tags(), 2).await;
    common::hold_launches_and_terminations(&cloud, GROUP).await;
    let mut instances = cloud.instances(GROUP).await;
    backends.follow(&instances).await;
    let proxy = FaultProxy::start(&emulator.endpoint()).await;
    let controller = Controller::start_with_aws(
        &emulator,
        "[lifecycle]\nrouter_grace = \"1s\"\ndrain_timeout = \"20s\"\n",
        AWS,
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    )
    .await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
    let cache = std::env::temp_dir().join(format!(
        "signpost-faults-{}-lifecycle.json",
        std::process::id()
    ));
    let router = Router::start(&controller.url(""), "edge-1", &cache, &[]).await;
    controller.wait_in_sync(&router).await;
    let load = Load::start(format!("http://127.0.0.1:{}/users/x", router.port), 50);
    let errors = |transition: &str| {
        format!(r#"signpost_lifecycle_actions_total{{transition="{transition}",result="error"}}"#)
    };

    for (desired, transition, held_in) in [
        (3, "launch", "Pending:Wait"),
        (2, "terminate", "Terminating:Wait"),
    ] {
        let started = Instant::now();
        proxy.inject("CompleteLifecycleAction", Fault::Status(500), Times::Always);
        cloud.set_desired(GROUP, desired).await;
        if desired > instances.len() as i32 {
            instances = cloud.instances(GROUP).await;
            backends.follow(&instances).await;
        }
        wait_for(
            &format!("{transition}: completions to fail and be retried"),
            Duration::from_secs(30),
            || async {
                let failed = controller.metric(&errors(transition)).await.unwrap_or(0.0);
                (failed >= 2.0).then_some(())
            },
        )
        .await;
        let held = common::in_state(&cloud, GROUP, held_in).await;
        assert_eq!(
            held.len(),
            1,
            "{transition}: the instance is still held: {held:?}"
        );
        let calls = proxy.calls("CompleteLifecycleAction");
        let peak = most_within(&calls, started, Duration::from_secs(1));
        assert!(
            peak <= 2 * CALLS_PER_SECOND,
            "{transition}: {peak} completions in one second, budget {CALLS_PER_SECOND}/s"
        );

        proxy.clear("CompleteLifecycleAction");
        let cleared = Instant::now();
        let now_in_service = common::wait_in_service(
            &cloud,
            GROUP,
            desired as usize,
            OPERATION_TIMEOUT + RESYNC * 2 + Duration::from_secs(5),
        )
        .await;
        eprintln!(
            "CompleteLifecycleAction 500 ({transition}): {} calls, {peak} in the busiest second, {} failures counted; completed {:.1} s after the fault cleared",
            calls.iter().filter(|t| **t >= started).count(),
            controller.metric(&errors(transition)).await.unwrap_or(0.0),
            cleared.elapsed().as_secs_f64()
        );
        instances.retain(|(id, _)| now_in_service.contains(id));
        controller
            .wait_endpoints("users", "healthy", &ids(&instances))
            .await;
    }

    // DescribeLifecycleHooks is asked while an instance waits on a hook of
    // a group whose hooks are not known yet (they are kept 30 min once
    // read): fault it, then make a new group with hooks and an instance.
    let before = listed(&controller).await;
    proxy.inject("DescribeLifecycleHooks", Fault::Status(500), Times::Always);
    const OTHER: &str = "users-b";
    cloud.create_group(OTHER, &tags(), 0).await;
    common::hold_launches_and_terminations(&cloud, OTHER).await;
    cloud.set_desired(OTHER, 1).await;
    // `follow` keeps exactly the backends it is given: both groups'.
    let mut both = instances.clone();
    both.extend(cloud.instances(OTHER).await);
    backends.follow(&both).await;
    wait_for(
        "/readyz to name DescribeLifecycleHooks",
        Duration::from_secs(20),
        || async {
            let (status, body) = controller.get("/readyz").await;
            let reason = body["reason"].as_str().unwrap_or_default().to_owned();
            (status == 503 && reason.contains("DescribeLifecycleHooks")).then_some(())
        },
    )
    .await;
    assert_eq!(
        listed(&controller).await,
        before,
        "nothing removed or added"
    );
    proxy.clear("DescribeLifecycleHooks");
    common::wait_in_service(&cloud, OTHER, 1, Duration::from_secs(30)).await;

    let (sent, failures) = load.finish().await;
    eprintln!(
        "lifecycle faults: {sent} requests through the router, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

/// The event queue deleted under a running controller (an operator's
/// mistake, a stack torn down): receives fail as `not_found`, named in
/// `/readyz` and counted, back off instead of looping, and the registry is
/// untouched; once a queue of that name exists again, events resume
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_named_backed_off_and_events_resume_when_it_returns() {
    let EventScene {
        _emulator,
        cloud,
        queue,
        mut backends,
        instances: _,
        proxy,
        controller,
    } = EventScene::start().await;
    let before = listed(&controller).await;

    cloud
        .sqs
        .delete_queue()
        .queue_url(&queue)
        .send()
        .await
        .unwrap();
    let deleted = Instant::now();
    let sample = r#"signpost_event_receive_failures_total{kind="not_found"}"#;
    let failing = wait_for(
        "/readyz to name the missing queue",
        Duration::from_secs(30),
        || async {
            let (_, body) = controller.get("/readyz").await;
            let failing = body["events"]["receive_failing"].clone();
            let counted = controller.metric(sample).await.unwrap_or(0.0);
            (failing["api"] == "ReceiveMessage" && failing["kind"] == "not_found" && counted >= 1.0)
                .then_some(failing)
        },
    )
    .await;
    // Held a while to see how often receives come.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let receives = proxy.calls("ReceiveMessage");
    let during = receives.iter().filter(|t| **t >= deleted).count();
    let peak = most_within(&receives, deleted, Duration::from_secs(1));
    assert!(
        peak <= 2 * CALLS_PER_SECOND,
        "{peak} receives in one second"
    );
    assert_eq!(
        listed(&controller).await,
        before,
        "the registry is untouched"
    );

    assert_eq!(
        cloud.event_queue().await,
        queue,
        "the same name gives the same URL"
    );
    let returned = Instant::now();
    cloud.set_desired(GROUP, 3).await;
    let instances = cloud.instances(GROUP).await;
    backends.follow(&instances).await;
    let launched = common::launch_event(GROUP, &instances.last().unwrap().0);
    cloud.send_event(&queue, &launched).await;
    // The receive backoff grows to 30 s at most.
    wait_for(
        "the scale-out listed on an event once the queue is back",
        Duration::from_secs(40),
        || async { (listed(&controller).await == ids(&instances)).then_some(()) },
    )
    .await;
    let (_, body) = controller.get("/readyz").await;
    assert!(body["events"]["receive_failing"].is_null(), "{body}");
    eprintln!(
        "queue deleted: {during} receives in {:.1} s ({peak} in the busiest second); listed on an event {:.1} s after the queue returned; {failing}",
        (returned - deleted).as_secs_f64(),
        returned.elapsed().as_secs_f64()
    );
}

/// RecordLifecycleActionHeartbeat failing (500, then throttled) while a
/// launch waits on a hook with a 30 s heartbeat timeout (AWS's shortest),
/// which signpost heartbeats every third of (10 s); the instance's
/// application stays unhealthy meanwhile. Each fault is held over one
/// heartbeat: the failure is counted
/// (`signpost_lifecycle_heartbeats_total{result="error"}`) after at most
/// the SDK's 3 attempts; the launch is neither completed nor let go; a
/// failed heartbeat is tried again 1 s later (then 2, 4, ... up to the
/// period), and once the fault clears heartbeats go through, so the
/// instance is still held well past the hook's own timeout counted from
/// its launch, and completed with CONTINUE once healthy. All under checked
/// load through a router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_faults_are_counted_and_the_held_launch_outlives_its_hook_timeout() {
    const BEAT: &str = "RecordLifecycleActionHeartbeat";
    const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);
    const MAX_ATTEMPTS: usize = 3;
    let every = HEARTBEAT_TIMEOUT / 3;
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(common::BACKEND_PORT);
    cloud.create_group(GROUP, &tags(), 2).await;
    let timeout = HEARTBEAT_TIMEOUT.as_secs() as i32;
    cloud
        .put_hook(GROUP, "signpost-launch", "launching", timeout, "ABANDON")
        .await;
    let instances = cloud.instances(GROUP).await;
    backends.follow(&instances).await;
    let proxy = FaultProxy::start(&emulator.endpoint()).await;
    let controller = Controller::start_with_aws(
        &emulator,
        "[lifecycle]\nrouter_grace = \"1s\"\nlaunch_timeout = \"120s\"\n",
        AWS,
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    )
    .await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
    let cache = std::env::temp_dir().join(format!(
        "signpost-faults-{}-heartbeat.json",
        std::process::id()
    ));
    let router = Router::start(&controller.url(""), "edge-1", &cache, &[]).await;
    controller.wait_in_sync(&router).await;
    let load = Load::start(format!("http://127.0.0.1:{}/users/x", router.port), 50);
    let beats = |result: &'static str| {
        let controller = &controller;
        async move {
            let sample = format!(r#"signpost_lifecycle_heartbeats_total{{result="{result}"}}"#);
            controller.metric(&sample).await.unwrap_or(0.0)
        }
    };

    // A launch whose application runs but fails its health check until the
    // test says otherwise: the hook's timeout counts from here.
    cloud.set_desired(GROUP, 3).await;
    let launched = Instant::now();
    let all = cloud.instances(GROUP).await;
    let (new, ip) = all
        .iter()
        .find(|(id, _)| !instances.iter().any(|(i, _)| i == id))
        .cloned()
        .expect("the launched instance");
    backends.set_health(ip, false);
    backends.follow(&all).await;

    let mut faulted_attempts = Vec::new();
    let mut fault_windows = Vec::new();
    for (n, fault) in [Fault::Status(500), Fault::Throttle { retry_after: None }]
        .into_iter()
        .enumerate()
    {
        let failed = (n + 1) as f64;
        let injected = Instant::now();
        proxy.inject(BEAT, fault, Times::Always);
        // The next heartbeat comes at most a period after the last one (or
        // after the action was taken up), plus its attempts.
        wait_for(
            &format!("a heartbeat to fail ({})", fault.name()),
            every + OPERATION_TIMEOUT + RESYNC * 2,
            || async { (beats("error").await >= failed).then_some(()) },
        )
        .await;
        proxy.clear(BEAT);
        let cleared = Instant::now();
        fault_windows.push((injected, cleared));
        let attempts = proxy.calls(BEAT).iter().filter(|t| **t >= injected).count();
        faulted_attempts.push(attempts);
        assert!(
            (1..=MAX_ATTEMPTS).contains(&attempts),
            "{}: {attempts} attempts for one failed heartbeat",
            fault.name()
        );
        let held = common::in_state(&cloud, GROUP, "Pending:Wait").await;
        assert_eq!(held, vec![new.clone()], "{}: still held", fault.name());
        let (_, lifecycle) = controller.get("/v1/lifecycle").await;
        let active = lifecycle["active"].as_array().unwrap();
        assert!(
            active
                .iter()
                .any(|a| a["instance"] == new.as_str() && a["stage"] == "waiting_for_health"),
            "{}: the action still waits for health: {lifecycle}",
            fault.name()
        );
        // A failed heartbeat is tried again 1 s later (`HEARTBEAT_RETRY`).
        wait_for(
            &format!("heartbeats to resume after the {}", fault.name()),
            Duration::from_secs(2) + OPERATION_TIMEOUT,
            || async { (beats("ok").await >= failed).then_some(()) },
        )
        .await;
        eprintln!(
            "{BEAT} {}: failed heartbeat counted after {attempts} attempts, {:.1} s after the fault began; the next heartbeat went through {:.1} s after the clear ({:.1} s after the launch)",
            fault.name(),
            (cleared - injected).as_secs_f64(),
            cleared.elapsed().as_secs_f64(),
            launched.elapsed().as_secs_f64()
        );
    }
    // Only heartbeats can keep the action past the hook's own timeout,
    // counted from the launch: pace the test to past it.
    tokio::time::sleep_until(launched + HEARTBEAT_TIMEOUT + Duration::from_secs(5)).await;
    let past = launched.elapsed();
    assert!(
        past >= HEARTBEAT_TIMEOUT + Duration::from_secs(5),
        "{past:?}"
    );
    assert_eq!(
        common::in_state(&cloud, GROUP, "Pending:Wait").await,
        vec![new.clone()],
        "still held {past:?} after the launch"
    );
    assert!(
        emulator.complete_calls().is_empty(),
        "nothing completed early: {:?}",
        emulator.complete_calls()
    );

    backends.set_health(ip, true);
    common::wait_in_service(&cloud, GROUP, 3, Duration::from_secs(20)).await;
    let done = common::completed(&controller, &new)
        .await
        .expect("the launch in /v1/lifecycle");
    assert_eq!(done["result"], "continue", "{done}");
    let completions = emulator.complete_calls();
    assert!(
        completions.len() == 1 && completions[0].result == "CONTINUE" && completions[0].found,
        "{completions:?}"
    );

    // The heartbeats' rhythm: one that went through is followed by the next
    // a period later, never sooner (each succeeds at its first attempt);
    // a failed one is retried 1 s later, which the waits above measured;
    // and no second ever saw more than one heartbeat's attempts twice over.
    let calls = proxy.calls(BEAT);
    let failed = |t: &Instant| fault_windows.iter().any(|(from, to)| t >= from && t <= to);
    let went_through: Vec<Instant> = calls.iter().filter(|t| !failed(t)).copied().collect();
    let gaps: Vec<f64> = went_through
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for (pair, gap) in went_through.windows(2).zip(&gaps) {
        let fault_between = fault_windows
            .iter()
            .any(|(from, _)| *from > pair[0] && *from < pair[1]);
        assert!(
            fault_between || *gap >= every.as_secs_f64() - 0.2,
            "heartbeats {gap:.1} s apart: {gaps:?}"
        );
    }
    let starts = went_through.len();
    assert!(
        most_within(&calls, launched, Duration::from_secs(1)) <= 2 * MAX_ATTEMPTS,
        "heartbeat calls in a tight loop: {calls:?}"
    );
    let (sent, failures) = load.finish().await;
    eprintln!(
        "{BEAT}: {} heartbeats went through in {:.1} s ({} calls, {faulted_attempts:?} attempts for the failed ones, {} in the busiest second), {gaps:.1?} s apart; ok {}, error {}; completed {}; {sent} requests through the router, {} failed",
        starts,
        launched.elapsed().as_secs_f64(),
        calls.len(),
        most_within(&calls, launched, Duration::from_secs(1)),
        beats("ok").await,
        beats("error").await,
        done,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}
