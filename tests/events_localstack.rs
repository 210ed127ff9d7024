//! The event path on LocalStack: the operator's EventBridge rules
//! (`iam/event-patterns/`) on LocalStack's bus, targeting a LocalStack SQS queue
//! that the controller long-polls, while the Auto Scaling groups stay on moto
//! (LocalStack's free edition has no Auto Scaling). The controller is told
//! where SQS lives by the SDK's `AWS_ENDPOINT_URL_SQS`.
//!
//! moto emits no Auto Scaling events for groups without hooks, so the test
//! puts on the bus what Auto Scaling would for each real scale-out and
//! scale-in of the moto group: same source, detail-type, resources, detail.

mod common;

use std::time::Duration;

use common::{ids, wait_for, Backends, Cloud, Controller, Emulator, EventBus, LocalStack};

const PORT: u16 = 18290;

async fn group_arn(cloud: &Cloud, group: &str) -> String {
    cloud
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap()
        .auto_scaling_groups()[0]
        .auto_scaling_group_arn()
        .unwrap()
        .to_owned()
}

/// What Auto Scaling puts on the bus when an instance of `group` has
/// launched or terminated (`change` is "Launch" or "Terminate").
async fn put_instance_event(bus: &EventBus, arn: &str, group: &str, change: &str, id: &str) {
    let detail = serde_json::json!({
        "StatusCode": "InProgress",
        "AutoScalingGroupName": group,
        "ActivityId": format!("activity-{id}"),
        "Details": { "Availability Zone": "us-east-1a" },
        "RequestId": format!("request-{id}"),
        "EC2InstanceId": id,
        "Cause": "At 2026-12-01T00:00:00Z a user request changed the desired capacity.",
    });
    bus.put(
        "aws.autoscaling",
        &format!("EC2 Instance {change} Successful"),
        arn,
        detail,
    )
    .await;
}

async fn event_counts(controller: &Controller) -> serde_json::Value {
    controller.get("/readyz").await.1["events"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventbridge_events_on_localstack_trigger_a_reconcile_long_before_the_resync() {
    let (emulator, localstack) = tokio::join!(Emulator::start(), LocalStack::start());
    let cloud = Cloud::new(&emulator).await;
    let bus = EventBus::new(&localstack.endpoint()).await;
    let (queue, queue_arn) = bus.queue(&localstack.name("signpost-events"), &[]).await;
    bus.rules_to(&queue_arn).await;

    let mut backends = Backends::new(PORT);
    let tags = [("signpost:service", "users"), ("signpost:port", "18290")];
    cloud.create_group("users-a", &tags, 1).await;
    let arn = group_arn(&cloud, "users-a").await;
    let one = cloud.instances("users-a").await;
    backends.follow(&one).await;

    // A resync period far longer than the test: only events can explain a
    // change within it. moto is named by signpost's own general endpoint
    // setting (as `--endpoint-url`), which must not hide the SDK's
    // service-specific one for SQS.
    let extra = format!(
        "resync_interval = \"300s\"\n[events]\nqueue_url = \"{queue}\"\nwait_time = \"1s\""
    );
    let controller = Controller::start_with_env(
        &emulator,
        &extra,
        &[
            ("SIGNPOST_AWS_ENDPOINT_URL", &emulator.endpoint()),
            ("AWS_ENDPOINT_URL_SQS", &localstack.endpoint()),
        ],
    )
    .await;
    controller
        .wait_endpoints("users", "healthy", &ids(&one))
        .await;

    // Another producer's garbage in the queue: counted, deleted, and what
    // follows still flows.
    bus.sqs
        .send_message()
        .queue_url(&queue)
        .message_body("this is not an event")
        .send()
        .await
        .unwrap();
    // Not matched by the operator's rules: never reaches the queue.
    bus.put(
        "custom.inventory",
        "EC2 Instance Launch Successful",
        &arn,
        serde_json::json!({ "AutoScalingGroupName": "users-a" }),
    )
    .await;

    cloud.set_desired("users-a", 3).await;
    let three = cloud.instances("users-a").await;
    backends.follow(&three).await;
    let launched: Vec<String> = ids(&three)
        .into_iter()
        .filter(|id| !ids(&one).contains(id))
        .collect();
    for id in &launched {
        put_instance_event(&bus, &arn, "users-a", "Launch", id).await;
    }
    controller
        .wait_endpoints("users", "healthy", &ids(&three))
        .await;

    // To 2 of 3: the emulator terminates at once, without the Terminating
    // states AWS shows, and the mass-removal guard does not yet take a
    // terminate event as AWS's word, so a removal of more than half would
    // wait for three agreeing listings (see tests/controller.rs).
    cloud.set_desired("users-a", 2).await;
    let left = cloud.instances("users-a").await;
    let gone: Vec<String> = ids(&three)
        .into_iter()
        .filter(|id| !ids(&left).contains(id))
        .collect();
    for id in &gone {
        put_instance_event(&bus, &arn, "users-a", "Terminate", id).await;
    }
    controller
        .wait_endpoints("users", "healthy", &ids(&left))
        .await;

    let expected = (launched.len() + gone.len()) as u64;
    let counts = wait_for(
        "every event handled and the garbage counted",
        Duration::from_secs(10),
        || async {
            let events = event_counts(&controller).await;
            (events["handled"] == expected && events["malformed"] == 1).then_some(events)
        },
    )
    .await;
    assert_eq!(counts["receive_errors"], 0, "{counts}");
    wait_for("the queue to be empty", Duration::from_secs(10), || async {
        (bus.queued(&queue).await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_message_ends_in_the_dead_letter_queue_while_events_flow() {
    let (emulator, localstack) = tokio::join!(Emulator::start(), LocalStack::start());
    let cloud = Cloud::new(&emulator).await;
    let bus = EventBus::new(&localstack.endpoint()).await;
    let (dead, dead_arn) = bus
        .queue(&localstack.name("signpost-events-dlq"), &[])
        .await;
    let redrive = serde_json::json!({ "deadLetterTargetArn": dead_arn, "maxReceiveCount": 2 });
    // A short visibility timeout, so that the poisoned message comes back
    // (and reaches its receive limit) within the test.
    let (queue, queue_arn) = bus
        .queue(
            &localstack.name("signpost-events"),
            &[
                ("RedrivePolicy", &redrive.to_string()),
                ("VisibilityTimeout", "1"),
            ],
        )
        .await;
    bus.rules_to(&queue_arn).await;

    let mut backends = Backends::new(PORT + 1);
    let tags = [("signpost:service", "orders"), ("signpost:port", "18291")];
    cloud.create_group("orders-a", &tags, 1).await;
    let arn = group_arn(&cloud, "orders-a").await;
    let one = cloud.instances("orders-a").await;
    backends.follow(&one).await;

    let extra = format!(
        "resync_interval = \"300s\"\n[events]\nqueue_url = \"{queue}\"\nwait_time = \"1s\""
    );
    let controller = Controller::start_with_env(
        &emulator,
        &extra,
        &[("AWS_ENDPOINT_URL_SQS", &localstack.endpoint())],
    )
    .await;
    controller
        .wait_endpoints("orders", "healthy", &ids(&one))
        .await;

    let poison = "{\"detail-type\": 42}";
    bus.sqs
        .send_message()
        .queue_url(&queue)
        .message_body(poison)
        .send()
        .await
        .unwrap();
    cloud.set_desired("orders-a", 2).await;
    let two = cloud.instances("orders-a").await;
    backends.follow(&two).await;
    for id in ids(&two).iter().filter(|id| !ids(&one).contains(id)) {
        put_instance_event(&bus, &arn, "orders-a", "Launch", id).await;
    }
    controller
        .wait_endpoints("orders", "healthy", &ids(&two))
        .await;

    // With a redrive policy the controller leaves a malformed message to
    // the queue, which moves it to the dead-letter queue after
    // maxReceiveCount receives.
    let moved = wait_for(
        "the poisoned message in the dead-letter queue",
        Duration::from_secs(20),
        || async {
            let out = bus
                .sqs
                .receive_message()
                .queue_url(&dead)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            out.messages.unwrap_or_default().into_iter().next()
        },
    )
    .await;
    assert_eq!(moved.body(), Some(poison));
    wait_for("the queue to be empty", Duration::from_secs(10), || async {
        (bus.queued(&queue).await == 0).then_some(())
    })
    .await;
    let counts = event_counts(&controller).await;
    assert_eq!(counts["handled"], 1, "{counts}");
    assert_eq!(
        counts["malformed"], 2,
        "received maxReceiveCount times: {counts}"
    );
    assert_eq!(counts["receive_errors"], 0, "{counts}");
}
