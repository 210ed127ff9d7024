//! The controller's AWS side (`cloud::AwsFleet`) against the emulator: how
//! AWS's answers are sorted into error kinds, which lifecycle completion and
//! the sync metrics act on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use signpost_controller::cloud::{ActionCall, AutoScaling, AwsFleet, ErrorKind, Hints};
use signpost_controller::model::{HookResult, LifecycleAction, Transition};
use signpost_controller::Config;

use common::{wait_for, Cloud, Emulator};

/// The fleet on the emulator, one attempt per call and short timeouts, so
/// that a stalled emulator fails a call in seconds (the first answers of a
/// fresh emulator on a loaded machine take more than one).
async fn fleet(emulator: &Emulator) -> AwsFleet {
    let creds = aws_sdk_ec2::config::Credentials::new("test", "test", None, None, "test");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(emulator.endpoint())
        .credentials_provider(creds)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(3))
                .operation_timeout(Duration::from_secs(3))
                .build(),
        )
        .load()
        .await;
    AwsFleet::new(
        &shared,
        &signpost_controller::endpoints::Endpoints::default(),
        &Config::default(),
        Arc::new(Hints::default()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_aws_no_longer_holds_is_not_waiting_not_an_error() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    cloud
        .create_group("users-a", &[("signpost:service", "users")], 1)
        .await;
    let instance = wait_for("the instance in service", Duration::from_secs(10), || {
        let cloud = cloud.clone();
        async move {
            let states = cloud.lifecycle_states("users-a").await;
            states
                .iter()
                .find(|(_, s)| s == "InService")
                .map(|(id, _)| id.clone())
        }
    })
    .await;
    // The hook comes after the launch: nothing waits on it.
    cloud
        .put_hook("users-a", "signpost-launch", "launching", 60, "ABANDON")
        .await;
    let action = LifecycleAction {
        group: "users-a".into(),
        hook: "signpost-launch".into(),
        instance: instance.as_str().into(),
        transition: Transition::Launching,
    };
    let fleet = fleet(&emulator).await;
    assert_eq!(
        fleet
            .complete_action(&action, HookResult::Continue)
            .await
            .unwrap(),
        ActionCall::NotWaiting
    );
    assert_eq!(
        fleet.heartbeat(&action).await.unwrap(),
        ActionCall::NotWaiting
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_endpoint_is_a_timeout() {
    let emulator = Emulator::start().await;
    let fleet = fleet(&emulator).await;
    fleet
        .describe_fleet()
        .await
        .expect("a listing while it answers");
    emulator.pause();
    let err = fleet.describe_fleet().await.unwrap_err();
    emulator.resume();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert_eq!(err.api, "DescribeAutoScalingGroups");
}
