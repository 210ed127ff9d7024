//! What one simulated AWS call costs: its latency, the client's call budget
//! (`aws.calls_per_second`, the real `CallBudget`), and AWS's throttling
//! with the SDK's retries.
//!
//! Throttling follows AWS's published model for EC2 (a token bucket per
//! account and API family: a burst, then a refill rate); a call that finds
//! the bucket empty is answered `Throttling` and retried by the SDK's
//! standard mode (up to `aws.max_attempts` attempts, waiting a random share
//! of 1 s, 2 s, 4 s, ... capped at 20 s), inside one counted call, as the
//! real SDK does: `CallCount` counts calls, `Calls::throttled` the attempts
//! AWS refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::cloud::{CallBudget, CloudError, ErrorKind};
use crate::config::AwsConfig;
use crate::sim::Rng;

/// The APIs the listing and the lifecycle make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    DescribeAutoScalingGroups,
    DescribeInstances,
    DescribeLifecycleHooks,
    /// CompleteLifecycleAction and RecordLifecycleActionHeartbeat.
    LifecycleAction,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::DescribeAutoScalingGroups => "DescribeAutoScalingGroups",
            Api::DescribeInstances => "DescribeInstances",
            Api::DescribeLifecycleHooks => "DescribeLifecycleHooks",
            Api::LifecycleAction => "CompleteLifecycleAction",
        }
    }

    fn is_ec2(self) -> bool {
        self == Api::DescribeInstances
    }
}

/// Round-trip time of one call (one page), by API.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// A page of up to 100 groups with their instances and tags.
    pub describe_auto_scaling_groups: Duration,
    /// Up to 100 instance ids.
    pub describe_instances: Duration,
    pub describe_lifecycle_hooks: Duration,
    pub lifecycle_action: Duration,
}

impl Latency {
    /// Assumed in-region round trips for full pages (large answers: a page
    /// of 100 groups lists every instance of each; 100 instances described
    /// are a few hundred kB of XML). Chosen, not measured: change them to
    /// see what a slower or faster region does.
    pub fn in_region() -> Latency {
        Latency {
            describe_auto_scaling_groups: Duration::from_millis(400),
            describe_instances: Duration::from_millis(250),
            describe_lifecycle_hooks: Duration::from_millis(60),
            lifecycle_action: Duration::from_millis(60),
        }
    }

    /// No latency at all: for tests of the call pattern alone.
    pub fn zero() -> Latency {
        Latency {
            describe_auto_scaling_groups: Duration::ZERO,
            describe_instances: Duration::ZERO,
            describe_lifecycle_hooks: Duration::ZERO,
            lifecycle_action: Duration::ZERO,
        }
    }

    fn of(&self, api: Api) -> Duration {
        match api {
            Api::DescribeAutoScalingGroups => self.describe_auto_scaling_groups,
            Api::DescribeInstances => self.describe_instances,
            Api::DescribeLifecycleHooks => self.describe_lifecycle_hooks,
            Api::LifecycleAction => self.lifecycle_action,
        }
    }
}

/// AWS's token bucket for one API family (Auto Scaling; EC2): `burst`
/// calls at once, then `per_second`. AWS documents EC2's as 100 and 20 for
/// describe calls; the account's other tools draw from the same bucket, so
/// the share left to signpost is what to set here.
#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    pub burst: f64,
    pub per_second: f64,
}

#[derive(Debug)]
struct Bucket {
    throttle: Throttle,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(throttle: Throttle) -> Bucket {
        Bucket {
            throttle,
            tokens: throttle.burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = (now - self.at).as_secs_f64() * self.throttle.per_second;
        self.tokens = (self.tokens + refill).min(self.throttle.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long a refusal takes to arrive: small, it carries no data.
const REFUSAL: Duration = Duration::from_millis(20);
/// The SDK's standard retry mode: backoff capped here.
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// The cost model every simulated call goes through.
pub struct Calls {
    latency: Latency,
    budget: CallBudget,
    max_attempts: u32,
    /// Per API family; `None`: AWS never throttles.
    autoscaling: Option<Mutex<Bucket>>,
    ec2: Option<Mutex<Bucket>>,
    rng: Mutex<Rng>,
    /// Set: calls cost nothing (no budget, latency or throttling), so that
    /// a benchmark can move through simulated time quickly.
    free: AtomicBool,
    /// Attempts AWS refused with `Throttling`.
    pub throttled: AtomicU64,
}

impl Calls {
    /// `aws` gives the budget (`calls_per_second`) and the retries
    /// (`max_attempts`), as for the real client.
    pub fn new(latency: Latency, aws: &AwsConfig, throttle: Option<Throttle>) -> Calls {
        Calls {
            latency,
            budget: CallBudget::new(aws),
            max_attempts: aws.max_attempts.max(1),
            autoscaling: throttle.map(|t| Mutex::new(Bucket::new(t))),
            ec2: throttle.map(|t| Mutex::new(Bucket::new(t))),
            rng: Mutex::new(Rng::new(7)),
            free: AtomicBool::new(false),
            throttled: AtomicU64::new(0),
        }
    }

    /// Calls cost nothing while `free` is set.
    pub fn set_free(&self, free: bool) {
        self.free.store(free, Ordering::Relaxed);
    }

    /// One call: waits its turn in the budget, then its attempts. An error
    /// only once every attempt was throttled.
    pub async fn call(&self, api: Api) -> Result<(), CloudError> {
        if self.free.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.budget.acquire().await;
        let bucket = if api.is_ec2() {
            &self.ec2
        } else {
            &self.autoscaling
        };
        for attempt in 0..self.max_attempts {
            let admitted = bucket
                .as_ref()
                .is_none_or(|b| b.lock().expect("bucket lock").take());
            if admitted {
                tokio::time::sleep(self.latency.of(api)).await;
                return Ok(());
            }
            self.throttled.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(REFUSAL).await;
            if attempt + 1 < self.max_attempts {
                let cap = Duration::from_secs(1 << attempt.min(5)).min(MAX_BACKOFF);
                let share = self.rng.lock().expect("rng lock").unit();
                tokio::time::sleep(cap.mul_f64(share)).await;
            }
        }
        let mut error = CloudError::new(api.name(), ErrorKind::Throttled, "Rate exceeded");
        error.code = Some("Throttling".into());
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_empty_bucket_is_retried_then_fails_as_throttled() {
        let aws = AwsConfig {
            calls_per_second: 1000.0,
            max_attempts: 3,
            ..AwsConfig::default()
        };
        let throttle = Throttle {
            burst: 2.0,
            per_second: 0.01,
        };
        let calls = Calls::new(Latency::zero(), &aws, Some(throttle));
        assert!(calls.call(Api::DescribeInstances).await.is_ok());
        assert!(calls.call(Api::DescribeInstances).await.is_ok());
        let err = calls.call(Api::DescribeInstances).await.unwrap_err();
        assert_eq!(
            (err.api, err.kind),
            ("DescribeInstances", ErrorKind::Throttled)
        );
        assert_eq!(calls.throttled.load(Ordering::Relaxed), 3);
        assert!(
            calls.call(Api::DescribeAutoScalingGroups).await.is_ok(),
            "Auto Scaling has a bucket of its own"
        );
    }
}
