//! Events from SQS make the controller reconcile at once, long before the
//! next resync; malformed messages are counted and deleted, never fatal.

mod common;

use std::time::Duration;

use common::{ids, wait_for, Backends, Cloud, Controller, Emulator};

const PORT: u16 = common::BACKEND_PORT;

async fn queued(cloud: &Cloud, queue: &str) -> usize {
    common::queue_depth(&cloud.sqs, queue).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_trigger_a_reconcile_long_before_the_resync() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let queue = cloud.event_queue().await;
    let mut backends = Backends::new(PORT);
    let tags = [("signpost:service", "users"), ("signpost:port", "18080")];
    cloud.create_group("users-a", &tags, 1).await;
    backends.follow(&cloud.instances("users-a").await).await;

    // A resync period far longer than the test: only events can explain a
    // change within it.
    let extra = format!(
        "resync_interval = \"300s\"\n[events]\nqueue_url = \"{queue}\"\nwait_time = \"1s\""
    );
    let controller = Controller::start(&emulator, &extra).await;
    let one = cloud.instances("users-a").await;
    controller
        .wait_endpoints("users", "healthy", &ids(&one))
        .await;

    // The first message of a new hook is a test notification: recognised,
    // handled, nothing else happens.
    cloud
        .send_event(
            &queue,
            r#"{"Event":"autoscaling:TEST_NOTIFICATION","AutoScalingGroupName":"users-a"}"#,
        )
        .await;
    // Garbage is counted and deleted, and does not stop what follows.
    cloud.send_event(&queue, "this is not an event").await;

    cloud.set_desired("users-a", 3).await;
    let three = cloud.instances("users-a").await;
    backends.follow(&three).await;
    cloud
        .send_event(&queue, &common::launch_event("users-a", "i-any"))
        .await;
    controller
        .wait_endpoints("users", "healthy", &ids(&three))
        .await;

    // Duplicated and stale events are harmless: the truth is the listing.
    // (To 2 of 3: the emulator terminates at once, without the Terminating
    // states AWS shows, so a removal of more than half would be held by the
    // mass-removal guard, which tests/controller.rs covers.)
    cloud.set_desired("users-a", 2).await;
    let left = cloud.instances("users-a").await;
    for _ in 0..3 {
        cloud
            .send_event(&queue, &common::launch_event("users-a", "i-any"))
            .await;
    }
    controller
        .wait_endpoints("users", "healthy", &ids(&left))
        .await;

    let counts = wait_for(
        "every message handled or counted",
        Duration::from_secs(10),
        || async {
            let (_, body) = controller.get("/readyz").await;
            let events = body["events"].clone();
            (events["handled"] == 5 && events["malformed"] == 1).then_some(events)
        },
    )
    .await;
    assert_eq!(counts["receive_errors"], 0);
    let malformed = controller
        .metric(r#"signpost_events_total{result="malformed"}"#)
        .await;
    assert_eq!(malformed, Some(1.0));
    wait_for("the queue to be empty", Duration::from_secs(10), || async {
        (queued(&cloud, &queue).await == 0).then_some(())
    })
    .await;
}
