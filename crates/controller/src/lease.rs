//! Leader election for several controller replicas: one lease item in a
//! DynamoDB table, taken and renewed with conditional `UpdateItem`s.
//!
//! ```text
//!   follower ──GetItem every renew period──► item expired or released?
//!       │                                       │ yes: UpdateItem IF free OR expires < now
//!       ◄──── condition failed (someone won) ───┤      SET owner, address, expires, token + 1
//!                                               ▼
//!   leader ──UpdateItem IF owner = me AND token = mine, SET expires──► every lease/3
//!       │   no success for renew_deadline (2/3 of the lease)
//!       ▼
//!   steps down: stops completing and heartbeating, closes router streams
//! ```
//!
//! **Clock assumption.** The item's `expires` is wall-clock time written by
//! the leader and compared with the wall clock of a would-be successor, so
//! replicas' clocks must agree to better than `lease_duration -
//! renew_deadline` (a third of the lease: 5 s with the default 15 s). The
//! leader's own deadline is measured on its monotonic clock from the moment
//! it *sent* its last successful renewal, which is no later than the moment
//! DynamoDB wrote that expiry: the leader stops acting at least a third of
//! the lease before any correctly clocked replica may take over. EC2's
//! time sync (NTP, the Amazon Time Sync Service) keeps skew in the
//! milliseconds; a replica whose clock is off by more than the margin can
//! take a live lease early.
//!
//! **Fencing.** Every takeover increases `token`. AWS's lifecycle API takes
//! no fencing token, so the token cannot stop a stale write at AWS; it
//! orders leaders in logs, `/readyz`, `/v1/lifecycle` and metrics, and the
//! lifecycle checks its deadline immediately before each completion. A
//! process paused between that check and the call (a few microseconds)
//! could still complete one action late; completing an action twice is
//! harmless, and both leaders complete on the same facts (AWS's state).
//!
//! DynamoDB's TTL deletion is never relied on: it runs up to days late.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cloud::{CloudError, ErrorKind};

/// The lease as stored: who holds it, where routers reach them, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseItem {
    pub owner: String,
    /// The holder's advertised API URL, where followers send routers.
    pub address: String,
    /// Increases by one on every takeover, never on a renewal.
    pub token: u64,
    /// Wall clock; a released lease has `UNIX_EPOCH`.
    pub expires: SystemTime,
}

impl LeaseItem {
    /// Free for the taking at `now` (by the caller's clock).
    pub fn is_free(&self, now: SystemTime) -> bool {
        self.expires <= now
    }
}

/// The replica asking for the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub address: String,
}

#[derive(Debug, Error)]
#[error("lease table {table}: {message}")]
pub struct LeaseError {
    pub table: String,
    /// The failure's kind, as the other AWS calls' (`/readyz`).
    pub kind: ErrorKind,
    pub message: String,
}

/// The store that holds the lease item. Every write is conditional, so two
/// replicas can never both succeed in taking it.
pub trait LeaseStore: Send + Sync + 'static {
    /// A strongly consistent read of the item; `None` when never written.
    fn read(&self) -> impl Future<Output = Result<Option<LeaseItem>, LeaseError>> + Send;

    /// Takes the lease if the item is missing, or its `expires` is not
    /// after `now`: sets owner, address, `expires` and `token + 1`. `None`
    /// when the condition failed (someone holds it).
    fn acquire(
        &self,
        me: &Candidate,
        now: SystemTime,
        expires: SystemTime,
    ) -> impl Future<Output = Result<Option<LeaseItem>, LeaseError>> + Send;

    /// Extends our lease. False when it is no longer ours (owner or token
    /// changed).
    fn renew(
        &self,
        me: &Candidate,
        token: u64,
        expires: SystemTime,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// Gives the lease up at shutdown so that a follower need not wait for
    /// it to expire.
    fn release(
        &self,
        me: &Candidate,
        token: u64,
    ) -> impl Future<Output = Result<(), LeaseError>> + Send;
}

/// Lease timing, derived from `ha.lease_duration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    /// How often the leader renews and a follower looks.
    pub renew_every: Duration,
    /// The leader acts only this long after it sent its last successful
    /// renewal: two periods, so one failed renewal is survived.
    pub renew_deadline: Duration,
}

impl Timing {
    pub fn new(lease: Duration) -> Timing {
        Timing {
            lease,
            renew_every: lease / 3,
            renew_deadline: lease * 2 / 3,
        }
    }
}

/// Who leads, as this replica knows it. Published through `watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// No `[ha]` table: the only controller, always acting.
    Single,
    /// Another replica holds the lease (or nobody, or the table is out of
    /// reach). The leader's item when known.
    Follower {
        leader: Option<LeaseItem>,
    },
    Leader(Term),
}

/// One uninterrupted leadership of this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub token: u64,
    /// When it was taken (monotonic, for the router grace; wall, for humans).
    pub since: Instant,
    pub since_wall: SystemTime,
    /// The last moment this replica may act: its last successful renewal
    /// was sent `renew_deadline` before.
    pub valid_until: Instant,
}

impl Leadership {
    /// The fencing token if this replica may complete and heartbeat now;
    /// 0 for a single controller.
    pub fn acting(&self, now: Instant) -> Option<u64> {
        match self {
            Leadership::Single => Some(0),
            Leadership::Leader(t) if now < t.valid_until => Some(t.token),
            _ => None,
        }
    }

    pub fn is_leader(&self) -> bool {
        !matches!(self, Leadership::Follower { .. })
    }

    /// The leader's advertised URL, for a follower to send routers to.
    pub fn leader_address(&self) -> Option<&str> {
        match self {
            Leadership::Follower { leader: Some(l) } => Some(&l.address),
            _ => None,
        }
    }
}

/// This replica's view of who leads, shared by the API (`/readyz`,
/// `/v1/lifecycle`, `/metrics`), the push hub (redirects) and xDS.
#[derive(Clone)]
pub struct Leaders {
    pub leadership: watch::Receiver<Leadership>,
    /// This replica's name in the lease.
    pub replica: String,
    /// This replica's advertised URL: a lease that names it is no leader to
    /// send routers to (this replica stepped down, its item not yet taken).
    pub address: String,
    pub calls: std::sync::Arc<LeaseCalls>,
}

impl Leaders {
    /// A single controller (no `[ha]`): always leading.
    pub fn single() -> Leaders {
        Leaders {
            leadership: watch::channel(Leadership::Single).1,
            replica: String::new(),
            address: String::new(),
            calls: Default::default(),
        }
    }

    /// The leader's URL for a follower to send routers to, if another
    /// replica leads; `None` while this one leads.
    pub fn redirect(&self) -> Option<Result<String, ()>> {
        let leadership = self.leadership.borrow();
        if leadership.is_leader() {
            return None;
        }
        Some(
            leadership
                .leader_address()
                .filter(|a| *a != self.address)
                .map(str::to_owned)
                .ok_or(()),
        )
    }

    /// Who leads, as `/readyz` and `/v1/lifecycle` show it.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match &*self.leadership.borrow() {
            Leadership::Single => json!({ "role": "single" }),
            Leadership::Leader(t) => json!({
                "role": "leader",
                "replica": self.replica,
                "token": t.token,
                "since": humantime::format_rfc3339_millis(t.since_wall).to_string(),
                "lease_failing": self.calls.failing_json(),
            }),
            Leadership::Follower { leader } => json!({
                "role": "follower",
                "replica": self.replica,
                "leader": leader.as_ref().map(|l| json!({
                    "replica": l.owner,
                    "address": l.address,
                    "token": l.token,
                })),
                "lease_failing": self.calls.failing_json(),
            }),
        }
    }
}

/// DynamoDB calls of the lease by API call and outcome, for `/metrics`:
/// what the lease costs, and whether the table answers.
#[derive(Debug, Default)]
pub struct LeaseCalls {
    counts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Since when lease calls fail, and the newest failure: for `/readyz`.
    failing: Mutex<Option<Failing>>,
}

#[derive(Debug)]
struct Failing {
    since: SystemTime,
    call: &'static str,
    kind: ErrorKind,
    error: String,
}

impl LeaseCalls {
    fn failed(&self, call: &'static str, kind: ErrorKind, error: String) {
        let mut failing = self.failing.lock().expect("lease calls lock");
        let since = failing.as_ref().map_or_else(SystemTime::now, |f| f.since);
        *failing = Some(Failing {
            since,
            call,
            kind,
            error,
        });
    }

    fn answered(&self) {
        *self.failing.lock().expect("lease calls lock") = None;
    }

    /// The failing lease call as `/readyz` names it, or null.
    fn failing_json(&self) -> serde_json::Value {
        match &*self.failing.lock().expect("lease calls lock") {
            None => serde_json::Value::Null,
            Some(f) => serde_json::json!({
                "api": f.call,
                "kind": f.kind,
                "error": f.error,
                "since": humantime::format_rfc3339_millis(f.since).to_string(),
            }),
        }
    }

    /// `call`: `GetItem` or `UpdateItem`; `outcome`: `ok`,
    /// `condition_failed` (someone else holds the lease) or `error`.
    fn count(&self, call: &'static str, outcome: &'static str) {
        *self
            .counts
            .lock()
            .expect("lease calls lock")
            .entry((call, outcome))
            .or_default() += 1;
    }

    pub fn counts(&self) -> Vec<([&'static str; 2], u64)> {
        let counts = self.counts.lock().expect("lease calls lock");
        counts.iter().map(|((c, o), n)| ([*c, *o], *n)).collect()
    }
}

fn outcome<T>(r: &Result<T, LeaseError>, ok: impl FnOnce(&T) -> bool) -> &'static str {
    match r {
        Ok(v) if ok(v) => "ok",
        Ok(_) => "condition_failed",
        Err(_) => "error",
    }
}

/// Resolves when this replica stops leading; never without `[ha]` (the
/// sender of a single controller's leadership is gone: nothing changes).
pub async fn stopped_leading(rx: &mut watch::Receiver<Leadership>) {
    if rx.wait_for(|l| !l.is_leader()).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What the elector does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Renew { token: u64 },
    Acquire,
    Read,
}

impl Call {
    /// The DynamoDB call it starts with, for `signpost_lease_calls_total`.
    fn api(self) -> &'static str {
        match self {
            Call::Renew { .. } | Call::Acquire => "UpdateItem",
            Call::Read => "GetItem",
        }
    }
}

/// The elector's state machine, without I/O: what to call next, and what
/// an answer makes of the leadership. Times are passed in.
#[derive(Clone, Debug)]
pub struct Elector {
    pub timing: Timing,
    pub leadership: Leadership,
}

/// A store's answer to one call, as the elector sees it.
#[derive(Clone, Debug)]
pub enum Answer {
    Read(Option<LeaseItem>),
    Acquired(LeaseItem),
    Renewed,
    /// The conditional write failed: someone else holds the lease.
    Lost,
    /// The call failed or timed out: nothing is known.
    Failed,
}

impl Elector {
    pub fn new(timing: Timing) -> Elector {
        Elector {
            timing,
            leadership: Leadership::Follower { leader: None },
        }
    }

    /// The next call at wall time `now`: a leader renews; a follower takes a
    /// free lease, else looks again.
    pub fn next_call(&self, now: SystemTime) -> Call {
        match &self.leadership {
            Leadership::Leader(t) => Call::Renew { token: t.token },
            Leadership::Follower { leader: None } => Call::Acquire,
            Leadership::Follower { leader: Some(l) } if l.is_free(now) => Call::Acquire,
            _ => Call::Read,
        }
    }

    /// How long to wait before the next call: a period, or less when the
    /// known lease expires sooner (a dead leader's lease is taken promptly).
    pub fn wait(&self, now: SystemTime) -> Duration {
        match &self.leadership {
            Leadership::Follower { leader: Some(l) } if !l.is_free(now) => {
                let left = l.expires.duration_since(now).unwrap_or_default();
                // Just past the expiry, so that the next look finds it free.
                (left + Duration::from_millis(50)).min(self.timing.renew_every)
            }
            Leadership::Follower { leader: Some(_) } => Duration::ZERO,
            _ => self.timing.renew_every,
        }
    }

    /// Applies the answer to a call sent at `sent` (monotonic) / `sent_wall`.
    /// `now` is when the answer came.
    pub fn apply(&mut self, answer: Answer, sent: Instant, sent_wall: SystemTime, now: Instant) {
        let renew_deadline = self.timing.renew_deadline;
        self.leadership = match (
            std::mem::replace(&mut self.leadership, Leadership::Single),
            answer,
        ) {
            (Leadership::Leader(mut t), Answer::Renewed) => {
                t.valid_until = sent + renew_deadline;
                Leadership::Leader(t)
            }
            (_, Answer::Acquired(item)) => Leadership::Leader(Term {
                token: item.token,
                since: now,
                since_wall: sent_wall,
                valid_until: sent + renew_deadline,
            }),
            (Leadership::Leader(_), Answer::Lost) => Leadership::Follower { leader: None },
            // A failed renewal keeps the term until its deadline: one lost
            // call must not end a leadership.
            (Leadership::Leader(t), Answer::Failed) if now < t.valid_until => Leadership::Leader(t),
            (Leadership::Leader(_), _) => Leadership::Follower { leader: None },
            (_, Answer::Read(leader)) => Leadership::Follower { leader },
            // Someone took it between our look and our write: look again.
            (_, Answer::Lost | Answer::Failed | Answer::Renewed) => {
                Leadership::Follower { leader: None }
            }
        };
    }
}

/// Runs the election until `stop`, publishing every change of leadership;
/// releases the lease on the way out.
pub async fn run<S: LeaseStore>(
    store: S,
    me: Candidate,
    timing: Timing,
    tx: watch::Sender<Leadership>,
    calls: std::sync::Arc<LeaseCalls>,
    stop: CancellationToken,
) {
    let mut elector = Elector::new(timing);
    let mut last_failure: Option<String> = None;
    loop {
        let sent = Instant::now();
        let sent_wall = SystemTime::now();
        let call = elector.next_call(sent_wall);
        // A leader's call may not outlive its term: at the deadline it steps
        // down whatever the store is doing.
        let limit = match &elector.leadership {
            Leadership::Leader(t) => t.valid_until,
            _ => sent + timing.renew_every,
        };
        let answer = tokio::select! {
            a = tokio::time::timeout_at(limit, ask(&store, &me, call, sent_wall, timing, &calls)) => match a {
                Ok(Ok(answer)) => { last_failure = None; calls.answered(); answer }
                Ok(Err(e)) => {
                    let message = e.to_string();
                    if last_failure.as_ref() != Some(&message) {
                        warn!(error = %message, "lease call failed");
                    }
                    calls.failed(call.api(), e.kind, message.clone());
                    last_failure = Some(message);
                    Answer::Failed
                }
                Err(_) => {
                    // `ask` was dropped before it could count its call: a
                    // stalled, retrying or throttled store mostly ends so.
                    calls.count(call.api(), "error");
                    let message = "no answer within the lease's own deadline (the SDK's attempts included)";
                    calls.failed(call.api(), ErrorKind::Timeout, message.into());
                    warn!(?call, "lease call cut at the lease's own deadline: the store did not answer in time");
                    Answer::Failed
                }
            },
            _ = stop.cancelled() => break,
        };
        let was = elector.leadership.clone();
        elector.apply(answer, sent, sent_wall, Instant::now());
        announce(&me, &was, &elector.leadership);
        tx.send_if_modified(|current| {
            if *current == elector.leadership {
                return false;
            }
            *current = elector.leadership.clone();
            true
        });
        let wait = elector.wait(SystemTime::now());
        // A leader also wakes at its deadline, to step down on time when the
        // wait outlasts it.
        let wake = match &elector.leadership {
            Leadership::Leader(t) => (Instant::now() + wait).min(t.valid_until),
            _ => Instant::now() + wait,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.cancelled() => break,
        }
        if let Leadership::Leader(t) = &elector.leadership {
            if Instant::now() >= t.valid_until {
                warn!(
                    token = t.token,
                    "no lease renewal within the renew deadline; stepping down"
                );
                elector.leadership = Leadership::Follower { leader: None };
                tx.send_replace(elector.leadership.clone());
            }
        }
    }
    if let Leadership::Leader(t) = &elector.leadership {
        tx.send_replace(Leadership::Follower { leader: None });
        let released = store.release(&me, t.token).await;
        calls.count("UpdateItem", outcome(&released, |_| true));
        match released {
            Ok(()) => info!(token = t.token, "lease released"),
            Err(e) => warn!(error = %e, "could not release the lease; it expires on its own"),
        }
    }
}

async fn ask<S: LeaseStore>(
    store: &S,
    me: &Candidate,
    call: Call,
    now: SystemTime,
    timing: Timing,
    calls: &LeaseCalls,
) -> Result<Answer, LeaseError> {
    let expires = now + timing.lease;
    let read = || async {
        let r = store.read().await;
        calls.count("GetItem", outcome(&r, |_| true));
        r
    };
    Ok(match call {
        Call::Renew { token } => {
            let r = store.renew(me, token, expires).await;
            calls.count("UpdateItem", outcome(&r, |renewed| *renewed));
            if r? {
                Answer::Renewed
            } else {
                Answer::Lost
            }
        }
        Call::Acquire => {
            let r = store.acquire(me, now, expires).await;
            calls.count("UpdateItem", outcome(&r, Option::is_some));
            match r? {
                Some(item) => Answer::Acquired(item),
                None => Answer::Read(read().await?),
            }
        }
        Call::Read => Answer::Read(read().await?),
    })
}

fn announce(me: &Candidate, was: &Leadership, now: &Leadership) {
    match (was, now) {
        (Leadership::Leader(_), Leadership::Leader(_)) => {}
        (_, Leadership::Leader(t)) => {
            info!(replica = %me.id, token = t.token, "took the lease: leading")
        }
        (Leadership::Leader(t), _) => {
            warn!(replica = %me.id, token = t.token, "lost the lease: following")
        }
        (Leadership::Follower { leader: a }, Leadership::Follower { leader: b }) => {
            let owner = |l: &Option<LeaseItem>| l.as_ref().map(|l| (l.owner.clone(), l.token));
            if owner(a) != owner(b) {
                if let Some(l) = b {
                    info!(leader = %l.owner, address = %l.address, token = l.token, "following");
                }
            }
        }
        _ => {}
    }
}

/// Milliseconds since the Unix epoch, as the item stores times.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The lease item in DynamoDB: partition key `name` (a string).
pub struct DynamoLease {
    pub client: aws_sdk_dynamodb::Client,
    pub table: String,
    /// The item's key: one lease per controller deployment.
    pub name: String,
}

impl DynamoLease {
    /// An item that is not what signpost writes.
    fn error(&self, e: impl std::fmt::Display) -> LeaseError {
        LeaseError {
            table: self.table.clone(),
            kind: ErrorKind::Malformed,
            message: e.to_string(),
        }
    }

    fn sdk_error<E>(&self, e: SdkError<E, HttpResponse>) -> LeaseError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let error = CloudError::from_sdk("DynamoDB", e);
        LeaseError {
            table: self.table.clone(),
            kind: error.kind,
            message: error.to_string(),
        }
    }

    fn item(
        &self,
        attrs: &std::collections::HashMap<String, AttributeValue>,
    ) -> Result<LeaseItem, LeaseError> {
        let s = |k: &str| match attrs.get(k) {
            Some(AttributeValue::S(v)) => Ok(v.clone()),
            _ => Err(self.error(format!(
                "item {}: attribute {k} missing or not a string",
                self.name
            ))),
        };
        let n = |k: &str| match attrs.get(k) {
            Some(AttributeValue::N(v)) => v.parse::<u64>().map_err(|_| {
                self.error(format!(
                    "item {}: attribute {k} is not a whole number",
                    self.name
                ))
            }),
            _ => Err(self.error(format!(
                "item {}: attribute {k} missing or not a number",
                self.name
            ))),
        };
        Ok(LeaseItem {
            owner: s("owner")?,
            address: s("address")?,
            token: n("token")?,
            expires: UNIX_EPOCH + Duration::from_millis(n("expires")?),
        })
    }
}

fn num(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn conditional_failed(e: &SdkError<UpdateItemError, impl std::fmt::Debug>) -> bool {
    matches!(
        e.as_service_error(),
        Some(UpdateItemError::ConditionalCheckFailedException(_))
    )
}

impl LeaseStore for DynamoLease {
    async fn read(&self) -> Result<Option<LeaseItem>, LeaseError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("name", AttributeValue::S(self.name.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.sdk_error(e))?;
        out.item.as_ref().map(|i| self.item(i)).transpose()
    }

    async fn acquire(
        &self,
        me: &Candidate,
        now: SystemTime,
        expires: SystemTime,
    ) -> Result<Option<LeaseItem>, LeaseError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("name", AttributeValue::S(self.name.clone()))
            .update_expression(
                "SET #owner = :me, #address = :address, #expires = :expires, #token = if_not_exists(#token, :zero) + :one",
            )
            .condition_expression("attribute_not_exists(#expires) OR #expires <= :now")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#address", "address")
            .expression_attribute_names("#expires", "expires")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":me", AttributeValue::S(me.id.clone()))
            .expression_attribute_values(":address", AttributeValue::S(me.address.clone()))
            .expression_attribute_values(":expires", num(millis(expires)))
            .expression_attribute_values(":now", num(millis(now)))
            .expression_attribute_values(":zero", num(0))
            .expression_attribute_values(":one", num(1))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .send()
            .await;
        match out {
            Ok(out) => {
                let attrs = out
                    .attributes
                    .ok_or_else(|| self.error("UpdateItem returned no attributes"))?;
                self.item(&attrs).map(Some)
            }
            Err(e) if conditional_failed(&e) => Ok(None),
            Err(e) => Err(self.sdk_error(e)),
        }
    }

    async fn renew(
        &self,
        me: &Candidate,
        token: u64,
        expires: SystemTime,
    ) -> Result<bool, LeaseError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("name", AttributeValue::S(self.name.clone()))
            .update_expression("SET #expires = :expires")
            .condition_expression("#owner = :me AND #token = :token")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#expires", "expires")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":me", AttributeValue::S(me.id.clone()))
            .expression_attribute_values(":token", num(token))
            .expression_attribute_values(":expires", num(millis(expires)))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(self.sdk_error(e)),
        }
    }

    async fn release(&self, me: &Candidate, token: u64) -> Result<(), LeaseError> {
        // Expired at the Unix epoch: free for anyone, with the token kept so
        // that the next holder's is higher.
        self.renew(me, token, UNIX_EPOCH).await.map(|_| ())
    }
}

/// An in-memory lease store with the same conditions, for unit tests; it
/// can be made to fail every call.
#[cfg(any(test, feature = "testing"))]
pub mod fake {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct FakeLease {
        pub item: Arc<Mutex<Option<LeaseItem>>>,
        pub down: Arc<AtomicBool>,
    }

    impl FakeLease {
        fn up(&self) -> Result<(), LeaseError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(LeaseError {
                    table: "fake".into(),
                    kind: ErrorKind::Connection,
                    message: "unavailable".into(),
                });
            }
            Ok(())
        }
    }

    impl LeaseStore for FakeLease {
        async fn read(&self) -> Result<Option<LeaseItem>, LeaseError> {
            self.up()?;
            Ok(self.item.lock().unwrap().clone())
        }

        async fn acquire(
            &self,
            me: &Candidate,
            now: SystemTime,
            expires: SystemTime,
        ) -> Result<Option<LeaseItem>, LeaseError> {
            self.up()?;
            let mut item = self.item.lock().unwrap();
            if item.as_ref().is_some_and(|i| !i.is_free(now)) {
                return Ok(None);
            }
            let token = item.as_ref().map_or(0, |i| i.token) + 1;
            *item = Some(LeaseItem {
                owner: me.id.clone(),
                address: me.address.clone(),
                token,
                expires,
            });
            Ok(item.clone())
        }

        async fn renew(
            &self,
            me: &Candidate,
            token: u64,
            expires: SystemTime,
        ) -> Result<bool, LeaseError> {
            self.up()?;
            let mut item = self.item.lock().unwrap();
            match item.as_mut() {
                Some(i) if i.owner == me.id && i.token == token => {
                    i.expires = expires;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }

        async fn release(&self, me: &Candidate, token: u64) -> Result<(), LeaseError> {
            self.renew(me, token, UNIX_EPOCH).await.map(|_| ())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeLease;
    use super::*;
    use std::sync::atomic::Ordering;

    const LEASE: Duration = Duration::from_secs(15);

    fn item(owner: &str, token: u64, expires: SystemTime) -> LeaseItem {
        LeaseItem {
            owner: owner.into(),
            address: format!("http://{owner}"),
            token,
            expires,
        }
    }

    #[test]
    fn timing_renews_three_times_a_lease_and_leaves_a_third_for_skew() {
        let t = Timing::new(LEASE);
        assert_eq!(t.renew_every, Duration::from_secs(5));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
    }

    #[test]
    fn a_follower_takes_only_a_free_lease_and_looks_again_at_its_expiry() {
        let now = SystemTime::now();
        let mut e = Elector::new(Timing::new(LEASE));
        assert_eq!(e.next_call(now), Call::Acquire, "nobody known: try");
        e.leadership = Leadership::Follower {
            leader: Some(item("b", 4, now + Duration::from_secs(2))),
        };
        assert_eq!(e.next_call(now), Call::Read);
        assert_eq!(
            e.wait(now),
            Duration::from_millis(2050),
            "wakes just past the expiry"
        );
        assert_eq!(e.next_call(now + Duration::from_secs(2)), Call::Acquire);
        e.leadership = Leadership::Follower {
            leader: Some(item("b", 4, now + Duration::from_secs(60))),
        };
        assert_eq!(e.wait(now), Duration::from_secs(5), "at most a period");
    }

    #[test]
    fn a_leader_acts_until_the_renew_deadline_counted_from_the_send() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut e = Elector::new(Timing::new(LEASE));
        e.apply(
            Answer::Acquired(item("a", 7, w0 + LEASE)),
            t0,
            w0,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            e.leadership.acting(t0 + Duration::from_millis(9_999)),
            Some(7)
        );
        assert_eq!(e.leadership.acting(t0 + Duration::from_secs(10)), None);
        assert_eq!(e.next_call(w0), Call::Renew { token: 7 });

        // A renewal sent at 5 s moves the deadline to 15 s.
        let t5 = t0 + Duration::from_secs(5);
        e.apply(Answer::Renewed, t5, w0, t5 + Duration::from_secs(3));
        assert_eq!(e.leadership.acting(t0 + Duration::from_secs(14)), Some(7));
        // One failed renewal within the deadline keeps the term...
        let t10 = t0 + Duration::from_secs(10);
        e.apply(Answer::Failed, t10, w0, t10 + Duration::from_secs(1));
        assert!(e.leadership.is_leader());
        // ...one answering after it ends it.
        e.apply(Answer::Failed, t10, w0, t0 + Duration::from_secs(15));
        assert_eq!(e.leadership, Leadership::Follower { leader: None });
    }

    #[test]
    fn a_leader_whose_renewal_is_refused_steps_down_at_once() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut e = Elector::new(Timing::new(LEASE));
        e.apply(Answer::Acquired(item("a", 1, w0 + LEASE)), t0, w0, t0);
        e.apply(Answer::Lost, t0, w0, t0 + Duration::from_secs(1));
        assert_eq!(e.leadership.acting(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_leader_stops_a_third_of_the_lease_before_anyone_may_take_it() {
        // Sent at wall w0: the item expires at w0 + lease; the leader's last
        // act is before t0 + renew_deadline. With clocks in step, the gap is
        // the skew the design tolerates.
        let t = Timing::new(LEASE);
        assert_eq!(t.lease - t.renew_deadline, Duration::from_secs(5));
    }

    fn candidate(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            address: format!("http://{id}"),
        }
    }

    #[tokio::test]
    async fn the_fake_store_lets_one_take_and_increases_the_token_on_takeover() {
        let store = FakeLease::default();
        let now = SystemTime::now();
        let a = store
            .acquire(&candidate("a"), now, now + LEASE)
            .await
            .unwrap();
        assert_eq!(a.map(|i| i.token), Some(1));
        assert_eq!(
            store
                .acquire(&candidate("b"), now, now + LEASE)
                .await
                .unwrap(),
            None
        );
        assert!(store.renew(&candidate("a"), 1, now + LEASE).await.unwrap());
        assert!(!store.renew(&candidate("b"), 1, now + LEASE).await.unwrap());
        let later = now + LEASE;
        let b = store
            .acquire(&candidate("b"), later, later + LEASE)
            .await
            .unwrap();
        assert_eq!(b.map(|i| (i.owner, i.token)), Some(("b".into(), 2)));
        assert!(
            !store
                .renew(&candidate("a"), 1, later + LEASE)
                .await
                .unwrap(),
            "fenced"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_electors_one_leader_and_the_other_takes_over_when_it_stops() {
        let store = FakeLease::default();
        let timing = Timing::new(Duration::from_secs(3));
        let (a_tx, mut a_rx) = watch::channel(Leadership::Follower { leader: None });
        let (b_tx, mut b_rx) = watch::channel(Leadership::Follower { leader: None });
        let a_stop = CancellationToken::new();
        let b_stop = CancellationToken::new();
        let a = tokio::spawn(run(
            store.clone(),
            candidate("a"),
            timing,
            a_tx,
            Default::default(),
            a_stop.clone(),
        ));
        a_rx.wait_for(Leadership::is_leader).await.unwrap();
        tokio::spawn(run(
            store.clone(),
            candidate("b"),
            timing,
            b_tx,
            Default::default(),
            b_stop.clone(),
        ));
        b_rx.wait_for(|l| l.leader_address() == Some("http://a"))
            .await
            .unwrap();
        a_stop.cancel();
        a.await.unwrap();
        let took =
            tokio::time::timeout(Duration::from_secs(5), b_rx.wait_for(Leadership::is_leader))
                .await;
        assert!(took.is_ok(), "a released the lease; b took it");
        assert_eq!(
            store.item.lock().unwrap().as_ref().map(|i| i.token),
            Some(2)
        );
        b_stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_cut_off_from_the_store_steps_down_within_the_renew_deadline() {
        let store = FakeLease::default();
        let timing = Timing::new(Duration::from_secs(3));
        let (tx, mut rx) = watch::channel(Leadership::Follower { leader: None });
        let stop = CancellationToken::new();
        let calls = std::sync::Arc::new(LeaseCalls::default());
        tokio::spawn(run(
            store.clone(),
            candidate("a"),
            timing,
            tx,
            calls.clone(),
            stop.clone(),
        ));
        rx.wait_for(Leadership::is_leader).await.unwrap();
        assert_eq!(calls.failing_json(), serde_json::Value::Null);
        let cut = Instant::now();
        store.down.store(true, Ordering::SeqCst);
        rx.wait_for(|l| !l.is_leader()).await.unwrap();
        assert!(
            cut.elapsed() <= timing.renew_deadline,
            "stepped down after {:?}",
            cut.elapsed()
        );
        // `/readyz` names the failing call and its kind meanwhile.
        let failing = calls.failing_json();
        assert_eq!(failing["api"], "UpdateItem", "{failing}");
        assert_eq!(failing["kind"], "connection", "{failing}");
        store.down.store(false, Ordering::SeqCst);
        // Its own lease has expired by then; it takes it again, token 2.
        rx.wait_for(Leadership::is_leader).await.unwrap();
        assert_eq!(rx.borrow().acting(Instant::now()), Some(2));
        assert_eq!(calls.failing_json(), serde_json::Value::Null);
        stop.cancel();
    }
}
