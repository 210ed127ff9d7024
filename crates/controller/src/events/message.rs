//! One SQS message body, read: the pure half of `events`, apart from the
//! queue so that it builds without the AWS SDK (`fuzz/` pulls this file in
//! by path and fuzzes it; `tests/fuzz_corpus.rs` replays its corpus).

use std::time::SystemTime;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

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

#[cfg(test)]
mod tests {
    use super::*;

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
