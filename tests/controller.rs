//! The controller against the emulator, with real backends at the
//! instances' addresses: what an operator would see through the API.

mod common;

use std::time::Duration;

use common::{ids, wait_for, Backends, Cloud, Controller, Emulator, Scene};

const PORT: u16 = common::BACKEND_PORT;

fn users_tags() -> Vec<(&'static str, &'static str)> {
    vec![("signpost:service", "users"), ("signpost:port", "18080")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_and_in_follow_the_group() {
    let Scene {
        emulator: _emulator,
        cloud,
        mut backends,
        controller,
        instances: _,
    } = Scene::start(PORT, "users-a", &users_tags(), 3, "").await;
    controller.wait_ready().await;

    cloud.set_desired("users-a", 6).await;
    let six = cloud.instances("users-a").await;
    assert_eq!(six.len(), 6);
    backends.follow(&six).await;
    controller
        .wait_endpoints("users", "healthy", &ids(&six))
        .await;

    cloud.set_desired("users-a", 2).await;
    let two = cloud.instances("users-a").await;
    assert_eq!(two.len(), 2);
    // The registry must drop exactly the instances that left, whatever their
    // state: wait on the full endpoint list, not only the healthy ones.
    wait_for(
        "exactly the two remaining instances",
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get("/v1/services/users").await;
            let mut listed: Vec<String> = body["endpoints"]
                .as_array()?
                .iter()
                .map(|e| e["instance_id"].as_str().unwrap().to_owned())
                .collect();
            listed.sort();
            (listed == ids(&two)).then_some(())
        },
    )
    .await;
    let (_, body) = controller.get("/v1/services/users").await;
    assert_eq!(body["healthy"], 2);
    assert_eq!(body["route"], "/users");
    assert_eq!(body["groups"], serde_json::json!(["users-a"]));
    let endpoint = &body["endpoints"][0];
    assert_eq!(endpoint["address"], two[0].1.to_string());
    assert_eq!(endpoint["port"], PORT);
    assert_eq!(endpoint["zone"], "us-east-1a");
    assert_eq!(endpoint["group"], "users-a");

    let healthy = r#"signpost_endpoints{service="users",state="healthy"}"#;
    assert_eq!(controller.metric(healthy).await, Some(2.0));
    assert_eq!(controller.metric("signpost_ready").await, Some(1.0));
    let calls = r#"signpost_aws_calls_total{api="DescribeInstances"}"#;
    assert!(controller.metric(calls).await.unwrap() >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_answering_turns_unhealthy_and_back() {
    let Scene {
        emulator: _emulator,
        cloud: _,
        mut backends,
        controller,
        instances,
    } = Scene::start(PORT, "users-a", &users_tags(), 2, "").await;

    let (victim_id, victim_ip) = instances[0].clone();
    backends.stop(victim_ip);
    controller
        .wait_endpoints("users", "unhealthy", std::slice::from_ref(&victim_id))
        .await;
    controller
        .wait_endpoints("users", "healthy", &[instances[1].0.clone()])
        .await;

    backends.start(&victim_id, victim_ip).await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_instances_are_not_healthy_before_they_answer() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    cloud.create_group("users-a", &users_tags(), 2).await;
    let instances = cloud.instances("users-a").await;
    let controller = Controller::start(&emulator, "").await;
    // Registered, but no backend answers yet: never healthy.
    controller
        .wait_endpoints("users", "unhealthy", &ids(&instances))
        .await;
    let mut backends = Backends::new(PORT);
    backends.follow(&instances).await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_merge_untagged_are_ignored_misconfigured_are_reported() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let mut backends = Backends::new(PORT);
    cloud.create_group("users-blue", &users_tags(), 1).await;
    cloud.create_group("users-green", &users_tags(), 2).await;
    cloud.create_group("batch", &[("team", "data")], 1).await;
    cloud
        .create_group(
            "orders",
            &[("signpost:service", "orders"), ("signpost:port", "abc")],
            1,
        )
        .await;
    cloud
        .create_group(
            "billing",
            &[
                ("signpost:service", "billing"),
                ("signpost:port", "18080"),
                ("signpost:health", "tcp"),
            ],
            1,
        )
        .await;
    let mut users = cloud.instances("users-blue").await;
    users.extend(cloud.instances("users-green").await);
    users.sort();
    let billing = cloud.instances("billing").await;
    // Every instance runs its application, tagged or not.
    let every = cloud_all(
        &cloud,
        &["users-blue", "users-green", "batch", "orders", "billing"],
    )
    .await;
    backends.follow(&every).await;

    let controller = Controller::start(&emulator, "").await;
    controller
        .wait_endpoints("users", "healthy", &ids(&users))
        .await;
    controller
        .wait_endpoints("billing", "healthy", &ids(&billing))
        .await;

    let (_, all) = controller.get("/v1/services").await;
    let names: Vec<&str> = all["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["billing", "users"],
        "the untagged group is ignored, the misconfigured one adds nothing"
    );
    let problems = all["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["group"], "orders");
    assert_eq!(problems[0]["service"], "orders");
    let reason = problems[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("signpost:port") && reason.contains("abc"),
        "{reason}"
    );

    let (_, body) = controller.get("/v1/services/users").await;
    assert_eq!(
        body["groups"],
        serde_json::json!(["users-blue", "users-green"])
    );
    let (status, body) = controller.get("/v1/services/orders").await;
    assert_eq!(status, 404, "{body}");
}

async fn cloud_all(cloud: &Cloud, groups: &[&str]) -> Vec<(String, std::net::IpAddr)> {
    let mut all = Vec::new();
    for g in groups {
        all.extend(cloud.instances(g).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_outage_keeps_the_registry_and_fails_readiness_until_it_ends() {
    let Scene {
        emulator,
        cloud: _,
        backends: _backends,
        controller,
        instances,
    } = Scene::start(PORT, "users-a", &users_tags(), 3, "").await;
    controller.wait_ready().await;
    let (_, before) = controller.get("/v1/services/users").await;

    emulator.pause();
    let reason = wait_for("/readyz to fail", Duration::from_secs(20), || async {
        // Readiness fails once the last sync is too old; the reason names
        // the failing call once its first attempt has timed out (the group
        // listing, or the instances described beside it: both wait on AWS).
        let (status, body) = controller.get("/readyz").await;
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        let named = ["DescribeAutoScalingGroups", "DescribeInstances"]
            .iter()
            .any(|api| reason.contains(&format!("{api} failed: timed out")));
        (status == 503 && named).then_some(reason)
    })
    .await;
    assert!(reason.contains("last complete sync was"), "{reason}");
    let (_, during) = controller.get("/v1/services/users").await;
    assert_eq!(
        during["endpoints"], before["endpoints"],
        "nothing removed or changed during the outage"
    );
    assert_eq!(during["revision"], before["revision"]);

    assert_eq!(controller.metric("signpost_ready").await, Some(0.0));
    let mut failures = 0.0;
    for api in ["DescribeAutoScalingGroups", "DescribeInstances"] {
        let sample = format!(r#"signpost_sync_failures_total{{api="{api}",kind="timeout"}}"#);
        failures += controller.metric(&sample).await.unwrap_or(0.0);
    }
    assert!(failures >= 1.0);

    emulator.resume();
    controller.wait_ready().await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let emulator = Emulator::start().await;
    let controller = Controller::start(&emulator, "").await;
    let status = controller.terminate().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_before_the_first_listing_still_shuts_down() {
    // AWS unreachable from the start: nothing ever warms up, and shutdown
    // must not wait for it.
    let emulator = Emulator::start().await;
    emulator.pause();
    let controller = Controller::start(&emulator, "").await;
    let status = controller.terminate().await;
    emulator.resume();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_config_exits_non_zero_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("signpost-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |toml: &str| {
        let path = dir.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_signpost"))
            .args(["controller", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run("[health]\nhealthy_threshold = 0\n");
    assert!(!ok);
    assert!(out.contains("health.healthy_threshold"), "{out}");
    let (ok, out) = run("resync_interval = \"often\"\n");
    assert!(!ok);
    assert!(
        out.contains("resync_interval") && out.contains("often"),
        "{out}"
    );
    let (ok, out) = run("resync_interval = \"10s\"\n");
    assert!(ok, "{out}");
    assert!(out.contains("resync_interval = \"10s\""), "{out}");
}

/// A `signpost:service` tag removed by mistake takes the group out of the
/// listing without AWS saying a word about its instances: the mass-removal
/// guard keeps the endpoints, says so, and applies the removal only once
/// three listings agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_tag_removed_by_mistake_holds_the_removal_until_listings_agree() {
    let Scene {
        emulator: _emulator,
        cloud,
        backends: _backends,
        controller,
        instances,
    } = Scene::start(
        PORT,
        "users-a",
        &users_tags(),
        3,
        "resync_interval = \"2s\"",
    )
    .await;
    controller
        .wait_endpoints("users", "healthy", &ids(&instances))
        .await;
    let tag = aws_sdk_autoscaling::types::Tag::builder()
        .resource_id("users-a")
        .resource_type("auto-scaling-group")
        .key("signpost:service")
        .build();
    cloud
        .autoscaling
        .delete_tags()
        .tags(tag)
        .send()
        .await
        .unwrap();

    let problem = wait_for(
        "the removal to be held",
        Duration::from_secs(20),
        || async {
            let (_, body) = controller.get("/v1/services/users").await;
            let problem = body["problems"].as_array()?.first()?.clone();
            let listed = body["endpoints"].as_array()?.len();
            (listed == 3).then_some(problem)
        },
    )
    .await;
    let reason = problem["reason"].as_str().unwrap();
    assert!(
        reason.contains("removal of 3 of 3 endpoints held"),
        "{reason}"
    );
    wait_for(
        "the held removal in /readyz and /metrics",
        Duration::from_secs(10),
        || async {
            let (_, ready) = controller.get("/readyz").await;
            let held = controller.metric("signpost_removals_held").await;
            (ready["sync"]["held_removals"][0]["service"] == "users" && held == Some(3.0))
                .then_some(())
        },
    )
    .await;

    wait_for(
        "the removal to be applied once three listings agree",
        Duration::from_secs(30),
        || async {
            let (status, _) = controller.get("/v1/services/users").await;
            (status == 404).then_some(())
        },
    )
    .await;
    wait_for("nothing held any more", Duration::from_secs(10), || async {
        (controller.metric("signpost_removals_held").await == Some(0.0)).then_some(())
    })
    .await;
}
