//! The AWS side: listing tagged Auto Scaling groups and their instances.
//!
//! One listing costs `ceil(groups / 100)` DescribeAutoScalingGroups calls and
//! `ceil(instances / 100)` DescribeInstances calls: calls grow with N/100.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_autoscaling::config::http::HttpResponse;
use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_autoscaling::types::Filter as AsgFilter;
use aws_sdk_ec2::types::Filter as Ec2Filter;
use serde::Serialize;
use thiserror::Error;
use tokio::time::Instant;

use crate::config::{AwsConfig, Config};
use crate::endpoints::Endpoints;
use crate::model::{
    Ec2Instance, Fleet, HookResult, LifecycleAction, LifecycleHook, LifecycleState, ObservedGroup,
    ObservedInstance, Transition,
};
use crate::tags;

/// DescribeInstances calls a listing has in flight at once. One after the
/// other, the 100 calls of 10,000 instances took most of a 30 s resync at
/// a quarter of a second each (README, "Scale"); `aws.calls_per_second`
/// still bounds the rate.
pub(crate) const INSTANCE_LANES: usize = 4;

/// Ids per DescribeInstances call. The `instance-id` filter is used rather
/// than `InstanceIds`, so that an id AWS no longer knows does not fail the
/// whole batch.
pub(crate) const INSTANCE_BATCH: usize = 100;

/// A failed AWS call: which API, what kind of failure (what callers and
/// metrics act on), and AWS's own code and message.
#[derive(Debug, Error)]
#[error("{api} {}: {}", if *.kind == ErrorKind::Throttled { "throttled after retries" } else { "failed" }, self.detail())]
pub struct CloudError {
    pub api: &'static str,
    pub kind: ErrorKind,
    /// AWS's error code (`ThrottlingException`, `AccessDenied`, ...), when
    /// it sent one.
    pub code: Option<String>,
    /// AWS's message, or what went wrong before an answer came.
    pub message: String,
    /// The SDK's error, for whoever wants the whole chain.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// What kind of failure an AWS call met. The names double as the `kind`
/// label of `signpost_sync_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// AWS asked us to slow down and the SDK's retries ran out.
    Throttled,
    /// Credentials missing, expired or not allowed the call.
    Denied,
    /// No answer within `aws.attempt_timeout` / `aws.operation_timeout`.
    Timeout,
    /// What the call names does not exist (for a lifecycle action: it is
    /// no longer waiting).
    NotFound,
    /// AWS answered with a server error (HTTP 5xx: `InternalFailure`,
    /// `ServiceUnavailable`): its side, not our request.
    Unavailable,
    /// No answer at all: the connection was refused or reset before a
    /// response began.
    Connection,
    /// An answer that could not be read: its body cut short, or not the
    /// protocol's XML or JSON.
    Malformed,
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::Throttled,
        ErrorKind::Denied,
        ErrorKind::Timeout,
        ErrorKind::NotFound,
        ErrorKind::Unavailable,
        ErrorKind::Connection,
        ErrorKind::Malformed,
        ErrorKind::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Denied => "denied",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Connection => "connection",
            ErrorKind::Malformed => "malformed",
            ErrorKind::Other => "other",
        }
    }

    /// The kind of an error AWS answered with `code` and `message`.
    fn of(code: &str, message: &str) -> ErrorKind {
        const DENIED: [&str; 10] = [
            "AccessDenied",
            "AccessDeniedException",
            "UnauthorizedOperation",
            "AuthFailure",
            "InvalidClientTokenId",
            "UnrecognizedClientException",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "ExpiredTokenException",
            "MissingAuthenticationToken",
        ];
        const NOT_FOUND: [&str; 2] = [
            "AWS.SimpleQueueService.NonExistentQueue",
            "QueueDoesNotExist",
        ];
        if code.contains("Throttl")
            || code == "RequestLimitExceeded"
            || code == "ProvisionedThroughputExceededException"
        {
            ErrorKind::Throttled
        } else if DENIED.contains(&code) {
            ErrorKind::Denied
        } else if code.ends_with("NotFound")
            || NOT_FOUND.contains(&code)
            // Auto Scaling has no code of its own for an action that no
            // longer waits: a ValidationError with this wording is how it
            // says so (and how AWS's own tools recognise it). Read here
            // once, so that callers match on the kind.
            || (code == "ValidationError" && message.starts_with("No active Lifecycle Action"))
        {
            ErrorKind::NotFound
        } else {
            ErrorKind::Other
        }
    }
}

impl CloudError {
    /// An error of `kind` without an SDK error behind it (fakes, tests).
    pub fn new(api: &'static str, kind: ErrorKind, message: impl Into<String>) -> CloudError {
        CloudError {
            api,
            kind,
            code: None,
            message: message.into(),
            source: None,
        }
    }

    fn detail(&self) -> String {
        match &self.code {
            Some(code) => format!("{code}: {}", self.message),
            None => self.message.clone(),
        }
    }

    pub(crate) fn from_sdk<E>(api: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map_or(0, |r| r.status().as_u16());
        let (code, message) = match &err {
            SdkError::ServiceError(_) => match (err.code(), err.message()) {
                (Some(code), message) => (
                    Some(code.to_owned()),
                    message.unwrap_or_default().to_owned(),
                ),
                // An error body the SDK could not parse (some emulators answer
                // every service in EC2's XML): read Code and Message ourselves
                // rather than dumping the raw response into logs and /readyz.
                (None, _) => {
                    let raw = err.raw_response();
                    let body = raw
                        .and_then(|r| r.body().bytes())
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    match (xml_field(&body, "Code"), xml_field(&body, "Message")) {
                        (Some(code), message) => (
                            Some(code.to_owned()),
                            message.unwrap_or_default().to_owned(),
                        ),
                        (None, _) => (None, format!("HTTP {status}: {}", excerpt(&body))),
                    }
                }
            },
            SdkError::TimeoutError(_) => (
                None,
                "timed out (see aws.attempt_timeout and aws.operation_timeout)".to_owned(),
            ),
            // The SDK's own chain repeats every layer and the raw response;
            // what an operator needs is the cause at the bottom of it.
            SdkError::DispatchFailure(_) => (None, format!("no answer: {}", root_cause(&err))),
            SdkError::ResponseError(_) => (
                None,
                format!("answer (HTTP {status}) unreadable: {}", root_cause(&err)),
            ),
            _ => (None, DisplayErrorContext(&err).to_string()),
        };
        let kind = match (&err, &code) {
            (SdkError::TimeoutError(_), _) => ErrorKind::Timeout,
            (SdkError::DispatchFailure(_), _) => ErrorKind::Connection,
            (SdkError::ResponseError(_), _) => ErrorKind::Malformed,
            (_, Some(code)) => match ErrorKind::of(code, &message) {
                ErrorKind::Other if status >= 500 => ErrorKind::Unavailable,
                kind => kind,
            },
            (SdkError::ServiceError(_), None) if status >= 500 => ErrorKind::Unavailable,
            // An answer that is neither the operation's output nor an error
            // the SDK could read (a 200 with an HTML page, a proxy's own
            // text): unreadable.
            (SdkError::ServiceError(_), None) => ErrorKind::Malformed,
            (_, None) => ErrorKind::Other,
        };
        CloudError {
            api,
            kind,
            code,
            message,
            source: Some(Box::new(err)),
        }
    }
}

/// The innermost error of a chain, e.g. `Connection reset by peer (os
/// error 104)` under the SDK's dispatch failure.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

fn xml_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let len = body[start..].find(&format!("</{name}>"))?;
    Some(body[start..start + len].trim())
}

fn excerpt(body: &str) -> String {
    let flat = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &flat[..cut]),
        None => flat,
    }
}

/// AWS calls made by one listing, by API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallCount {
    pub describe_auto_scaling_groups: u32,
    pub describe_instances: u32,
    /// Only for groups with an instance waiting on a hook.
    pub describe_lifecycle_hooks: u32,
}

impl CallCount {
    pub fn total(&self) -> u32 {
        self.describe_auto_scaling_groups + self.describe_instances + self.describe_lifecycle_hooks
    }
}

/// What AWS made of a completion or heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionCall {
    Done,
    /// AWS knows no such waiting action: it was completed already (by us
    /// before a restart, by someone else, or by its timeout). Not an error:
    /// completing twice must be harmless.
    NotWaiting,
}

/// The Auto Scaling fleet as signpost sees it, and the lifecycle actions it
/// may complete.
pub trait AutoScaling: Send + Sync + 'static {
    /// Lists every group tagged `signpost:service` with its instances. Either
    /// the whole listing or an error: never a partial fleet.
    fn describe_fleet(&self)
        -> impl Future<Output = Result<(Fleet, CallCount), CloudError>> + Send;

    /// CompleteLifecycleAction by instance id.
    fn complete_action(
        &self,
        action: &LifecycleAction,
        result: HookResult,
    ) -> impl Future<Output = Result<ActionCall, CloudError>> + Send;

    /// RecordLifecycleActionHeartbeat by instance id: restarts the hook's
    /// heartbeat timeout.
    fn heartbeat(
        &self,
        action: &LifecycleAction,
    ) -> impl Future<Output = Result<ActionCall, CloudError>> + Send;
}

/// AWS's answer to a completion or heartbeat for an action it no longer
/// holds (see `ErrorKind::of`).
fn not_waiting(err: &CloudError) -> bool {
    err.kind == ErrorKind::NotFound
}

/// The SDK configuration from the standard chain (env, profile, IRSA, IMDS),
/// with timeouts set: the SDK has no read timeout of its own. Endpoints are
/// left to `endpoints::Endpoints`: given to the loader, `aws.endpoint_url`
/// would hide the SDK's service-specific endpoints.
pub async fn sdk_config(aws: &AwsConfig) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(aws.max_attempts))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(aws.attempt_timeout)
                .operation_timeout(aws.operation_timeout)
                .build(),
        );
    if let Some(region) = &aws.region {
        loader = loader.region(Region::new(region.clone()));
    }
    loader.load().await
}

/// How long the hooks read for a group are used before they are read again.
/// Hooks change rarely (with a deploy), while at 1 % churn a minute most
/// groups have an instance held by a hook at most listings: read at every
/// listing, they cost a DescribeLifecycleHooks per such group, about 60 a
/// listing at 10,000 instances in 500 groups (README, "Scale"). A change is
/// seen sooner where it matters: a group an event names is read at once,
/// and so is a group with an instance held for a transition its cached
/// hooks have no hook of (one added since).
pub(crate) const HOOKS_FRESH: Duration = Duration::from_secs(30 * 60);

/// The hooks of each group as last read, and when (see `HOOKS_FRESH`).
#[derive(Debug, Default)]
pub(crate) struct HookCache {
    read: HashMap<String, (Instant, Vec<LifecycleHook>)>,
}

impl HookCache {
    pub(crate) fn store(&mut self, group: &str, hooks: &[LifecycleHook], now: Instant) {
        self.read.insert(group.to_owned(), (now, hooks.to_vec()));
    }

    /// For each group with instances held for `transitions`: its hooks into
    /// `known` when they are known already or the cache may answer; else
    /// its name in the list returned, of groups to read.
    pub(crate) fn answer<'a>(
        &self,
        waiting: impl IntoIterator<Item = (&'a str, BTreeSet<Transition>)>,
        known: &mut HashMap<String, Vec<LifecycleHook>>,
        now: Instant,
    ) -> Vec<String> {
        let mut to_read = Vec::new();
        for (group, transitions) in waiting {
            if known.contains_key(group) {
                continue;
            }
            let cached = self.read.get(group).filter(|(at, hooks)| {
                now.saturating_duration_since(*at) < HOOKS_FRESH
                    && transitions
                        .iter()
                        .all(|t| hooks.iter().any(|h| h.transition == *t))
            });
            match cached {
                Some((_, hooks)) => {
                    known.insert(group.to_owned(), hooks.clone());
                }
                None => to_read.push(group.to_owned()),
            }
        }
        to_read
    }

    /// Forgets the groups no longer listed.
    pub(crate) fn keep_only(&mut self, listed: &HashSet<&str>) {
        self.read.retain(|group, _| listed.contains(group.as_str()));
    }
}

/// The real thing, through the AWS SDK.
pub struct AwsFleet {
    autoscaling: aws_sdk_autoscaling::Client,
    ec2: aws_sdk_ec2::Client,
    default_port: Option<u16>,
    budget: CallBudget,
    hints: Arc<Hints>,
    /// The instance ids of the last listing, described again beside the
    /// next group listing rather than after it.
    last_ids: Mutex<BTreeSet<String>>,
    hook_cache: Mutex<HookCache>,
}

/// What events named since the last listing: instances to describe and
/// groups whose hooks to read while the groups are being listed, so that
/// the listing an event triggers takes one round trip to AWS, not two.
#[derive(Debug, Default)]
pub struct Hints {
    inner: Mutex<Hinted>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Hinted {
    instances: BTreeSet<String>,
    groups: BTreeSet<String>,
}

/// Hints kept between two listings at most: events about the whole account
/// (EC2 state changes of every instance) must not grow the next listing
/// without bound. What is dropped is only fetched a round trip later.
const HINTS_KEPT: usize = 100;

impl Hints {
    pub fn add(&self, group: Option<&str>, instance: Option<&str>) {
        let mut inner = self.inner.lock().expect("hints lock");
        if let Some(id) = instance.filter(|_| inner.instances.len() < HINTS_KEPT) {
            inner.instances.insert(id.to_owned());
        }
        if let Some(name) = group.filter(|_| inner.groups.len() < HINTS_KEPT / 10) {
            inner.groups.insert(name.to_owned());
        }
    }

    fn take(&self) -> Hinted {
        std::mem::take(&mut *self.inner.lock().expect("hints lock"))
    }
}

impl AwsFleet {
    pub fn new(
        shared: &aws_config::SdkConfig,
        endpoints: &Endpoints,
        config: &Config,
        hints: Arc<Hints>,
    ) -> AwsFleet {
        AwsFleet {
            autoscaling: aws_sdk_autoscaling::Client::from_conf(endpoints.autoscaling(shared)),
            ec2: aws_sdk_ec2::Client::from_conf(endpoints.ec2(shared)),
            default_port: config.default_port,
            budget: CallBudget::new(&config.aws),
            hints,
            last_ids: Mutex::default(),
            hook_cache: Mutex::default(),
        }
    }

    /// DescribeLifecycleHooks for each of `groups`.
    async fn hooks_of(
        &self,
        groups: impl IntoIterator<Item = String>,
        calls: &mut CallCount,
    ) -> Result<HashMap<String, Vec<LifecycleHook>>, CloudError> {
        let mut hooks = HashMap::new();
        for name in groups {
            let found = self.lifecycle_hooks(&name, calls).await?;
            hooks.insert(name, found);
        }
        Ok(hooks)
    }

    /// DescribeInstances for `ids`, none when there are none.
    async fn describe_some(
        &self,
        ids: &[String],
        calls: &mut CallCount,
    ) -> Result<Vec<(String, Ec2Instance)>, CloudError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.describe_instances(ids, calls).await
    }

    async fn list_groups(
        &self,
        calls: &mut CallCount,
    ) -> Result<Vec<aws_sdk_autoscaling::types::AutoScalingGroup>, CloudError> {
        let mut groups = Vec::new();
        let mut next_token = None;
        loop {
            self.budget.acquire().await;
            calls.describe_auto_scaling_groups += 1;
            let page = self
                .autoscaling
                .describe_auto_scaling_groups()
                .filters(
                    AsgFilter::builder()
                        .name("tag-key")
                        .values(tags::SERVICE)
                        .build(),
                )
                .max_records(100)
                .set_next_token(next_token)
                .send()
                .await
                .map_err(|e| CloudError::from_sdk("DescribeAutoScalingGroups", e))?;
            groups.extend(page.auto_scaling_groups.unwrap_or_default());
            next_token = page.next_token.filter(|t| !t.is_empty());
            if next_token.is_none() {
                return Ok(groups);
            }
        }
    }

    /// DescribeInstances for `ids` in batches of 100, `INSTANCE_LANES`
    /// batches at a time.
    async fn describe_instances(
        &self,
        ids: &[String],
        calls: &mut CallCount,
    ) -> Result<Vec<(String, Ec2Instance)>, CloudError> {
        let batches: Vec<&[String]> = ids.chunks(INSTANCE_BATCH).collect();
        let lane = |k: usize| {
            let mine: Vec<&[String]> = batches
                .iter()
                .skip(k)
                .step_by(INSTANCE_LANES)
                .copied()
                .collect();
            async move {
                let mut count = CallCount::default();
                let mut found = Vec::new();
                for batch in mine {
                    found.extend(self.describe_batch(batch, &mut count).await?);
                }
                Ok::<_, CloudError>((found, count))
            }
        };
        // As many as INSTANCE_LANES.
        let lanes = tokio::try_join!(lane(0), lane(1), lane(2), lane(3))?;
        let mut found = Vec::with_capacity(ids.len());
        for (some, count) in [lanes.0, lanes.1, lanes.2, lanes.3] {
            found.extend(some);
            calls.describe_instances += count.describe_instances;
        }
        Ok(found)
    }

    async fn describe_batch(
        &self,
        batch: &[String],
        calls: &mut CallCount,
    ) -> Result<Vec<(String, Ec2Instance)>, CloudError> {
        let mut found = Vec::with_capacity(batch.len());
        let mut next_token = None;
        loop {
            self.budget.acquire().await;
            calls.describe_instances += 1;
            let page = self
                .ec2
                .describe_instances()
                .filters(
                    Ec2Filter::builder()
                        .name("instance-id")
                        .set_values(Some(batch.to_vec()))
                        .build(),
                )
                .max_results(1000)
                .set_next_token(next_token)
                .send()
                .await
                .map_err(|e| CloudError::from_sdk("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map_or("unknown", |n| n.as_str())
                    .into();
                let private_ip = instance
                    .private_ip_address()
                    .and_then(|a| a.parse::<IpAddr>().ok());
                let launch_time = instance
                    .launch_time()
                    .and_then(|t| SystemTime::try_from(*t).ok());
                found.push((
                    id.to_owned(),
                    Ec2Instance {
                        state,
                        private_ip,
                        launch_time,
                    },
                ));
            }
            next_token = page.next_token.filter(|t| !t.is_empty());
            if next_token.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

impl AwsFleet {
    async fn lifecycle_hooks(
        &self,
        group: &str,
        calls: &mut CallCount,
    ) -> Result<Vec<LifecycleHook>, CloudError> {
        self.budget.acquire().await;
        calls.describe_lifecycle_hooks += 1;
        let answer = self
            .autoscaling
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(|e| CloudError::from_sdk("DescribeLifecycleHooks", e))?;
        Ok(answer
            .lifecycle_hooks()
            .iter()
            .filter_map(|h| {
                Some(LifecycleHook {
                    name: h.lifecycle_hook_name()?.to_owned(),
                    transition: Transition::from_aws(h.lifecycle_transition()?)?,
                    heartbeat_timeout: Duration::from_secs(
                        h.heartbeat_timeout().unwrap_or(3600).max(1) as u64,
                    ),
                })
            })
            .collect())
    }

    fn action_call<T, E>(
        &self,
        api: &'static str,
        action: &LifecycleAction,
        sent: Result<T, SdkError<E, HttpResponse>>,
    ) -> Result<ActionCall, CloudError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match sent.map_err(|e| CloudError::from_sdk(api, e)) {
            Ok(_) => Ok(ActionCall::Done),
            Err(e) if not_waiting(&e) => {
                tracing::debug!(group = %action.group, instance = %action.instance, hook = %action.hook, error = %e, "no such waiting action; taken as done");
                Ok(ActionCall::NotWaiting)
            }
            Err(e) => Err(e),
        }
    }
}

impl AutoScaling for AwsFleet {
    async fn complete_action(
        &self,
        action: &LifecycleAction,
        result: HookResult,
    ) -> Result<ActionCall, CloudError> {
        self.budget.acquire().await;
        let sent = self
            .autoscaling
            .complete_lifecycle_action()
            .auto_scaling_group_name(&action.group)
            .lifecycle_hook_name(&action.hook)
            .instance_id(action.instance.as_str())
            .lifecycle_action_result(result.as_aws())
            .send()
            .await;
        self.action_call("CompleteLifecycleAction", action, sent)
    }

    async fn heartbeat(&self, action: &LifecycleAction) -> Result<ActionCall, CloudError> {
        self.budget.acquire().await;
        let sent = self
            .autoscaling
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&action.group)
            .lifecycle_hook_name(&action.hook)
            .instance_id(action.instance.as_str())
            .send()
            .await;
        self.action_call("RecordLifecycleActionHeartbeat", action, sent)
    }

    async fn describe_fleet(&self) -> Result<(Fleet, CallCount), CloudError> {
        // Round one: the groups, and beside them the instances we expect
        // (last listing's and those events named) and the hooks of groups
        // events named. Round two only for what round one did not foresee.
        let hinted = self.hints.take();
        let mut expected = self.last_ids.lock().expect("ids lock").clone();
        expected.extend(hinted.instances);
        let expected: Vec<String> = expected.into_iter().collect();
        let (mut calls, mut early_calls, mut hook_calls) = Default::default();
        // A hinted group may be no group of ours, or gone: its hooks are
        // then simply read in round two if needed, never a failed listing.
        let early_hooks = async {
            let mut hooks = HashMap::new();
            for name in hinted.groups {
                if let Ok(found) = self.lifecycle_hooks(&name, &mut hook_calls).await {
                    hooks.insert(name, found);
                }
            }
            Ok(hooks)
        };
        let (groups, early, mut hooks) = tokio::try_join!(
            self.list_groups(&mut calls),
            self.describe_some(&expected, &mut early_calls),
            early_hooks,
        )?;
        let ids: BTreeSet<String> = groups
            .iter()
            .flat_map(|g| g.instances())
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        let unforeseen: Vec<String> = ids
            .iter()
            .filter(|id| expected.binary_search(id).is_err())
            .cloned()
            .collect();
        // Hooks only matter while an instance waits on one, so only those
        // groups need them, and the cache answers for most of them.
        let waiting = groups.iter().filter_map(|g| {
            let held: BTreeSet<Transition> = g
                .instances()
                .iter()
                .filter_map(|i| LifecycleState::from(i.lifecycle_state()?.as_str()).held_for())
                .collect();
            Some((g.auto_scaling_group_name()?, held)).filter(|(_, held)| !held.is_empty())
        });
        let now = Instant::now();
        let to_read = {
            let mut cache = self.hook_cache.lock().expect("hooks lock");
            for (group, found) in &hooks {
                cache.store(group, found, now);
            }
            cache.answer(waiting, &mut hooks, now)
        };
        let mut late_calls = CallCount::default();
        let (late, more_hooks) = tokio::try_join!(
            self.describe_some(&unforeseen, &mut late_calls),
            self.hooks_of(to_read, &mut hook_calls),
        )?;
        {
            let mut cache = self.hook_cache.lock().expect("hooks lock");
            for (group, found) in &more_hooks {
                cache.store(group, found, now);
            }
            cache.keep_only(
                &groups
                    .iter()
                    .filter_map(|g| g.auto_scaling_group_name())
                    .collect(),
            );
        }
        hooks.extend(more_hooks);
        calls.describe_instances = early_calls.describe_instances + late_calls.describe_instances;
        calls.describe_lifecycle_hooks = hook_calls.describe_lifecycle_hooks;
        let mut ec2: HashMap<String, Ec2Instance> = early.into_iter().chain(late).collect();
        *self.last_ids.lock().expect("ids lock") = ids;

        let groups = groups
            .into_iter()
            .map(|g| {
                let tag_pairs: Vec<(&str, &str)> = g
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?, t.value().unwrap_or_default())))
                    .collect();
                let (service, settings) =
                    match tags::parse(tag_pairs.iter().copied(), self.default_port) {
                        Ok((name, settings)) => (Some(name), Ok(settings)),
                        Err(e) => (
                            tags::service_name(tag_pairs.iter().copied()).and_then(Result::ok),
                            Err(e.to_string()),
                        ),
                    };
                let instances = g
                    .instances()
                    .iter()
                    .filter_map(|i| {
                        let id = i.instance_id()?;
                        Some(ObservedInstance {
                            id: id.into(),
                            lifecycle_state: i.lifecycle_state().map_or("", |s| s.as_str()).into(),
                            zone: i.availability_zone().unwrap_or_default().to_owned(),
                            ec2: ec2.remove(id),
                        })
                    })
                    .collect();
                let name = g.auto_scaling_group_name().unwrap_or_default().to_owned();
                ObservedGroup {
                    hooks: hooks.remove(&name).unwrap_or_default(),
                    name,
                    service,
                    settings,
                    instances,
                }
            })
            .collect();
        Ok((Fleet { groups }, calls))
    }
}

/// A budget of AWS calls per second with a burst of one second's worth
/// (the generic cell rate algorithm): calls beyond it wait their turn rather
/// than draw throttling errors that would slow every tool in the account.
/// Shared with the simulated fleet (`sim`), so that it spaces calls alike.
pub(crate) struct CallBudget {
    interval: Duration,
    burst: Duration,
    /// The theoretical time of the next call; a std mutex, never held across
    /// an await.
    next: Mutex<Instant>,
}

impl CallBudget {
    pub(crate) fn new(aws: &AwsConfig) -> CallBudget {
        CallBudget {
            interval: Duration::from_secs_f64(1.0 / aws.calls_per_second),
            burst: Duration::from_secs(1),
            next: Mutex::new(Instant::now()),
        }
    }

    pub(crate) async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().expect("budget lock");
            let now = Instant::now();
            let earliest = now.checked_sub(self.burst).unwrap_or(now);
            let slot = (*next).max(earliest);
            *next = slot + self.interval;
            slot.max(now)
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// An in-memory fleet for unit tests: answers what it was last given, and
/// records the lifecycle calls made to it.
#[cfg(any(test, feature = "testing"))]
#[derive(Default)]
pub struct FakeAutoScaling {
    pub answer: Mutex<Option<Result<Fleet, String>>>,
    /// Every completion, in order.
    pub completed: Mutex<Vec<(LifecycleAction, HookResult)>>,
    /// Every heartbeat, in order.
    pub heartbeats: Mutex<Vec<LifecycleAction>>,
    /// Set: lifecycle calls fail with this message.
    pub action_error: Mutex<Option<String>>,
}

#[cfg(any(test, feature = "testing"))]
impl FakeAutoScaling {
    pub fn set(&self, answer: Result<Fleet, String>) {
        *self.answer.lock().unwrap() = Some(answer);
    }

    fn action_answer(&self, api: &'static str) -> Result<ActionCall, CloudError> {
        match self.action_error.lock().unwrap().clone() {
            Some(message) => Err(CloudError::new(api, ErrorKind::Other, message)),
            None => Ok(ActionCall::Done),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl AutoScaling for FakeAutoScaling {
    async fn complete_action(
        &self,
        action: &LifecycleAction,
        result: HookResult,
    ) -> Result<ActionCall, CloudError> {
        let answer = self.action_answer("CompleteLifecycleAction");
        if answer.is_ok() {
            let mut completed = self.completed.lock().unwrap();
            completed.push((action.clone(), result));
        }
        answer
    }

    async fn heartbeat(&self, action: &LifecycleAction) -> Result<ActionCall, CloudError> {
        let answer = self.action_answer("RecordLifecycleActionHeartbeat");
        if answer.is_ok() {
            self.heartbeats.lock().unwrap().push(action.clone());
        }
        answer
    }

    async fn describe_fleet(&self) -> Result<(Fleet, CallCount), CloudError> {
        let answer = self.answer.lock().unwrap().clone();
        match answer {
            Some(Ok(fleet)) => Ok((fleet, CallCount::default())),
            Some(Err(message)) => Err(CloudError::new("Fake", ErrorKind::Other, message)),
            None => Err(CloudError::new("Fake", ErrorKind::Other, "no answer set")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparsed_error_bodies_are_read_for_code_and_message() {
        let body = "<Response><Errors><Error><Code>AccessDenied</Code>\n<Message>User: x is not authorized to perform: autoscaling:DescribeAutoScalingGroups</Message></Error></Errors></Response>";
        assert_eq!(xml_field(body, "Code"), Some("AccessDenied"));
        assert!(xml_field(body, "Message")
            .unwrap()
            .ends_with("autoscaling:DescribeAutoScalingGroups"));
        assert_eq!(xml_field("<html>oops</html>", "Code"), None);
        assert_eq!(excerpt(&"a ".repeat(400)).len(), 303);
    }

    #[test]
    fn hints_are_taken_once_and_bounded() {
        let hints = Hints::default();
        hints.add(Some("web"), Some("i-1"));
        hints.add(Some("web"), None);
        for n in 0..500 {
            hints.add(Some(&format!("g-{n}")), Some(&format!("i-{n}")));
        }
        let taken = hints.take();
        assert!(taken.instances.contains("i-1") && taken.groups.contains("web"));
        assert_eq!(
            (taken.instances.len(), taken.groups.len()),
            (HINTS_KEPT, HINTS_KEPT / 10)
        );
        assert_eq!(hints.take(), Hinted::default(), "taken: nothing left");
    }

    #[test]
    fn aws_codes_are_sorted_into_kinds() {
        let no_action = "No active Lifecycle Action found with instance ID i-0abc";
        for (code, message, kind) in [
            ("ValidationError", no_action, ErrorKind::NotFound),
            (
                "ValidationError",
                "Group users-a not found",
                ErrorKind::Other,
            ),
            ("InvalidInstanceID.NotFound", "", ErrorKind::NotFound),
            ("AccessDenied", "not authorized", ErrorKind::Denied),
            ("UnauthorizedOperation", "", ErrorKind::Denied),
            ("ExpiredToken", "", ErrorKind::Denied),
            ("Throttling", "Rate exceeded", ErrorKind::Throttled),
            ("RequestLimitExceeded", "", ErrorKind::Throttled),
            ("InternalFailure", no_action, ErrorKind::Other),
        ] {
            assert_eq!(ErrorKind::of(code, message), kind, "{code}: {message}");
        }
    }

    #[test]
    fn sdk_failures_name_their_kind_and_cause() {
        use aws_sdk_autoscaling::error::{ConnectorError, ErrorMetadata};
        use aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsError as E;
        let api = "DescribeAutoScalingGroups";
        let raw = |status: u16, body: &'static str| {
            HttpResponse::new(status.try_into().unwrap(), body.into())
        };
        let coded =
            |code: &str| E::generic(ErrorMetadata::builder().code(code).message("m").build());
        let reset = || {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "Connection reset by peer",
            )
        };
        let cases: Vec<(SdkError<E, HttpResponse>, ErrorKind, &str)> = vec![
            (
                SdkError::service_error(coded("Throttling"), raw(400, "")),
                ErrorKind::Throttled,
                "Throttling: m",
            ),
            (
                SdkError::service_error(coded("RequestLimitExceeded"), raw(503, "")),
                ErrorKind::Throttled,
                "RequestLimitExceeded: m",
            ),
            (
                SdkError::service_error(coded("InternalFailure"), raw(500, "")),
                ErrorKind::Unavailable,
                "InternalFailure: m",
            ),
            (
                SdkError::service_error(coded("ServiceUnavailable"), raw(503, "")),
                ErrorKind::Unavailable,
                "ServiceUnavailable: m",
            ),
            (
                SdkError::service_error(coded("ValidationError"), raw(400, "")),
                ErrorKind::Other,
                "ValidationError: m",
            ),
            (
                SdkError::service_error(
                    E::generic(ErrorMetadata::builder().build()),
                    raw(502, "<html>bad gateway</html>"),
                ),
                ErrorKind::Unavailable,
                "HTTP 502: <html>bad gateway</html>",
            ),
            (
                SdkError::service_error(
                    E::generic(ErrorMetadata::builder().build()),
                    raw(200, "<html>oops"),
                ),
                ErrorKind::Malformed,
                "HTTP 200: <html>oops",
            ),
            (
                SdkError::dispatch_failure(ConnectorError::io(Box::new(reset()))),
                ErrorKind::Connection,
                "no answer: Connection reset by peer",
            ),
            (
                SdkError::response_error(reset(), raw(200, "")),
                ErrorKind::Malformed,
                "answer (HTTP 200) unreadable: Connection reset by peer",
            ),
            (
                SdkError::timeout_error("slow"),
                ErrorKind::Timeout,
                "timed out (see aws.attempt_timeout and aws.operation_timeout)",
            ),
        ];
        for (sdk, kind, detail) in cases {
            let err = CloudError::from_sdk(api, sdk);
            assert_eq!((err.kind, err.detail().as_str()), (kind, detail), "{err}");
        }
    }

    #[test]
    fn only_a_not_found_action_counts_as_already_complete() {
        for kind in ErrorKind::ALL {
            let err = CloudError::new("CompleteLifecycleAction", kind, "x");
            assert_eq!(not_waiting(&err), kind == ErrorKind::NotFound, "{kind:?}");
        }
    }

    #[test]
    fn messages_read_as_before() {
        let mut err = CloudError::new("DescribeInstances", ErrorKind::Throttled, "Rate exceeded");
        err.code = Some("Throttling".into());
        assert_eq!(
            err.to_string(),
            "DescribeInstances throttled after retries: Throttling: Rate exceeded"
        );
        let timeout = CloudError::new(
            "DescribeAutoScalingGroups",
            ErrorKind::Timeout,
            "timed out (see aws.attempt_timeout and aws.operation_timeout)",
        );
        assert_eq!(
            timeout.to_string(),
            "DescribeAutoScalingGroups failed: timed out (see aws.attempt_timeout and aws.operation_timeout)"
        );
    }

    #[test]
    fn kinds_carry_one_name_in_readyz_and_the_metrics() {
        for kind in ErrorKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.label());
        }
    }

    #[test]
    fn cached_hooks_answer_until_stale_or_a_transition_has_none() {
        let hook = |name: &str, transition| LifecycleHook {
            name: name.into(),
            transition,
            heartbeat_timeout: Duration::from_secs(600),
        };
        let launch = BTreeSet::from([Transition::Launching]);
        let both = BTreeSet::from([Transition::Launching, Transition::Terminating]);
        let start = Instant::now();
        let mut cache = HookCache::default();
        cache.store(
            "web",
            &[hook("signpost-launch", Transition::Launching)],
            start,
        );
        let answer = |cache: &HookCache, waiting: Vec<(&str, BTreeSet<Transition>)>, at| {
            let mut known = HashMap::new();
            let read = cache.answer(waiting, &mut known, at);
            (read, known.into_keys().collect::<BTreeSet<_>>())
        };

        let (read, known) = answer(
            &cache,
            vec![("web", launch.clone()), ("api", launch.clone())],
            start,
        );
        assert_eq!(
            (read, known),
            (vec!["api".to_owned()], BTreeSet::from(["web".to_owned()]))
        );
        let (read, _) = answer(&cache, vec![("web", both)], start);
        assert_eq!(read, ["web"], "a terminate hook added since: read again");
        let late = start + HOOKS_FRESH;
        let (read, _) = answer(&cache, vec![("web", launch.clone())], late);
        assert_eq!(read, ["web"], "stale");

        cache.keep_only(&HashSet::from(["api"]));
        let (read, _) = answer(&cache, vec![("web", launch)], start);
        assert_eq!(read, ["web"], "a group no longer listed is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_burst_then_spaces_calls() {
        let budget = CallBudget::new(&AwsConfig {
            calls_per_second: 10.0,
            ..AwsConfig::default()
        });
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..10 {
            budget.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "a second's worth goes at once"
        );
        for _ in 0..10 {
            budget.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(900),
            "then 10 per second: {elapsed:?}"
        );
    }
}
