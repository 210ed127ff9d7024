//! Auto Scaling and EC2 events from an SQS queue: hints that make the
//! controller reconcile now instead of at the next resync.
//!
//! Three shapes reach the queue: a lifecycle hook's own notification, an
//! EventBridge event (`aws.autoscaling` or `aws.ec2`), and either of those
//! wrapped in an SNS envelope. Events are hints, never the truth: the
//! reconcile that follows lists the fleet again, so duplicated, reordered or
//! stale events are harmless.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cloud::{CloudError, ErrorKind, Hints};
use crate::lifecycle::LifecycleLog;
use crate::model::{Ec2State, Transition};

/// What one message asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first message of a new hook; nothing to do.
    TestNotification { group: Option<String> },
    /// A lifecycle action is waiting (`Pending:Wait` / `Terminating:Wait`).
    LifecycleAction {
        group: String,
        instance: String,
        hook: String,
        transition: Transition,
        /// When AWS says the action began: the notification's `Time`
        /// (milliseconds), or an EventBridge event's `time` (seconds).
        time: Option<SystemTime>,
    },
    /// An instance of a group launched or terminated, or failed to.
    GroupActivity {
        group: String,
        instance: Option<String>,
    },
    /// An EC2 instance changed state; EC2 does not say which group.
    InstanceState { instance: String, state: Ec2State },
}

impl Event {
    /// The group the event is about, when the event says.
    pub fn group(&self) -> Option<&str> {
        match self {
            Event::TestNotification { group } => group.as_deref(),
            Event::LifecycleAction { group, .. } | Event::GroupActivity { group, .. } => {
                Some(group)
            }
            Event::InstanceState { .. } => None,
        }
    }

    /// The instance the event is about, when it names one.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Event::TestNotification { .. } => None,
            Event::LifecycleAction { instance, .. } | Event::InstanceState { instance, .. } => {
                Some(instance)
            }
            Event::GroupActivity { instance, .. } => instance.as_deref(),
        }
    }
}

/// Why a message could not be understood. Variant names double as metric labels.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EventError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("unknown message shape (no LifecycleTransition, Event or detail-type)")]
    UnknownShape,
    #[error("unsupported event {source_name}/{detail_type:?}")]
    Unsupported {
        source_name: String,
        detail_type: String,
    },
    #[error("field {0} missing or not a string")]
    MissingField(&'static str),
    #[error("unknown lifecycle transition {0:?}")]
    UnknownTransition(String),
}

/// Parses one SQS message body.
pub fn parse(body: &str) -> Result<Event, EventError> {
    let value: Value =
        serde_json::from_str(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    parse_value(&value)
}

fn parse_value(v: &Value) -> Result<Event, EventError> {
    // SNS envelope: the real message is a JSON string in "Message".
    if v.get("Type").and_then(Value::as_str) == Some("Notification") {
        let inner = str_field(v, "Message")?;
        return parse(inner);
    }
    if v.get("Event").and_then(Value::as_str) == Some("autoscaling:TEST_NOTIFICATION") {
        return Ok(Event::TestNotification {
            group: v
                .get("AutoScalingGroupName")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
    }
    if v.get("LifecycleTransition").is_some() {
        return lifecycle_action(v, v.get("Time"));
    }
    if let Some(detail_type) = v.get("detail-type").and_then(Value::as_str) {
        let source_name = v.get("source").and_then(Value::as_str).unwrap_or_default();
        let detail = v.get("detail").ok_or(EventError::MissingField("detail"))?;
        return match (source_name, detail_type) {
            ("aws.autoscaling", t) if t.ends_with("Lifecycle Action") => {
                lifecycle_action(detail, v.get("time"))
            }
            ("aws.autoscaling", t)
                if t.starts_with("EC2 Instance Launch")
                    || t.starts_with("EC2 Instance Terminate") =>
            {
                Ok(Event::GroupActivity {
                    group: str_field(detail, "AutoScalingGroupName")?.to_owned(),
                    instance: detail
                        .get("EC2InstanceId")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                })
            }
            ("aws.ec2", "EC2 Instance State-change Notification") => Ok(Event::InstanceState {
                instance: str_field(detail, "instance-id")?.to_owned(),
                state: str_field(detail, "state")?.into(),
            }),
            _ => Err(EventError::Unsupported {
                source_name: source_name.to_owned(),
                detail_type: detail_type.to_owned(),
            }),
        };
    }
    Err(EventError::UnknownShape)
}

fn lifecycle_action(v: &Value, time: Option<&Value>) -> Result<Event, EventError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Fields<'a> {
        lifecycle_transition: &'a str,
    }
    let Fields {
        lifecycle_transition,
    } = Fields::deserialize(v).map_err(|_| EventError::MissingField("LifecycleTransition"))?;
    let transition = Transition::from_aws(lifecycle_transition)
        .ok_or_else(|| EventError::UnknownTransition(lifecycle_transition.to_owned()))?;
    Ok(Event::LifecycleAction {
        group: str_field(v, "AutoScalingGroupName")?.to_owned(),
        instance: str_field(v, "EC2InstanceId")?.to_owned(),
        hook: str_field(v, "LifecycleHookName")?.to_owned(),
        transition,
        // A time we cannot read only costs the metric its start: not an error.
        time: time
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
    })
}

fn str_field<'a>(v: &'a Value, name: &'static str) -> Result<&'a str, EventError> {
    v.get(name)
        .and_then(Value::as_str)
        .ok_or(EventError::MissingField(name))
}

/// Counts of messages by outcome, for the API and metrics.
#[derive(Debug, Default, Serialize)]
pub struct EventCounts {
    pub handled: AtomicU64,
    pub malformed: AtomicU64,
    pub receive_errors: AtomicU64,
    /// Failed ReceiveMessage calls by kind, as the listing's failures are
    /// counted.
    pub receive_failures: Mutex<BTreeMap<ErrorKind, u64>>,
    /// While receiving fails, the last failure; none once a receive
    /// succeeds. Resync still runs meanwhile, so this is said, not fatal.
    pub receive_failing: Mutex<Option<ReceiveFailure>>,
}

/// A failed ReceiveMessage, named as `/readyz` names a failed listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReceiveFailure {
    pub api: &'static str,
    pub kind: ErrorKind,
    pub error: String,
}

impl EventCounts {
    fn received(&self) {
        *self.receive_failing.lock().expect("events lock") = None;
    }

    fn receive_failed(&self, error: &CloudError) {
        self.receive_errors.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.receive_failures.lock().expect("events lock");
        *failures.entry(error.kind).or_default() += 1;
        *self.receive_failing.lock().expect("events lock") = Some(ReceiveFailure {
            api: error.api,
            kind: error.kind,
            error: error.to_string(),
        });
    }
}

/// Long-polls the queue, asks for a reconcile after each batch that held an
/// event, and deletes what it has handled.
pub struct EventQueue {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    /// Seconds one ReceiveMessage waits for messages (SQS allows 0-20).
    pub wait: Duration,
    pub counts: Arc<EventCounts>,
    /// Where a lifecycle action's start time is left for `lifecycle`.
    pub lifecycle: Arc<LifecycleLog>,
    /// What the next listing fetches early (see `cloud::Hints`).
    pub hints: Arc<Hints>,
}

impl EventQueue {
    pub async fn run(self, trigger: Arc<Notify>, shutdown: CancellationToken) {
        let redrive = self.has_redrive_policy().await;
        info!(queue = %self.queue_url, redrive, "listening for Auto Scaling events");
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times();
        let mut backoff = retry.build();
        loop {
            let receive = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(self.wait.as_secs() as i32)
                .send();
            let received = tokio::select! {
                r = receive => r,
                _ = shutdown.cancelled() => return,
            };
            let messages = match received {
                Ok(out) => {
                    backoff = retry.build();
                    self.counts.received();
                    out.messages.unwrap_or_default()
                }
                Err(e) => {
                    let error = CloudError::from_sdk("ReceiveMessage", e);
                    self.counts.receive_failed(&error);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    warn!(queue = %self.queue_url, %error, kind = error.kind.label(), ?delay, "ReceiveMessage failed; resync still runs");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            let mut done = Vec::new();
            let mut wake = false;
            for message in &messages {
                let id = message.message_id().unwrap_or("?");
                match parse(message.body().unwrap_or_default()) {
                    Ok(event) => {
                        debug!(message_id = id, ?event, "event");
                        self.counts.handled.fetch_add(1, Ordering::Relaxed);
                        self.hints.add(event.group(), event.instance());
                        if let Event::LifecycleAction {
                            instance,
                            transition,
                            time: Some(time),
                            ..
                        } = &event
                        {
                            self.lifecycle.event_seen(instance, *transition, *time);
                        }
                        wake |= !matches!(event, Event::TestNotification { .. });
                    }
                    Err(error) => {
                        self.counts.malformed.fetch_add(1, Ordering::Relaxed);
                        warn!(message_id = id, %error, redrive, "malformed event message");
                        // With a redrive policy the queue moves it to its
                        // dead-letter queue after maxReceiveCount; without
                        // one, deleting is the only way not to block on it.
                        if redrive {
                            continue;
                        }
                    }
                }
                if let Some(handle) = message.receipt_handle() {
                    done.push(handle.to_owned());
                }
            }
            if wake {
                trigger.notify_one();
            }
            self.delete(done).await;
        }
    }

    async fn has_redrive_policy(&self) -> bool {
        match self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
        {
            Ok(out) => out
                .attributes()
                .is_some_and(|a| a.contains_key(&QueueAttributeName::RedrivePolicy)),
            Err(e) => {
                warn!(queue = %self.queue_url, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "GetQueueAttributes failed; assuming no redrive policy");
                false
            }
        }
    }

    async fn delete(&self, handles: Vec<String>) {
        if handles.is_empty() {
            return;
        }
        let entries = handles
            .into_iter()
            .enumerate()
            .map(|(n, handle)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(n.to_string())
                    .receipt_handle(handle)
                    .build()
                    .expect("id and handle set")
            })
            .collect();
        let result = self
            .sqs
            .delete_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await;
        // A message not deleted comes back after its visibility timeout and
        // is handled again: harmless, events are hints.
        match result {
            Ok(out) if !out.failed().is_empty() => {
                warn!(
                    failed = out.failed().len(),
                    "some handled messages were not deleted"
                )
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "DeleteMessageBatch failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_failure_is_named_until_a_receive_succeeds() {
        let counts = EventCounts::default();
        let error = CloudError::new("ReceiveMessage", ErrorKind::Unavailable, "InternalFailure");
        counts.receive_failed(&error);
        counts.receive_failed(&error);
        let readyz = serde_json::to_value(&counts).unwrap();
        assert_eq!(readyz["receive_errors"], 2);
        assert_eq!(readyz["receive_failures"]["unavailable"], 2);
        assert_eq!(readyz["receive_failing"]["api"], "ReceiveMessage");
        assert_eq!(readyz["receive_failing"]["kind"], "unavailable");
        counts.received();
        let readyz = serde_json::to_value(&counts).unwrap();
        assert_eq!(readyz["receive_failing"], serde_json::Value::Null);
        assert_eq!(readyz["receive_failures"]["unavailable"], 2, "counts stay");
    }

    const HOOK: &str = r#"{"Origin":"EC2","Destination":"AutoScalingGroup","Service":"AWS Auto Scaling",
        "Time":"2026-11-25T10:00:00.000Z","AccountId":"123456789012","RequestId":"r-1",
        "LifecycleHookName":"signpost-launch","AutoScalingGroupName":"users-a",
        "LifecycleActionToken":"tok-1","EC2InstanceId":"i-0abc",
        "LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING"}"#;

    #[test]
    fn hook_notification() {
        assert_eq!(
            parse(HOOK).unwrap(),
            Event::LifecycleAction {
                group: "users-a".into(),
                instance: "i-0abc".into(),
                hook: "signpost-launch".into(),
                transition: Transition::Launching,
                time: Some(humantime::parse_rfc3339("2026-11-25T10:00:00.000Z").unwrap()),
            }
        );
    }

    #[test]
    fn eventbridge_lifecycle_action_and_sns_envelope() {
        let eb = r#"{"version":"0","id":"e-1","detail-type":"EC2 Instance-terminate Lifecycle Action",
            "source":"aws.autoscaling","time":"2026-11-25T10:00:00Z","detail":{
            "LifecycleHookName":"drain","AutoScalingGroupName":"users-a","EC2InstanceId":"i-1",
            "LifecycleActionToken":"t","LifecycleTransition":"autoscaling:EC2_INSTANCE_TERMINATING"}}"#;
        let event = parse(eb).unwrap();
        assert!(matches!(
            event,
            Event::LifecycleAction {
                transition: Transition::Terminating,
                ..
            }
        ));
        let sns = serde_json::json!({"Type": "Notification", "Message": HOOK}).to_string();
        assert_eq!(parse(&sns).unwrap().group(), Some("users-a"));
    }

    #[test]
    fn test_notification_and_activity_events() {
        let test = r#"{"AccountId":"123456789012","RequestId":"r","AutoScalingGroupARN":"arn",
            "AutoScalingGroupName":"users-a","Service":"AWS Auto Scaling","Event":"autoscaling:TEST_NOTIFICATION",
            "Time":"2026-11-25T10:00:00Z"}"#;
        assert_eq!(
            parse(test).unwrap(),
            Event::TestNotification {
                group: Some("users-a".into())
            }
        );
        let launched = r#"{"source":"aws.autoscaling","detail-type":"EC2 Instance Launch Successful",
            "detail":{"AutoScalingGroupName":"users-a","EC2InstanceId":"i-9"}}"#;
        assert_eq!(parse(launched).unwrap().group(), Some("users-a"));
        let ec2 = r#"{"source":"aws.ec2","detail-type":"EC2 Instance State-change Notification",
            "detail":{"instance-id":"i-9","state":"stopping"}}"#;
        assert_eq!(
            parse(ec2).unwrap(),
            Event::InstanceState {
                instance: "i-9".into(),
                state: "stopping".into()
            }
        );
    }

    #[test]
    fn malformed_messages_say_what_is_wrong() {
        assert!(matches!(parse("not json"), Err(EventError::NotJson(_))));
        assert_eq!(parse("{}"), Err(EventError::UnknownShape));
        assert_eq!(
            parse(r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING"}"#),
            Err(EventError::MissingField("AutoScalingGroupName"))
        );
        assert_eq!(
            parse(r#"{"LifecycleTransition":"x","AutoScalingGroupName":"g"}"#),
            Err(EventError::UnknownTransition("x".into()))
        );
        let other = r#"{"source":"aws.s3","detail-type":"Object Created","detail":{}}"#;
        assert!(matches!(parse(other), Err(EventError::Unsupported { .. })));
    }
}
