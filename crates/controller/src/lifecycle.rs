//! Lifecycle hooks: signpost completes the launch and terminate actions of
//! its hooks only once routers are ready for the change.
//!
//! - Launch (`Pending:Wait`): `reconcile` registers the instance; once its
//!   health check passes and every connected router has acked that
//!   revision, CONTINUE. Not healthy within `launch_timeout`: the configured
//!   result (ABANDON by default).
//! - Terminate (`Terminating:Wait`): `reconcile` marks the endpoint
//!   `draining`; once every router has acked that revision and reports no
//!   request in flight to the instance, or `drain_timeout` passes, CONTINUE.
//!
//! Level-triggered like `reconcile`: every complete listing says which
//! actions wait, each gets one task, and a task whose action is no longer
//! waiting is dropped. After a restart the actions are simply found again;
//! completing one twice is harmless (AWS answers "no active action", which
//! counts as done).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cloud::{ActionCall, AutoScaling};
use crate::config::LifecycleConfig;
use crate::lease::Leadership;
use crate::metrics::Histogram;
use crate::model::{
    rfc3339, EndpointState, Fleet, HookResult, InstanceId, LifecycleAction, Revision, Snapshot,
    Transition,
};
use crate::registry::Registry;
use crate::routers::{Absent, Routers};

/// Completed actions kept for `GET /v1/lifecycle`.
const RECENT: usize = 1000;

/// An action completed less than this long ago is not started again while a
/// listing still shows it waiting (AWS is eventually consistent); after it,
/// a still-waiting action is taken up again, in case the completion was lost.
const REDO_AFTER: Duration = Duration::from_secs(30);

/// The first retry of a failed heartbeat; each further one waits twice as
/// long, up to the heartbeat period.
const HEARTBEAT_RETRY: Duration = Duration::from_secs(1);

/// One waiting action found in a listing, with what its task needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub action: LifecycleAction,
    pub heartbeat_timeout: Duration,
    /// When the wait began as best the listing tells: EC2's launch time for a
    /// launch, `None` for a terminate (the task then uses when it saw it).
    pub since: Option<SystemTime>,
}

/// The actions signpost owns in a listing: instances waiting on a hook of
/// their transition whose name starts with `prefix`. Hooks of other names
/// belong to other tools and are left alone.
pub fn waiting_actions(fleet: &Fleet, prefix: &str) -> Vec<Waiting> {
    let mut out = Vec::new();
    for group in &fleet.groups {
        for instance in &group.instances {
            let Some(transition) = instance.waiting_on() else {
                continue;
            };
            let ours = group
                .hooks
                .iter()
                .filter(|h| h.transition == transition && h.name.starts_with(prefix));
            for hook in ours {
                out.push(Waiting {
                    action: LifecycleAction {
                        group: group.name.clone(),
                        hook: hook.name.clone(),
                        instance: instance.id.clone(),
                        transition,
                    },
                    heartbeat_timeout: hook.heartbeat_timeout,
                    since: match transition {
                        Transition::Launching => instance.ec2.as_ref().and_then(|e| e.launch_time),
                        Transition::Terminating => None,
                    },
                });
            }
        }
    }
    out
}

/// The endpoint of `instance` in whichever service has it.
fn endpoint_state(snapshot: &Snapshot, instance: &InstanceId) -> Option<EndpointState> {
    snapshot
        .services
        .values()
        .find_map(|s| s.endpoints.get(instance))
        .map(|e| e.state)
}

/// One action as `GET /v1/lifecycle` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ActionRecord {
    pub group: String,
    pub hook: String,
    pub instance: InstanceId,
    pub transition: Transition,
    /// When the wait began: the event's time when one came through
    /// `events`, else (launch) EC2's launch time or (terminate) when the
    /// controller first saw it waiting.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    pub since_from: SinceFrom,
    pub stage: Stage,
    /// Milliseconds from `since` to: the endpoint registered (launch: the
    /// listing that found it), the endpoint healthy (launch), every
    /// router acked (launch: the healthy revision; terminate: the draining
    /// one, with nothing in flight), the completion sent.
    pub registered_ms: Option<u64>,
    pub healthy_ms: Option<u64>,
    pub acked_ms: Option<u64>,
    pub completed_ms: Option<u64>,
    /// How it ended; never `error` (a failed action stays active).
    pub result: Option<ActionResult>,
    /// Why a timeout decided, or the last error.
    pub note: Option<String>,
    /// The routers whose acks justified the completion, as they were when
    /// the wait ended (audit). Absent while waiting, and when no router
    /// was connected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub acks: Vec<AckEvidence>,
}

/// One router's part in a completion: who it was, what it had applied and
/// what it still had in flight to the instance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AckEvidence {
    pub router: String,
    /// The identity it authenticated as (`None`: authentication is off).
    pub identity: Option<String>,
    pub revision: Option<Revision>,
    pub in_flight: u64,
}

/// Where an action's `since` came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinceFrom {
    /// The time of the event that announced it.
    Event,
    /// EC2's launch time (whole seconds).
    LaunchTime,
    /// The listing that found the action waiting.
    Seen,
}

/// Where an action is in its wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Launch: the endpoint has not passed its health check yet.
    WaitingForHealth,
    /// Launch: healthy; not every router has acked it yet.
    WaitingForRouters,
    /// Terminate: routers are letting go of the endpoint.
    Draining,
    /// CompleteLifecycleAction is under way.
    Completing,
    Done,
}

/// How an action ended, as `/v1/lifecycle` and the metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionResult {
    Continue,
    Abandon,
    /// AWS had no such waiting action any more: already complete.
    NotWaiting,
    /// CompleteLifecycleAction failed; retried after the next listing.
    Error,
}

impl ActionResult {
    /// The metric label: the name `/v1/lifecycle` shows.
    pub fn label(self) -> &'static str {
        match self {
            ActionResult::Continue => "continue",
            ActionResult::Abandon => "abandon",
            ActionResult::NotWaiting => "not_waiting",
            ActionResult::Error => "error",
        }
    }

    pub const ALL: [ActionResult; 4] = [
        ActionResult::Continue,
        ActionResult::Abandon,
        ActionResult::NotWaiting,
        ActionResult::Error,
    ];
}

/// Which wait a timeout decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeoutStage {
    /// A launching endpoint was not healthy in time.
    Launch,
    /// A router did not ack a healthy launching endpoint in time.
    Acks,
    /// Routers had not let go of a terminating endpoint in time.
    Drain,
}

impl TimeoutStage {
    pub fn label(self) -> &'static str {
        match self {
            TimeoutStage::Launch => "launch",
            TimeoutStage::Acks => "acks",
            TimeoutStage::Drain => "drain",
        }
    }
}

/// Lifecycle state shared with the API: actions under way and recent ones,
/// counters and histograms for `/metrics`.
#[derive(Default)]
pub struct LifecycleLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    /// When events said an action began, until its task takes the time.
    event_times: HashMap<(InstanceId, Transition), SystemTime>,
    active: BTreeMap<LifecycleAction, ActionRecord>,
    recent: VecDeque<ActionRecord>,
    results: BTreeMap<(Transition, ActionResult), u64>,
    timeouts: BTreeMap<TimeoutStage, u64>,
    heartbeats: u64,
    heartbeat_errors: u64,
    launch_healthy: Histogram,
    launch_acked: Histogram,
    healthy_to_acked: Histogram,
    terminate_drained: Histogram,
}

/// What `/metrics` reports, copied out under the lock.
pub struct LifecycleMetrics {
    pub results: BTreeMap<(Transition, ActionResult), u64>,
    pub timeouts: BTreeMap<TimeoutStage, u64>,
    pub heartbeats: u64,
    pub heartbeat_errors: u64,
    /// Shared with the log: they go on counting.
    pub launch_healthy: Histogram,
    pub launch_acked: Histogram,
    pub healthy_to_acked: Histogram,
    pub terminate_drained: Histogram,
}

fn ms(since: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(since)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Event times older than this are dropped unused: events about hooks that
/// are not signpost's would otherwise pile up.
const EVENT_TIME_KEPT: Duration = Duration::from_secs(3600);

impl LifecycleLog {
    /// Notes when an event says `instance`'s action began (the earliest, if
    /// duplicates arrive), for the metrics' start.
    pub fn event_seen(&self, instance: &str, transition: Transition, time: SystemTime) {
        let mut inner = self.inner.lock().unwrap();
        let now = SystemTime::now();
        inner
            .event_times
            .retain(|_, t| now.duration_since(*t).unwrap_or_default() < EVENT_TIME_KEPT);
        let at = inner
            .event_times
            .entry((instance.into(), transition))
            .or_insert(time);
        *at = (*at).min(time);
    }

    fn take_event_time(&self, action: &LifecycleAction) -> Option<SystemTime> {
        let key = (action.instance.clone(), action.transition);
        self.inner.lock().unwrap().event_times.remove(&key)
    }

    /// Actions under way, then the most recent completed first.
    pub fn actions(&self) -> (Vec<ActionRecord>, Vec<ActionRecord>) {
        let inner = self.inner.lock().unwrap();
        (
            inner.active.values().cloned().collect(),
            inner.recent.iter().rev().cloned().collect(),
        )
    }

    pub fn metrics(&self) -> LifecycleMetrics {
        let inner = self.inner.lock().unwrap();
        LifecycleMetrics {
            results: inner.results.clone(),
            timeouts: inner.timeouts.clone(),
            heartbeats: inner.heartbeats,
            heartbeat_errors: inner.heartbeat_errors,
            launch_healthy: inner.launch_healthy.clone(),
            launch_acked: inner.launch_acked.clone(),
            healthy_to_acked: inner.healthy_to_acked.clone(),
            terminate_drained: inner.terminate_drained.clone(),
        }
    }

    fn update(&self, action: &LifecycleAction, f: impl FnOnce(&mut ActionRecord)) {
        if let Some(r) = self.inner.lock().unwrap().active.get_mut(action) {
            f(r);
        }
    }

    fn begin(&self, action: &LifecycleAction, since: SystemTime, since_from: SinceFrom) {
        let record = ActionRecord {
            group: action.group.clone(),
            hook: action.hook.clone(),
            instance: action.instance.clone(),
            transition: action.transition,
            since,
            since_from,
            stage: match action.transition {
                Transition::Launching => Stage::WaitingForHealth,
                Transition::Terminating => Stage::Draining,
            },
            registered_ms: None,
            healthy_ms: None,
            acked_ms: None,
            completed_ms: None,
            result: None,
            note: None,
            acks: Vec::new(),
        };
        self.inner
            .lock()
            .unwrap()
            .active
            .insert(action.clone(), record);
    }

    fn stage(&self, action: &LifecycleAction, stage: Stage) {
        self.update(action, |r| r.stage = stage);
    }

    fn note(&self, action: &LifecycleAction, note: String) {
        self.update(action, |r| r.note = Some(note));
    }

    fn timeout(&self, stage: TimeoutStage) {
        *self
            .inner
            .lock()
            .unwrap()
            .timeouts
            .entry(stage)
            .or_default() += 1;
    }

    fn registered(&self, action: &LifecycleAction) {
        self.update(action, |r| r.registered_ms = Some(ms(r.since)));
    }

    fn healthy(&self, action: &LifecycleAction) {
        let mut inner = self.inner.lock().unwrap();
        let Some(r) = inner.active.get_mut(action) else {
            return;
        };
        let healthy = ms(r.since);
        r.healthy_ms = Some(healthy);
        r.stage = Stage::WaitingForRouters;
        inner.launch_healthy.observe_ms(healthy);
    }

    fn acked(&self, action: &LifecycleAction, acks: Vec<AckEvidence>) {
        info!(group = %action.group, instance = %action.instance, transition = ?action.transition, acks = ?acks, "routers' acks behind this completion");
        let mut inner = self.inner.lock().unwrap();
        let Some(r) = inner.active.get_mut(action) else {
            return;
        };
        r.acks = acks;
        let acked = ms(r.since);
        r.acked_ms = Some(acked);
        r.stage = Stage::Completing;
        let healthy = r.healthy_ms;
        match action.transition {
            Transition::Launching => {
                inner.launch_acked.observe_ms(acked);
                if let Some(h) = healthy {
                    inner.healthy_to_acked.observe_ms(acked.saturating_sub(h));
                }
            }
            Transition::Terminating => inner.terminate_drained.observe_ms(acked),
        }
    }

    fn heartbeat(&self, ok: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.heartbeats += 1;
        inner.heartbeat_errors += u64::from(!ok);
    }

    /// Ends an action: counted by result, moved to the recent list when done.
    fn finish(&self, action: &LifecycleAction, outcome: &Result<(HookResult, ActionCall), String>) {
        let mut inner = self.inner.lock().unwrap();
        let result = match outcome {
            Ok((_, ActionCall::NotWaiting)) => ActionResult::NotWaiting,
            Ok((HookResult::Continue, ActionCall::Done)) => ActionResult::Continue,
            Ok((HookResult::Abandon, ActionCall::Done)) => ActionResult::Abandon,
            Err(_) => ActionResult::Error,
        };
        *inner
            .results
            .entry((action.transition, result))
            .or_default() += 1;
        // A failed action is taken up again by the next listing: nothing
        // half-done is kept.
        let Some(mut record) = inner.active.remove(action) else {
            return;
        };
        if outcome.is_ok() {
            record.stage = Stage::Done;
            record.result = Some(result);
            record.completed_ms = Some(ms(record.since));
            inner.recent.push_back(record);
            if inner.recent.len() > RECENT {
                inner.recent.pop_front();
            }
        }
    }

    /// Forgets an action that stopped waiting without us (completed by
    /// someone else, or by its timeout).
    fn forget(&self, action: &LifecycleAction) {
        self.inner.lock().unwrap().active.remove(action);
    }
}

/// Runs the lifecycle actions of every listing.
pub struct Lifecycle<C> {
    pub cloud: Arc<C>,
    pub registry: Arc<Registry>,
    pub routers: Arc<Routers>,
    pub config: LifecycleConfig,
    pub log: Arc<LifecycleLog>,
    /// Since when routers are served (`None`: not yet, the registry is
    /// warming up). No action completes until `router_grace` after that:
    /// routers that were connected to a previous controller (or leader)
    /// reconnect only once they are served, and a router this controller
    /// does not know cannot be waited for. Counting from the process start
    /// instead let a slow first listing eat the whole grace.
    pub serving: watch::Receiver<Option<Instant>>,
    /// Completions and heartbeats are sent only while this replica may act
    /// (see `lease`): checked right before each call, not only when the
    /// term ends, so that a replica that slept through its deadline (a
    /// paused process) acts on nothing when it wakes.
    pub leadership: watch::Receiver<Leadership>,
}

impl<C: AutoScaling> Lifecycle<C> {
    pub async fn run(self, mut fleets: watch::Receiver<Arc<Fleet>>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut leadership = this.leadership.clone();
        let mut leadership_can_change = true;
        let mut tasks: JoinSet<(LifecycleAction, bool)> = JoinSet::new();
        let mut running: HashMap<LifecycleAction, AbortHandle> = HashMap::new();
        let mut done: HashMap<LifecycleAction, Instant> = HashMap::new();
        loop {
            tokio::select! {
                changed = fleets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = leadership.changed(), if leadership_can_change => {
                    // Closed: leadership stays what it is (a single
                    // controller's sender may be gone).
                    if changed.is_err() {
                        leadership_can_change = false;
                        continue;
                    }
                }
                Some(joined) = tasks.join_next() => {
                    if let Ok((action, completed)) = joined {
                        running.remove(&action);
                        if completed {
                            done.insert(action, Instant::now());
                        }
                    }
                    continue;
                }
                _ = shutdown.cancelled() => return,
            }
            // A follower takes up no action: only the leader may complete
            // one, and a follower that showed actions it would never
            // complete (or kept waiting on after it lost the lease) would
            // mislead whoever reads `/v1/lifecycle`. On becoming leader the
            // current listing is taken up from scratch.
            let leading = leadership.borrow_and_update().is_leader();
            let fleet = fleets.borrow_and_update().clone();
            let waiting = if leading {
                waiting_actions(&fleet, &this.config.hook_prefix)
            } else {
                Vec::new()
            };
            running.retain(|action, task| {
                let still = waiting.iter().any(|w| w.action == *action);
                if !still {
                    debug!(group = %action.group, instance = %action.instance, hook = %action.hook, leading, "action not ours to wait for any more; its task is dropped");
                    task.abort();
                    this.log.forget(action);
                }
                still
            });
            done.retain(|action, at| {
                at.elapsed() < REDO_AFTER && waiting.iter().any(|w| w.action == *action)
            });
            for w in waiting {
                if running.contains_key(&w.action) || done.contains_key(&w.action) {
                    continue;
                }
                let action = w.action.clone();
                let task = this.clone();
                let handle = tasks.spawn(async move {
                    let action = w.action.clone();
                    (action, task.handle(w).await)
                });
                running.insert(action, handle);
            }
        }
    }

    /// Waits for the action's condition while keeping the hook alive, then
    /// completes it. True when AWS took the completion (or had no such
    /// action); false after an error, so that the next listing retries.
    async fn handle(&self, w: Waiting) -> bool {
        let action = &w.action;
        // The event's own time when one came, else the listing's best guess.
        let (since, since_from) = match (self.log.take_event_time(action), w.since) {
            (Some(t), _) => (t, SinceFrom::Event),
            (None, Some(t)) => (t, SinceFrom::LaunchTime),
            (None, None) => (SystemTime::now(), SinceFrom::Seen),
        };
        self.log.begin(action, since, since_from);
        info!(group = %action.group, instance = %action.instance, hook = %action.hook, transition = action.transition.label(), "lifecycle action waiting");
        let decided = tokio::select! {
            biased;
            result = self.decide(action) => result,
            never = self.keep_alive(action, w.heartbeat_timeout) => match never {},
        };
        self.log.stage(action, Stage::Completing);
        let Some(token) = self.leadership.borrow().acting(Instant::now()) else {
            warn!(group = %action.group, instance = %action.instance, hook = %action.hook, "not leading any more; the completion is left to the leader");
            self.log.forget(action);
            return false;
        };
        let outcome = self
            .cloud
            .complete_action(action, decided)
            .await
            .map(|call| (decided, call))
            .map_err(|e| e.to_string());
        match &outcome {
            Ok((result, ActionCall::Done)) => {
                info!(group = %action.group, instance = %action.instance, hook = %action.hook, result = result.as_aws(), token, "lifecycle action completed")
            }
            Ok((_, ActionCall::NotWaiting)) => {
                debug!(group = %action.group, instance = %action.instance, hook = %action.hook, token, "lifecycle action was already complete")
            }
            Err(e) => {
                warn!(group = %action.group, instance = %action.instance, hook = %action.hook, error = %e, token, "completing the lifecycle action failed; retried after the next listing");
                self.log.note(action, e.clone());
            }
        }
        self.log.finish(action, &outcome);
        outcome.is_ok()
    }

    /// Resolves `router_grace` after routers are first served.
    async fn router_grace_over(&self) {
        let mut serving = self.serving.clone();
        let since = serving.wait_for(Option::is_some).await.map(|s| *s);
        // Err: the controller is stopping, nothing is served any more.
        let Ok(Some(since)) = since else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(since + self.config.router_grace).await;
    }

    /// The result the action should be completed with, once it is time.
    async fn decide(&self, action: &LifecycleAction) -> HookResult {
        self.router_grace_over().await;
        match action.transition {
            Transition::Launching => self.launch(action).await,
            Transition::Terminating => {
                self.drain(action).await;
                HookResult::Continue
            }
        }
    }

    async fn launch(&self, action: &LifecycleAction) -> HookResult {
        let deadline = Instant::now() + self.config.launch_timeout;
        let mut registry = self.registry.subscribe();
        let healthy = tokio::time::timeout_at(deadline, async {
            let registered = registry.wait_for(|s| endpoint_state(s, &action.instance).is_some());
            if registered.await.is_ok() {
                self.log.registered(action);
            }
            registry
                .wait_for(|s| endpoint_state(s, &action.instance) == Some(EndpointState::Healthy))
                .await
                .map(|s| s.revision)
        })
        .await;
        let revision = match healthy {
            Ok(Ok(revision)) => revision,
            Ok(Err(_)) => std::future::pending().await,
            Err(_) => {
                let result = self.config.launch_timeout_result;
                let note = format!(
                    "not healthy within launch_timeout ({}): {}",
                    humantime::format_duration(self.config.launch_timeout),
                    result.as_aws()
                );
                warn!(group = %action.group, instance = %action.instance, "{note}");
                self.log.note(action, note);
                self.log.timeout(TimeoutStage::Launch);
                return result;
            }
        };
        self.log.healthy(action);
        // Expected routers that are not connected cannot ack; the launch
        // goes on without them (a router that lacks the instance only sends
        // it no traffic), but says so.
        let missing = self.routers.missing();
        if !missing.is_empty() {
            let note = format!("continuing without routers that are missing: {missing:?}");
            warn!(group = %action.group, instance = %action.instance, "{note}");
            self.log.note(action, note);
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        if let Err(e) = self.routers.wait_acked(revision, left).await {
            // The instance is healthy: a router that lags only sends it no
            // traffic yet, which fails no request. Go on, and say so.
            warn!(group = %action.group, instance = %action.instance, error = %e, "continuing without every router's ack");
            self.log.note(action, e.to_string());
            self.log.timeout(TimeoutStage::Acks);
        }
        self.log
            .acked(action, self.evidence(action.instance.as_str()));
        HookResult::Continue
    }

    /// What each connected router had acked and had in flight to
    /// `instance` when a wait ended: the audit of a completion.
    fn evidence(&self, instance: &str) -> Vec<AckEvidence> {
        self.routers
            .list()
            .into_iter()
            .filter(|r| r.connected)
            .map(|r| AckEvidence {
                in_flight: r.in_flight_to(instance),
                router: r.id,
                identity: r.identity,
                revision: r.acked_revision,
            })
            .collect()
    }

    /// Waits until no router can send the instance a request: every router
    /// has acked a revision in which the endpoint is draining or gone, and
    /// reports nothing in flight to it. At most `drain_timeout`.
    async fn drain(&self, action: &LifecycleAction) {
        let deadline = Instant::now() + self.config.drain_timeout;
        let mut registry = self.registry.subscribe();
        let not_routable = tokio::time::timeout_at(deadline, async {
            registry
                .wait_for(|s| {
                    endpoint_state(s, &action.instance).is_none_or(|e| e == EndpointState::Draining)
                })
                .await
                .map(|s| s.revision)
        })
        .await;
        let revision = match not_routable {
            Ok(Ok(revision)) => revision,
            Ok(Err(_)) => std::future::pending().await,
            // The listing said Terminating:Wait, which `reconcile` turns into
            // draining in the same pass: not reached unless the registry stalls.
            Err(_) => self.registry.snapshot().revision,
        };
        let instance = action.instance.as_str();
        let left = deadline.saturating_duration_since(Instant::now());
        let missing = self.routers.missing();
        if !missing.is_empty() {
            let note =
                format!("waiting up to drain_timeout for routers that are missing: {missing:?}");
            warn!(group = %action.group, instance = %action.instance, "{note}");
            self.log.note(action, note);
        }
        let drained = self
            .routers
            .wait_routers(left, Absent::Counted(self.config.drain_timeout), |r| {
                r.has_acked(revision) && r.drained(instance)
            })
            .await;
        if let Err(routers) = drained {
            let note = format!(
                "drain_timeout ({}) passed; routers {routers:?} had not acked revision {revision} or still had requests in flight",
                humantime::format_duration(self.config.drain_timeout)
            );
            warn!(group = %action.group, instance = %action.instance, "{note}");
            self.log.note(action, note);
            self.log.timeout(TimeoutStage::Drain);
        }
        self.log
            .acked(action, self.evidence(action.instance.as_str()));
    }

    /// Sends heartbeats well before the hook's heartbeat timeout (every
    /// third of it; after a failure again in 1 s, then 2, 4, ... up to
    /// that), for as long as the action waits. Never returns.
    async fn keep_alive(
        &self,
        action: &LifecycleAction,
        heartbeat_timeout: Duration,
    ) -> std::convert::Infallible {
        let every = (heartbeat_timeout / 3).max(Duration::from_millis(500));
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            if self.leadership.borrow().acting(Instant::now()).is_none() {
                wait = every;
                continue;
            }
            match self.cloud.heartbeat(action).await {
                Ok(_) => {
                    debug!(group = %action.group, instance = %action.instance, "lifecycle heartbeat");
                    self.log.heartbeat(true);
                    wait = every;
                }
                Err(e) => {
                    warn!(group = %action.group, instance = %action.instance, error = %e, "lifecycle heartbeat failed");
                    self.log.heartbeat(false);
                    // Tried again soon, backing off, rather than a period
                    // later: two failures a period apart let the hook
                    // expire (found by the heartbeat fault test). The
                    // calls go through the AWS call budget.
                    wait = if wait == every {
                        HEARTBEAT_RETRY.min(every)
                    } else {
                        (wait * 2).min(every)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::FakeAutoScaling;
    use crate::model::{
        Change, Ec2Instance, Endpoint, HealthCheck, LifecycleHook, ObservedGroup, ObservedInstance,
        Revision, ServiceSettings,
    };
    use signpost_protocol::{Ack, Epoch};
    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use tokio::task::JoinHandle;

    const ROUTER: &str = "r1";

    fn hook(name: &str, transition: Transition) -> LifecycleHook {
        LifecycleHook {
            name: name.into(),
            transition,
            heartbeat_timeout: Duration::from_secs(30),
        }
    }

    fn instance(id: &str, lifecycle: &str) -> ObservedInstance {
        ObservedInstance {
            id: id.into(),
            lifecycle_state: lifecycle.into(),
            zone: "a".into(),
            ec2: Some(Ec2Instance {
                state: "running".into(),
                private_ip: Some([127, 42, 1, 4].into()),
                launch_time: Some(SystemTime::UNIX_EPOCH),
            }),
        }
    }

    #[test]
    fn results_carry_one_name_in_the_api_and_the_metrics() {
        for result in ActionResult::ALL {
            assert_eq!(
                serde_json::to_value(result).unwrap(),
                result.label(),
                "{result:?}"
            );
        }
        for transition in [Transition::Launching, Transition::Terminating] {
            assert_eq!(
                serde_json::to_value(transition).unwrap(),
                transition.label()
            );
        }
    }

    #[test]
    fn only_our_hooks_of_the_waiting_transition_are_taken() {
        let fleet = Fleet {
            groups: vec![ObservedGroup {
                name: "g".into(),
                service: Some("users".into()),
                settings: Err("tags need not be usable for hooks to be seen".into()),
                instances: vec![
                    instance("i-1", "Pending:Wait"),
                    instance("i-2", "Terminating:Wait"),
                    instance("i-3", "InService"),
                ],
                hooks: vec![
                    hook("signpost-launch", Transition::Launching),
                    hook("signpost-terminate", Transition::Terminating),
                    hook("bootstrap", Transition::Launching),
                ],
            }],
        };
        let found: Vec<(String, String, Option<SystemTime>)> = waiting_actions(&fleet, "signpost")
            .into_iter()
            .map(|w| (w.action.instance.to_string(), w.action.hook, w.since))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "i-1".into(),
                    "signpost-launch".into(),
                    Some(SystemTime::UNIX_EPOCH)
                ),
                ("i-2".into(), "signpost-terminate".into(), None),
            ]
        );
    }

    /// A registry with service `users`, router `r1` connected, and the
    /// lifecycle wired to a fake cloud.
    struct World {
        lifecycle: Arc<Lifecycle<FakeAutoScaling>>,
        registry: Arc<Registry>,
        routers: Arc<Routers>,
        serving: watch::Sender<Option<Instant>>,
        leadership: watch::Sender<Leadership>,
    }

    const EPOCH: Epoch = Epoch::from_bits(7);

    fn world(config: LifecycleConfig, grace: Duration) -> World {
        let registry = Arc::new(Registry::new());
        registry.apply(
            &[Change::PutService {
                name: "users".into(),
                settings: ServiceSettings {
                    route: "/users".into(),
                    port: 80,
                    health: HealthCheck::Tcp,
                },
                groups: BTreeSet::from(["g".to_string()]),
            }],
            SystemTime::now(),
        );
        let routers = Arc::new(Routers::new(EPOCH));
        routers.connect(ROUTER, SocketAddr::from(([127, 0, 0, 1], 1)));
        let (serving_tx, serving) = watch::channel(Some(Instant::now()));
        let (leadership_tx, leadership) = watch::channel(Leadership::Single);
        let lifecycle = Arc::new(Lifecycle {
            cloud: Arc::new(FakeAutoScaling::default()),
            registry: registry.clone(),
            routers: routers.clone(),
            config: LifecycleConfig {
                router_grace: grace,
                ..config
            },
            log: Arc::default(),
            serving,
            leadership,
        });
        World {
            lifecycle,
            registry,
            routers,
            serving: serving_tx,
            leadership: leadership_tx,
        }
    }

    fn set(registry: &Registry, change: Change) -> Revision {
        registry
            .apply(&[change], SystemTime::now())
            .expect("a change")
    }

    fn add(id: &str) -> Change {
        Change::AddEndpoint {
            service: "users".into(),
            endpoint: Endpoint {
                instance_id: id.into(),
                address: [127, 42, 1, 4].into(),
                port: 80,
                zone: "a".into(),
                group: "g".into(),
                state: EndpointState::Starting,
                since: SystemTime::UNIX_EPOCH,
            },
        }
    }

    fn state(id: &str, state: EndpointState) -> Change {
        Change::SetState {
            service: "users".into(),
            instance: id.into(),
            address: [127, 42, 1, 4].into(),
            port: 80,
            state,
        }
    }

    fn ack(routers: &Routers, revision: Revision, in_flight: &[(&str, u64)]) {
        let in_flight = in_flight
            .iter()
            .map(|(id, n)| ("users".to_string(), BTreeMap::from([(id.to_string(), *n)])))
            .collect();
        routers.sent(ROUTER, 1, revision);
        routers
            .acked(
                ROUTER,
                Ack {
                    epoch: EPOCH,
                    revision,
                    in_flight,
                    ejected: vec![],
                },
            )
            .expect("the ack counts");
    }

    fn waiting(id: &str, transition: Transition, heartbeat: Duration) -> Waiting {
        Waiting {
            action: LifecycleAction {
                group: "g".into(),
                hook: "signpost".into(),
                instance: id.into(),
                transition,
            },
            heartbeat_timeout: heartbeat,
            since: None,
        }
    }

    /// The action of `id` handled on a task of its own.
    fn spawn_action(w: &World, id: &str, transition: Transition) -> JoinHandle<bool> {
        let lifecycle = w.lifecycle.clone();
        let action = waiting(id, transition, Duration::from_secs(30));
        tokio::spawn(async move { lifecycle.handle(action).await })
    }

    /// Lets every task run until it waits on time or on another task.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    fn completed(w: &World) -> Vec<(String, HookResult)> {
        let done = w.lifecycle.cloud.completed.lock().unwrap();
        done.iter()
            .map(|(a, r)| (a.instance.to_string(), *r))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn launch_continues_only_once_healthy_and_acked_by_every_router() {
        let w = world(LifecycleConfig::default(), Duration::ZERO);
        set(&w.registry, add("i-1"));
        let task = spawn_action(&w, "i-1", Transition::Launching);
        settle().await;
        assert!(completed(&w).is_empty(), "starting: not yet");
        let healthy = set(&w.registry, state("i-1", EndpointState::Healthy));
        settle().await;
        assert!(completed(&w).is_empty(), "healthy but not acked");
        ack(&w.routers, healthy - 1, &[]);
        settle().await;
        assert!(completed(&w).is_empty(), "an older revision acked");
        ack(&w.routers, healthy, &[]);
        assert!(task.await.unwrap());
        assert_eq!(completed(&w), [("i-1".into(), HookResult::Continue)]);
        let (active, recent) = w.lifecycle.log.actions();
        assert!(active.is_empty());
        assert_eq!(
            (recent[0].result, recent[0].stage),
            (Some(ActionResult::Continue), Stage::Done)
        );
        assert!(recent[0].healthy_ms.is_some() && recent[0].acked_ms.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_past_its_lease_deadline_neither_completes_nor_heartbeats() {
        let w = world(LifecycleConfig::default(), Duration::ZERO);
        let now = Instant::now();
        // Leading until 1 s from now; the lease task has not noticed the
        // deadline pass (a paused process wakes with every timer due).
        w.leadership
            .send_replace(Leadership::Leader(crate::lease::Term {
                token: 3,
                since: now,
                since_wall: SystemTime::now(),
                valid_until: now + Duration::from_secs(1),
            }));
        set(&w.registry, add("i-1"));
        let lifecycle = w.lifecycle.clone();
        let action = waiting("i-1", Transition::Launching, Duration::from_secs(3));
        let task = tokio::spawn(async move { lifecycle.handle(action).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let healthy = set(&w.registry, state("i-1", EndpointState::Healthy));
        ack(&w.routers, healthy, &[]);
        assert!(!task.await.unwrap(), "not completed: left to the leader");
        assert!(completed(&w).is_empty());
        assert!(
            w.lifecycle.cloud.heartbeats.lock().unwrap().is_empty(),
            "the heartbeat at 1 s fell after the deadline"
        );
        assert!(
            w.lifecycle.log.actions().0.is_empty(),
            "not shown as under way"
        );
    }

    /// `run` as the controller drives it: actions are taken up from
    /// listings only while this replica leads, and dropped when it stops.
    #[tokio::test(start_paused = true)]
    async fn only_the_leader_takes_up_actions_and_a_stepped_down_one_drops_them() {
        let w = world(LifecycleConfig::default(), Duration::ZERO);
        w.leadership
            .send_replace(Leadership::Follower { leader: None });
        set(&w.registry, add("i-1"));
        let lifecycle = Lifecycle {
            cloud: w.lifecycle.cloud.clone(),
            registry: w.registry.clone(),
            routers: w.routers.clone(),
            config: w.lifecycle.config.clone(),
            log: w.lifecycle.log.clone(),
            serving: w.lifecycle.serving.clone(),
            leadership: w.lifecycle.leadership.clone(),
        };
        let fleet = Fleet {
            groups: vec![ObservedGroup {
                name: "g".into(),
                service: Some("users".into()),
                settings: Err("not needed here".into()),
                instances: vec![instance("i-1", "Pending:Wait")],
                hooks: vec![hook("signpost-launch", Transition::Launching)],
            }],
        };
        let (fleets_tx, fleets) = watch::channel(Arc::new(Fleet { groups: vec![] }));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(lifecycle.run(fleets, shutdown.clone()));
        fleets_tx.send_replace(Arc::new(fleet));
        settle().await;
        assert!(
            w.lifecycle.log.actions().0.is_empty(),
            "a follower waits on nothing"
        );

        let now = Instant::now();
        w.leadership
            .send_replace(Leadership::Leader(crate::lease::Term {
                token: 1,
                since: now,
                since_wall: SystemTime::now(),
                valid_until: now + Duration::from_secs(60),
            }));
        settle().await;
        let (active, _) = w.lifecycle.log.actions();
        assert_eq!(
            active.len(),
            1,
            "the new leader takes up the current listing"
        );

        w.leadership
            .send_replace(Leadership::Follower { leader: None });
        settle().await;
        assert!(
            w.lifecycle.log.actions().0.is_empty(),
            "stepping down drops it"
        );
        // Healthy and acked after stepping down: nothing is completed.
        let healthy = set(&w.registry, state("i-1", EndpointState::Healthy));
        ack(&w.routers, healthy, &[]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(completed(&w).is_empty());
        shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn launch_not_healthy_in_time_is_abandoned_with_heartbeats_meanwhile() {
        let config = LifecycleConfig {
            launch_timeout: Duration::from_secs(60),
            ..LifecycleConfig::default()
        };
        let w = world(config, Duration::ZERO);
        set(&w.registry, add("i-1"));
        let started = Instant::now();
        let done = w
            .lifecycle
            .handle(waiting(
                "i-1",
                Transition::Launching,
                Duration::from_secs(30),
            ))
            .await;
        assert!(done);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        assert_eq!(completed(&w), [("i-1".into(), HookResult::Abandon)]);
        let beats = w.lifecycle.cloud.heartbeats.lock().unwrap().len();
        assert_eq!(
            beats, 5,
            "one every 10s, a third of the 30s heartbeat timeout"
        );
        let m = w.lifecycle.log.metrics();
        assert_eq!(
            m.results[&(Transition::Launching, ActionResult::Abandon)],
            1
        );
        assert_eq!(m.timeouts[&TimeoutStage::Launch], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_heartbeat_is_retried_before_the_hook_can_expire() {
        let config = LifecycleConfig {
            launch_timeout: Duration::from_secs(60),
            ..LifecycleConfig::default()
        };
        let w = world(config, Duration::ZERO);
        set(&w.registry, add("i-1"));
        // Heartbeat timeout 30 s: a heartbeat every 10 s.
        let task = spawn_action(&w, "i-1", Transition::Launching);
        let fail = |on: bool| {
            *w.lifecycle.cloud.action_error.lock().unwrap() = on.then(|| "throttled".into());
        };
        let beats = || w.lifecycle.cloud.heartbeats.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        fail(true);
        // Failing at 10 s and again a period later (20 s) would leave no
        // heartbeat within the hook's 30 s.
        tokio::time::sleep(Duration::from_millis(11_500)).await;
        fail(false);
        tokio::time::sleep(Duration::from_millis(8_000)).await;
        assert_eq!(
            beats(),
            1,
            "a heartbeat went through before the 30 s timeout (retries at 11, 13, 17, 25 s)"
        );
        // Back to one a period once it succeeds: 25 s, then 35 s.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(beats(), 2);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_continues_once_acked_with_nothing_in_flight() {
        let w = world(LifecycleConfig::default(), Duration::ZERO);
        set(&w.registry, add("i-1"));
        set(&w.registry, state("i-1", EndpointState::Healthy));
        let draining = set(&w.registry, state("i-1", EndpointState::Draining));
        let task = spawn_action(&w, "i-1", Transition::Terminating);
        settle().await;
        ack(&w.routers, draining, &[("i-1", 2)]);
        settle().await;
        assert!(completed(&w).is_empty(), "two requests still in flight");
        ack(&w.routers, draining, &[]);
        assert!(task.await.unwrap());
        assert_eq!(completed(&w), [("i-1".into(), HookResult::Continue)]);
        assert!(w.lifecycle.log.metrics().timeouts.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_goes_on_after_the_drain_timeout() {
        let config = LifecycleConfig {
            drain_timeout: Duration::from_secs(30),
            ..LifecycleConfig::default()
        };
        let w = world(config, Duration::ZERO);
        let started = Instant::now();
        assert!(
            w.lifecycle
                .handle(waiting(
                    "i-9",
                    Transition::Terminating,
                    Duration::from_secs(300)
                ))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_secs(30), "r1 never acked");
        assert_eq!(completed(&w), [("i-9".into(), HookResult::Continue)]);
        assert_eq!(w.lifecycle.log.metrics().timeouts[&TimeoutStage::Drain], 1);
        let (_, recent) = w.lifecycle.log.actions();
        assert!(recent[0].note.as_deref().unwrap().contains("[\"r1\"]"));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_completes_before_the_grace_after_a_start() {
        let w = world(LifecycleConfig::default(), Duration::from_secs(10));
        // The only router went away longer than drain_timeout ago: nothing
        // but the grace holds the termination.
        w.routers.disconnect(ROUTER, 1);
        tokio::time::advance(LifecycleConfig::default().drain_timeout).await;
        w.serving.send_replace(Some(Instant::now()));
        let started = Instant::now();
        assert!(
            w.lifecycle
                .handle(waiting(
                    "i-9",
                    Transition::Terminating,
                    Duration::from_secs(300)
                ))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn the_router_grace_counts_from_when_routers_are_served_not_from_the_start() {
        // A restarted controller whose first listing takes 30 s (AWS slow or
        // away): the routers of the previous one reconnect only once they
        // are served, so the grace must start then.
        let w = world(LifecycleConfig::default(), Duration::from_secs(10));
        w.serving.send_replace(None);
        w.routers.disconnect(ROUTER, 1);
        let started = Instant::now();
        let serving = w.serving.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            serving.send_replace(Some(Instant::now()));
        });
        assert!(
            w.lifecycle
                .handle(waiting(
                    "i-9",
                    Transition::Terminating,
                    Duration::from_secs(300)
                ))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_completion_is_not_counted_done() {
        let w = world(LifecycleConfig::default(), Duration::ZERO);
        w.routers.disconnect(ROUTER, 1);
        *w.lifecycle.cloud.action_error.lock().unwrap() = Some("Throttling: Rate exceeded".into());
        assert!(
            !w.lifecycle
                .handle(waiting(
                    "i-9",
                    Transition::Terminating,
                    Duration::from_secs(300)
                ))
                .await
        );
        assert_eq!(
            w.lifecycle.log.metrics().results[&(Transition::Terminating, ActionResult::Error)],
            1
        );
        let (active, recent) = w.lifecycle.log.actions();
        assert!(
            active.is_empty() && recent.is_empty(),
            "taken up again by the next listing"
        );
    }
}
