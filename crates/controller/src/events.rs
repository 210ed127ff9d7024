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
use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cloud::{CloudError, ErrorKind, Hints};
use crate::lifecycle::LifecycleLog;

mod message;
pub use message::{parse, Event, EventError};

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
}
