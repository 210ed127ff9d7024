//! Lifecycle benchmark: over 100 scale-outs held by a launch hook, the time
//! from the hook's event to every router having acked the healthy endpoint,
//! split into its parts. Run: `cargo bench --bench lifecycle`.
//!
//! Everything is real: moto with the hook extension sends the hook's
//! notification to an SQS queue, the release `signpost` controller
//! long-polls it (resync 300 s, so only the event can explain a reaction),
//! three `signpost router`s ack, and one HTTP backend per instance answers
//! at its own address. The numbers are the controller's own, from
//! `GET /v1/lifecycle`; "event" is the notification's `Time`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{wait_for, Backends, Cloud, Controller, Emulator, FollowedGroup, Router};

const PORT: u16 = common::BACKEND_PORT;
/// `SIGNPOST_BENCH_SCALE_OUTS` overrides, for a quick look.
const SCALE_OUTS: usize = 100;
const ROUTERS: usize = 3;
const HEALTH_INTERVAL: &str = "1s";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("lifecycle benchmark: run with `cargo bench --bench lifecycle`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let queue_url = cloud
        .sqs
        .create_queue()
        .queue_name("signpost-bench")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = "arn:aws:sqs:us-east-1:123456789012:signpost-bench";
    let tags = [
        ("signpost:service", "web"),
        ("signpost:port", "18080"),
        ("signpost:route", "/"),
    ];
    cloud.create_group("bench", &tags, 1).await;
    cloud
        .autoscaling
        .put_lifecycle_hook()
        .auto_scaling_group_name("bench")
        .lifecycle_hook_name("signpost-launch")
        .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
        .heartbeat_timeout(300)
        .default_result("ABANDON")
        .notification_target_arn(queue_arn)
        .role_arn("arn:aws:iam::123456789012:role/signpost-hooks")
        .send()
        .await
        .unwrap();
    let _followed = FollowedGroup::start(&cloud, "bench", Backends::new(PORT));

    let toml = format!(
        "resync_interval = \"300s\"\n[events]\nqueue_url = \"{queue_url}\"\nwait_time = \"5s\"\n\
         [lifecycle]\nrouter_grace = \"0s\""
    );
    let controller =
        Controller::start_with_health(&emulator, &toml, HEALTH_INTERVAL, "500ms").await;
    let cache = std::env::temp_dir().join(format!("signpost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    let mut routers = Vec::new();
    for n in 0..ROUTERS {
        let id = format!("bench-{n}");
        let router = Router::start(&controller.url(""), &id, &cache.join(&id), &[]).await;
        router.wait_ready().await;
        routers.push(router);
    }

    let scale_outs = std::env::var("SIGNPOST_BENCH_SCALE_OUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SCALE_OUTS);
    // The listing that an event triggers, as the controller timed it: the
    // part of "registered" that is the emulator's API latency.
    let mut listings = Vec::new();
    for n in 0..scale_outs {
        cloud.set_desired("bench", 2).await;
        wait_group(&cloud, 2).await;
        let (_, ready) = controller.get("/readyz").await;
        listings.extend(ready["sync"]["last_duration_ms"].as_u64());
        cloud.set_desired("bench", 1).await;
        wait_group(&cloud, 1).await;
        if (n + 1) % 10 == 0 {
            eprintln!("{} scale-outs", n + 1);
        }
    }

    let (_, body) = controller.get("/v1/lifecycle").await;
    let recent = body["recent"].as_array().unwrap();
    let done: Vec<&serde_json::Value> = recent
        .iter()
        .filter(|a| a["result"] == "continue")
        .collect();
    let from_event = done.iter().filter(|a| a["since_from"] == "event").count();
    let field = |name: &str| -> Vec<u64> {
        let mut v: Vec<u64> = done.iter().filter_map(|a| a[name].as_u64()).collect();
        v.sort_unstable();
        v
    };
    let (registered, healthy, acked) = (
        field("registered_ms"),
        field("healthy_ms"),
        field("acked_ms"),
    );
    let mut pushed: Vec<u64> = done
        .iter()
        .filter_map(|a| Some(a["acked_ms"].as_u64()? - a["healthy_ms"].as_u64()?))
        .collect();
    pushed.sort_unstable();
    let mut without_health: Vec<u64> = done
        .iter()
        .filter_map(|a| {
            let checks = a["healthy_ms"].as_u64()? - a["registered_ms"].as_u64()?;
            Some(a["acked_ms"].as_u64()? - checks)
        })
        .collect();
    without_health.sort_unstable();

    println!(
        "{} launches completed (CONTINUE), {from_event} timed from their event, {ROUTERS} routers, health interval {HEALTH_INTERVAL} (healthy after 2 passes)\n",
        done.len()
    );
    println!("| from the hook's event to | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    row(
        "endpoint registered (event received, fleet listed)",
        &registered,
    );
    listings.sort_unstable();
    row(
        "  of which the fleet listing (DescribeAutoScalingGroups, DescribeInstances and DescribeLifecycleHooks at once)",
        &listings,
    );
    row("endpoint healthy", &healthy);
    row("every router acked it (the whole wait)", &acked);
    row(
        "every router acked it, minus the health checks (registered → healthy)",
        &without_health,
    );
    row("healthy → every router acked (push and ack alone)", &pushed);
}

fn row(what: &str, sorted: &[u64]) {
    if sorted.is_empty() {
        println!("| {what} | - | - | - |");
        return;
    }
    let at =
        |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    println!(
        "| {what} | {} ms | {} ms | {} ms |",
        at(0.50),
        at(0.99),
        sorted[sorted.len() - 1]
    );
}

async fn wait_group(cloud: &Cloud, n: usize) {
    wait_for(
        &format!("the group to be {n} instances, all InService"),
        Duration::from_secs(60),
        || async {
            let states = cloud.lifecycle_states("bench").await;
            (states.len() == n && states.iter().all(|(_, s)| s == "InService")).then_some(())
        },
    )
    .await;
}
