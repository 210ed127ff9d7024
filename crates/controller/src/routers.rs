//! The routers: every data-plane client the controller serves, whatever its
//! kind, with the revision it has applied and the requests it has in flight
//! to each endpoint. Lifecycle hooks wait on this set; the push servers feed
//! it (the NDJSON hub today; an xDS server or a proxy agent the same way), so
//! that completion logic lives in one place whatever the router kind.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use signpost_protocol::{Ack, Ejection, Epoch, Revision};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::model::rfc3339;

/// What kind of data-plane client a router is: what it speaks, and so what
/// it can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    /// `signpost router` (NDJSON): every ack carries its requests in flight.
    Signpost,
    /// Envoy over xDS: ACKs per resource type; in flight per endpoint from
    /// its load reports (LRS), which arrive apart from the ACKs.
    Envoy,
    /// Proxyless gRPC over xDS: ACKs, but load reports per locality only,
    /// so nothing in flight per endpoint is ever known.
    Grpc,
    /// `signpost haproxy`, an agent driving HAProxy (NDJSON, acks as a
    /// signpost router does, in flight from HAProxy's sessions).
    Haproxy,
    /// `signpost nginx`, an agent driving nginx (NDJSON, acks as a signpost
    /// router does, in flight from nginx workers' upstream connections).
    Nginx,
}

impl RouterKind {
    /// Its name in `/v1/routers` and in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            RouterKind::Signpost => "signpost",
            RouterKind::Envoy => "envoy",
            RouterKind::Grpc => "grpc",
            RouterKind::Haproxy => "haproxy",
            RouterKind::Nginx => "nginx",
        }
    }

    pub const ALL: [RouterKind; 5] = [
        RouterKind::Signpost,
        RouterKind::Envoy,
        RouterKind::Grpc,
        RouterKind::Haproxy,
        RouterKind::Nginx,
    ];

    /// The kinds that subscribe to `/v1/watch` (`kind=` in its query).
    pub fn of_watch(name: &str) -> Option<RouterKind> {
        [RouterKind::Signpost, RouterKind::Haproxy, RouterKind::Nginx]
            .into_iter()
            .find(|k| k.label() == name)
    }

    fn is_xds(self) -> bool {
        matches!(self, RouterKind::Envoy | RouterKind::Grpc)
    }
}

/// What an xDS client has of one resource type.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct XdsTypeStatus {
    /// The `version_info` of the newest response of this type.
    pub sent_version: Option<String>,
    /// The newest version it ACKed.
    pub acked_version: Option<String>,
    /// Resources of this type it subscribes to (`*`: all).
    pub subscribed: Vec<String>,
}

/// A NACK: the client rejected a response and keeps what it had.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Nack {
    pub type_url: String,
    /// The version it rejected.
    pub version: String,
    /// Its `error_detail.message`.
    pub message: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

/// The xDS side of a router record.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct XdsDetails {
    /// By type (`cds`, `eds`, `lds`, `rds`).
    pub types: BTreeMap<&'static str, XdsTypeStatus>,
    pub last_nack: Option<Nack>,
    pub nacks: u64,
    /// Whether its load reports give requests in flight per endpoint
    /// (Envoy with LRS). Otherwise a drain waits for its ACK and then
    /// `drain_timeout`.
    pub reports_in_flight: bool,
    /// When its last load report arrived.
    #[serde(serialize_with = "rfc3339_opt")]
    pub load_reported_at: Option<SystemTime>,
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// How long a disconnected router stays listed, so that an operator can see
/// that it went away and when.
const DISCONNECTED_KEPT: Duration = Duration::from_secs(15 * 60);

/// Router ids are plain names, so that the id in a path or a query is the
/// id the handler sees, with no escaping to disagree about.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `[routers]`: the routers an operator expects, so that a missing one is
/// visible and waited for instead of silently not counted.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExpectedRouters {
    /// Router ids (identities when authentication is on). When set, no
    /// other id may subscribe or ack.
    pub expected: BTreeSet<String>,
    /// At least this many connected routers of a kind.
    pub minimum: BTreeMap<RouterKind, usize>,
}

impl ExpectedRouters {
    /// The first bad entry, as (key, reason) for the config's error.
    pub fn check(&self) -> Result<(), (String, String)> {
        if let Some(id) = self.expected.iter().find(|id| !valid_id(id)) {
            return Err((
                "routers.expected".into(),
                format!("{id:?} is not a router id (1 to 253 letters, digits, '.', '_' or '-')"),
            ));
        }
        if let Some((kind, _)) = self.minimum.iter().find(|(_, n)| **n == 0) {
            return Err((
                format!("routers.minimum.{}", kind.label()),
                "must be at least 1 (leave the kind out to expect none)".into(),
            ));
        }
        Ok(())
    }
}

/// Which routers a wait counts besides the connected ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Absent {
    /// Only connected routers: a launch, where a router that lags merely
    /// sends the new instance no traffic yet.
    Ignored,
    /// Also expected routers that are not connected, and any router that
    /// disconnected less than this long ago: it may still be routing from
    /// its cache, so a termination waits for it to come back and ack.
    Counted(Duration),
}

pub struct Routers {
    /// This controller's lifetime: acks of any other are ignored.
    epoch: Epoch,
    expected: ExpectedRouters,
    /// Acks ignored, by why: for `/metrics`.
    pub ignored: IgnoredAcks,
    /// Only acks, connects and disconnects take this lock, never a stream
    /// write, so it is held for microseconds.
    records: Mutex<BTreeMap<String, RouterRecord>>,
    /// Bumped on every change to `records`, for `wait_routers`.
    changed: watch::Sender<u64>,
    next_connection: AtomicU64,
}

/// Acks that did not count, by reason.
#[derive(Debug, Default)]
pub struct IgnoredAcks {
    pub other_epoch: AtomicU64,
    pub never_sent: AtomicU64,
    pub not_subscribed: AtomicU64,
}

/// Why an ack did not count. Each means that the router does not have (from
/// this controller, on its current connection) what it claims to, so
/// counting it could complete a lifecycle hook early.
#[derive(Debug, Error, PartialEq)]
pub enum AckRefused {
    #[error("router {router:?} is not subscribed")]
    NotSubscribed { router: String },
    #[error("ack for controller epoch {got}; this controller's epoch is {ours} (a restarted controller counts only its own revisions)")]
    OtherEpoch { got: Epoch, ours: Epoch },
    #[error("router {router:?} acked revision {revision}, which was never sent on its current connection (newest sent: {sent:?})")]
    NeverSent {
        router: String,
        revision: Revision,
        sent: Option<Revision>,
    },
}

impl Routers {
    pub fn new(epoch: Epoch) -> Routers {
        Routers::expecting(epoch, ExpectedRouters::default())
    }

    pub fn expecting(epoch: Epoch, expected: ExpectedRouters) -> Routers {
        Routers {
            epoch,
            expected,
            ignored: IgnoredAcks::default(),
            records: Mutex::default(),
            changed: watch::Sender::new(0),
            next_connection: AtomicU64::new(1),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// One router as the controller knows it.
#[derive(Clone, Debug, Serialize)]
pub struct RouterRecord {
    pub id: String,
    pub kind: RouterKind,
    /// The router's address as seen on its watch connection.
    pub address: SocketAddr,
    /// The identity it authenticated as, when authentication is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub connected: bool,
    #[serde(serialize_with = "rfc3339")]
    pub connected_since: SystemTime,
    /// The newest revision written to its stream.
    pub sent_revision: Option<Revision>,
    /// The newest revision it says it routes with.
    pub acked_revision: Option<Revision>,
    /// Its last ack, or its connection if it has not acked yet.
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: SystemTime,
    /// Requests in flight: service → instance → count, from its last ack.
    pub in_flight: BTreeMap<String, BTreeMap<String, u64>>,
    /// Endpoints it ejected on its own (passive health), from its last ack.
    pub ejected: Vec<Ejection>,
    /// Versions, NACKs and load reports of an xDS client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xds: Option<XdsDetails>,
    /// When `acked_revision` last moved: a load report older than that
    /// cannot tell what is in flight since.
    #[serde(skip)]
    acked_at: Option<SystemTime>,
    /// Tells this connection from a newer one of the same router id.
    #[serde(skip)]
    connection: u64,
    #[serde(skip)]
    /// Monotonic (tokio's clock, so that tests can move it).
    disconnected_at: Option<Instant>,
}

impl RouterRecord {
    pub fn has_acked(&self, revision: Revision) -> bool {
        self.acked_revision.is_some_and(|a| a >= revision)
    }

    /// True when this router is known to have nothing in flight to
    /// `instance`. A signpost router says so in every ack. An Envoy says so
    /// in a load report, which must be newer than its last ACK (a report
    /// from before it saw the drain may miss a request sent just after);
    /// an Envoy that sends no report for an endpoint has none in flight. A
    /// gRPC client never says so: its drain ends at `drain_timeout`.
    pub fn drained(&self, instance: &str) -> bool {
        let known = match self.kind {
            RouterKind::Signpost | RouterKind::Haproxy | RouterKind::Nginx => true,
            RouterKind::Grpc => false,
            RouterKind::Envoy => self.xds.as_ref().is_some_and(|x| {
                x.reports_in_flight
                    && match (x.load_reported_at, self.acked_at) {
                        (Some(report), Some(ack)) => report > ack,
                        _ => false,
                    }
            }),
        };
        known && self.in_flight_to(instance) == 0
    }

    /// Requests it reported in flight to `instance`, in any service.
    /// Saturating: the counts are the router's word, and a sum that
    /// overflowed panicked in a debug build (under the records lock, which
    /// it poisoned) and wrapped in a release build, to 0 for a total of
    /// 2^64, which read as drained.
    pub fn in_flight_to(&self, instance: &str) -> u64 {
        self.in_flight
            .values()
            .filter_map(|by_instance| by_instance.get(instance))
            .fold(0, |total, &n| total.saturating_add(n))
    }
}

/// Routers that had not acked a revision when the wait ended.
#[derive(Debug, Error, PartialEq)]
#[error("routers {routers:?} have not acked revision {revision}")]
pub struct NotAcked {
    pub revision: Revision,
    pub routers: Vec<String>,
}

impl Routers {
    /// Every router, sorted by id.
    pub fn list(&self) -> Vec<RouterRecord> {
        self.records.lock().unwrap().values().cloned().collect()
    }

    /// Routers for which `done` is false: the connected ones, and with
    /// `Absent::Counted` those that are missing or recently went away,
    /// each with why.
    pub fn pending(&self, absent: Absent, done: impl Fn(&RouterRecord) -> bool) -> Vec<String> {
        self.pending_up_to(usize::MAX, absent, done)
    }

    /// The first `limit` of `pending`.
    fn pending_up_to(
        &self,
        limit: usize,
        absent: Absent,
        done: impl Fn(&RouterRecord) -> bool,
    ) -> Vec<String> {
        let routers = self.records.lock().unwrap();
        let mut pending: Vec<String> = routers
            .values()
            .filter(|r| r.connected && !done(r))
            .map(|r| r.id.clone())
            .take(limit)
            .collect();
        if let Absent::Counted(within) = absent {
            let now = Instant::now();
            pending.extend(routers.values().filter_map(|r| {
                let ago = now.duration_since(r.disconnected_at?);
                (!r.connected && ago < within && !self.expected.expected.contains(&r.id))
                    .then(|| format!("{} (disconnected {}s ago)", r.id, ago.as_secs()))
            }));
            pending.extend(self.missing_in(&routers));
        }
        pending.truncate(limit);
        pending
    }

    /// Expected routers that are not connected, and kinds with fewer
    /// connected routers than their minimum: for `/readyz`, the metrics and
    /// lifecycle notes.
    pub fn missing(&self) -> Vec<String> {
        self.missing_in(&self.records.lock().unwrap())
    }

    fn missing_in(&self, routers: &BTreeMap<String, RouterRecord>) -> Vec<String> {
        let mut missing: Vec<String> = self
            .expected
            .expected
            .iter()
            .filter(|id| !routers.get(*id).is_some_and(|r| r.connected))
            .map(|id| format!("{id} (expected, not connected)"))
            .collect();
        for (kind, &want) in &self.expected.minimum {
            let have = routers
                .values()
                .filter(|r| r.connected && r.kind == *kind)
                .count();
            if have < want {
                missing.push(format!(
                    "{} routers: {have} connected, {want} expected",
                    kind.label()
                ));
            }
        }
        missing
    }

    /// Waits until `done` holds for every router that counts (see
    /// `pending`), checked again on every ack, connect and disconnect; or
    /// until `limit` passes, then returns the routers still pending. A
    /// router that reconnects counts anew: it gets a fresh snapshot and
    /// must ack it.
    pub async fn wait_routers(
        &self,
        limit: Duration,
        absent: Absent,
        done: impl Fn(&RouterRecord) -> bool,
    ) -> Result<(), Vec<String>> {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                changed.borrow_and_update();
                // Woken by every ack: with 1,000 routers, naming all that
                // are pending at each wake cost more than the acks did.
                if self.pending_up_to(1, absent, &done).is_empty() {
                    return;
                }
                // A recently disconnected router stops counting once its
                // window passes, which no change announces: look again
                // every second meanwhile.
                let _ = tokio::time::timeout(Duration::from_secs(1), changed.changed()).await;
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.pending(absent, &done)),
        }
    }

    /// Waits until every connected router has acked `revision` (or a later
    /// one), or `limit` passes.
    pub async fn wait_acked(&self, revision: Revision, limit: Duration) -> Result<(), NotAcked> {
        self.wait_routers(limit, Absent::Ignored, |r| r.has_acked(revision))
            .await
            .map_err(|routers| NotAcked { revision, routers })
    }

    /// Records a router's ack; false when no such router is subscribed.
    /// Records a router's ack, if it counts: of this controller's epoch, for
    /// a revision sent on the router's current connection. An ack that does
    /// not count changes nothing; it is logged at debug and counted.
    pub fn acked(&self, id: &str, ack: Ack) -> Result<(), AckRefused> {
        let refused = self.check(id, &ack);
        if let Err(why) = &refused {
            self.count_refused(id, why);
            return refused;
        }
        let mut routers = self.records.lock().unwrap();
        let Some(r) = routers.get_mut(id) else {
            return Err(AckRefused::NotSubscribed { router: id.into() });
        };
        if r.acked_revision != Some(ack.revision) {
            debug!(router = %id, revision = ack.revision, "router acked");
            r.acked_at = Some(SystemTime::now());
        }
        r.acked_revision = Some(ack.revision);
        r.last_seen = SystemTime::now();
        r.in_flight = ack.in_flight;
        r.ejected = ack.ejected;
        drop(routers);
        self.bump();
        Ok(())
    }

    fn count_refused(&self, id: &str, why: &AckRefused) {
        let counter = match why {
            AckRefused::NotSubscribed { .. } => &self.ignored.not_subscribed,
            AckRefused::OtherEpoch { .. } => &self.ignored.other_epoch,
            AckRefused::NeverSent { .. } => &self.ignored.never_sent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        debug!(router = %id, error = %why, "ack ignored");
    }

    fn check(&self, id: &str, ack: &Ack) -> Result<(), AckRefused> {
        if ack.epoch != self.epoch {
            return Err(AckRefused::OtherEpoch {
                got: ack.epoch,
                ours: self.epoch,
            });
        }
        let routers = self.records.lock().unwrap();
        let Some(r) = routers.get(id).filter(|r| r.connected) else {
            return Err(AckRefused::NotSubscribed { router: id.into() });
        };
        if r.sent_revision.is_none_or(|sent| ack.revision > sent) {
            return Err(AckRefused::NeverSent {
                router: id.into(),
                revision: ack.revision,
                sent: r.sent_revision,
            });
        }
        Ok(())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records that an xDS client has applied `revision` (ACKed it for every
    /// type it subscribes to), held to the same rules as `acked`. What it
    /// has in flight comes apart, from its load reports.
    pub fn xds_applied(
        &self,
        id: &str,
        epoch: Epoch,
        revision: Revision,
    ) -> Result<(), AckRefused> {
        let ack = Ack {
            epoch,
            revision,
            in_flight: BTreeMap::new(),
            ejected: Vec::new(),
        };
        let refused = self.check(id, &ack);
        if let Err(why) = &refused {
            self.count_refused(id, why);
            return refused;
        }
        let mut routers = self.records.lock().unwrap();
        let Some(r) = routers.get_mut(id) else {
            return Err(AckRefused::NotSubscribed { router: id.into() });
        };
        if r.acked_revision.is_none_or(|a| a < revision) {
            debug!(router = %id, revision, "xDS client applied");
            r.acked_revision = Some(revision);
            r.acked_at = Some(SystemTime::now());
        }
        r.last_seen = SystemTime::now();
        drop(routers);
        self.bump();
        Ok(())
    }

    /// Replaces an xDS client's details (versions, NACKs) on `connection`.
    pub fn xds_status(&self, id: &str, connection: u64, update: impl FnOnce(&mut XdsDetails)) {
        let mut routers = self.records.lock().unwrap();
        if let Some(r) = routers.get_mut(id).filter(|r| r.connection == connection) {
            update(r.xds.get_or_insert_with(XdsDetails::default));
            drop(routers);
            self.bump();
        }
    }

    /// An Envoy's load report: what it has in flight now, service →
    /// instance → count, replacing the last report. Ignored for a router
    /// that is not connected as an Envoy.
    pub fn load_reported(
        &self,
        id: &str,
        in_flight: BTreeMap<String, BTreeMap<String, u64>>,
    ) -> bool {
        let mut routers = self.records.lock().unwrap();
        let Some(r) = routers
            .get_mut(id)
            .filter(|r| r.connected && r.kind == RouterKind::Envoy)
        else {
            return false;
        };
        let now = SystemTime::now();
        let xds = r.xds.get_or_insert_with(XdsDetails::default);
        xds.reports_in_flight = true;
        xds.load_reported_at = Some(now);
        r.in_flight = in_flight;
        drop(routers);
        self.bump();
        true
    }

    pub fn connect(&self, id: &str, address: SocketAddr) -> u64 {
        self.connect_kind(id, address, RouterKind::Signpost)
    }

    /// Connects a router of `kind`; a connection of the same id replaces
    /// the older one.
    pub fn connect_kind(&self, id: &str, address: SocketAddr, kind: RouterKind) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut routers = self.records.lock().unwrap();
        routers.retain(|_, r| {
            r.disconnected_at
                .is_none_or(|t| t.elapsed() < DISCONNECTED_KEPT)
        });
        routers.insert(
            id.to_owned(),
            RouterRecord {
                id: id.to_owned(),
                kind,
                address,
                identity: None,
                connected: true,
                connected_since: now,
                sent_revision: None,
                acked_revision: None,
                last_seen: now,
                in_flight: BTreeMap::new(),
                ejected: Vec::new(),
                xds: kind.is_xds().then(XdsDetails::default),
                acked_at: None,
                connection,
                disconnected_at: None,
            },
        );
        drop(routers);
        self.bump();
        connection
    }

    /// Records the identity the router on `connection` authenticated as.
    pub fn identify(&self, id: &str, connection: u64, identity: &str) {
        if let Some(r) = self.records.lock().unwrap().get_mut(id) {
            if r.connection == connection {
                r.identity = Some(identity.to_owned());
            }
        }
    }

    pub fn sent(&self, id: &str, connection: u64, revision: Revision) {
        if let Some(r) = self.records.lock().unwrap().get_mut(id) {
            if r.connection == connection {
                r.sent_revision = Some(revision);
            }
        }
    }

    pub fn disconnect(&self, id: &str, connection: u64) {
        let mut routers = self.records.lock().unwrap();
        // A newer connection of the same router replaced this one: leave it.
        if let Some(r) = routers.get_mut(id).filter(|r| r.connection == connection) {
            r.connected = false;
            r.disconnected_at = Some(Instant::now());
            drop(routers);
            info!(router = %id, "router disconnected");
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn acked(hub: &Routers, id: &str, revision: Revision) {
        let mut routers = hub.records.lock().unwrap();
        routers.get_mut(id).unwrap().acked_revision = Some(revision);
        drop(routers);
        hub.bump();
    }

    #[tokio::test(start_paused = true)]
    async fn wait_acked_waits_for_every_connected_router() {
        let hub = Arc::new(Routers::new(Epoch::from_bits(1)));
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        hub.connect("a", address);
        let b = hub.connect("b", address);
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.wait_acked(3, Duration::from_secs(10)).await }
        });
        acked(&hub, "a", 3);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "b has not acked");
        acked(&hub, "b", 2);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "b acked an older revision");
        hub.disconnect("b", b);
        assert_eq!(
            waiter.await.unwrap(),
            Ok(()),
            "a disconnected router stops counting"
        );

        hub.connect("b", address);
        let err = hub.wait_acked(3, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.routers, vec!["b".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_termination_waits_for_missing_and_recently_gone_routers() {
        let expected = ExpectedRouters {
            expected: BTreeSet::from(["a".to_string(), "e".to_string()]),
            minimum: BTreeMap::from([(RouterKind::Envoy, 1)]),
        };
        let hub = Arc::new(Routers::expecting(Epoch::from_bits(1), expected));
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        hub.connect("a", address);
        let b = hub.connect("b", address);
        acked(&hub, "a", 3);
        hub.disconnect("b", b);
        assert_eq!(
            hub.missing(),
            [
                "e (expected, not connected)",
                "envoy routers: 0 connected, 1 expected"
            ]
        );
        let done = |r: &RouterRecord| r.has_acked(3);
        assert_eq!(
            hub.pending(Absent::Ignored, done),
            Vec::<String>::new(),
            "a launch counts connected routers only"
        );
        assert_eq!(
            hub.pending(Absent::Counted(Duration::from_secs(10)), done),
            [
                "b (disconnected 0s ago)",
                "e (expected, not connected)",
                "envoy routers: 0 connected, 1 expected"
            ]
        );

        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move {
                hub.wait_routers(
                    Duration::from_secs(60),
                    Absent::Counted(Duration::from_secs(10)),
                    |r| r.has_acked(3),
                )
                .await
            }
        });
        hub.connect("e", address);
        acked(&hub, "e", 3);
        hub.connect_kind("x", address, RouterKind::Envoy);
        acked(&hub, "x", 3);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !waiter.is_finished(),
            "b went away 5 s ago: it may still route"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(waiter.await.unwrap(), Ok(()), "b's window is over");

        let e = hub.connect("e", address);
        hub.disconnect("e", e);
        let still = hub
            .wait_routers(
                Duration::from_secs(30),
                Absent::Counted(Duration::from_secs(10)),
                |_| true,
            )
            .await
            .unwrap_err();
        assert_eq!(
            still,
            ["e (expected, not connected)"],
            "an expected router is waited for to the limit, however long gone"
        );
    }

    #[test]
    fn expected_routers_are_checked_by_key() {
        let bad = ExpectedRouters {
            expected: BTreeSet::from(["edge 1".to_string()]),
            ..Default::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "routers.expected");
        let zero = ExpectedRouters {
            minimum: BTreeMap::from([(RouterKind::Grpc, 0)]),
            ..Default::default()
        };
        assert_eq!(zero.check().unwrap_err().0, "routers.minimum.grpc");
        let config: crate::config::Config =
            toml::from_str("[routers]\nexpected = [\"edge-1\"]\nminimum = { envoy = 2 }\n")
                .unwrap();
        assert_eq!(config.routers.minimum[&RouterKind::Envoy], 2);
        assert!(
            toml::from_str::<crate::config::Config>("[routers]\nminimum = { apache = 1 }\n")
                .is_err()
        );
    }

    #[test]
    fn an_old_connection_going_away_does_not_disconnect_the_new_one() {
        let hub = Arc::new(Routers::new(Epoch::from_bits(1)));
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let old = hub.connect("a", address);
        let _new = hub.connect("a", address);
        hub.disconnect("a", old);
        assert!(hub.list()[0].connected);
    }

    fn ack(epoch: Epoch, revision: Revision) -> Ack {
        Ack {
            epoch,
            revision,
            in_flight: BTreeMap::new(),
            ejected: vec![],
        }
    }

    #[test]
    fn in_flight_counts_that_overflow_a_u64_saturate_and_are_not_drained() {
        // Written with the fuzz target's ack check (corpus/ack/
        // seed-shared-instance-overflow): the sum overflowed.
        let routers = Routers::new(Epoch::from_bits(1));
        let connection = routers.connect("edge-1", "127.0.0.1:1".parse().unwrap());
        routers.sent("edge-1", connection, 1);
        let mut big = ack(Epoch::from_bits(1), 1);
        big.in_flight = BTreeMap::from([
            ("users".into(), BTreeMap::from([("i-1".into(), u64::MAX)])),
            ("admin".into(), BTreeMap::from([("i-1".into(), 1)])),
        ]);
        routers.acked("edge-1", big).unwrap();
        let record = &routers.list()[0];
        assert_eq!(record.in_flight_to("i-1"), u64::MAX);
        assert!(!record.drained("i-1"));
    }

    #[test]
    fn an_ack_for_a_revision_never_sent_is_ignored() {
        // A router still acking what a previous controller sent it (its
        // revision 20) must not count for this controller's revision 1.
        let ours = Epoch::from_bits(1);
        let routers = Routers::new(ours);
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let c = routers.connect("a", address);
        assert_eq!(
            routers.acked("a", ack(ours, 20)),
            Err(AckRefused::NeverSent {
                router: "a".into(),
                revision: 20,
                sent: None
            })
        );
        routers.sent("a", c, 1);
        assert!(routers.acked("a", ack(ours, 2)).is_err(), "2 was not sent");
        assert_eq!(routers.list()[0].acked_revision, None);
        assert_eq!(routers.ignored.never_sent.load(Ordering::Relaxed), 2);
        assert_eq!(routers.acked("a", ack(ours, 1)), Ok(()));
        assert!(routers.list()[0].has_acked(1));
    }

    #[test]
    fn an_ack_of_another_controller_epoch_is_ignored() {
        let ours = Epoch::from_bits(1);
        let theirs = Epoch::from_bits(2);
        let routers = Routers::new(ours);
        let c = routers.connect("a", "127.0.0.1:1".parse().unwrap());
        routers.sent("a", c, 5);
        assert_eq!(
            routers.acked("a", ack(theirs, 5)),
            Err(AckRefused::OtherEpoch { got: theirs, ours })
        );
        assert_eq!(routers.list()[0].acked_revision, None);
        assert_eq!(routers.ignored.other_epoch.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_ack_after_the_connection_closed_is_ignored() {
        let ours = Epoch::from_bits(1);
        let routers = Routers::new(ours);
        let c = routers.connect("a", "127.0.0.1:1".parse().unwrap());
        routers.sent("a", c, 5);
        routers.disconnect("a", c);
        assert!(matches!(
            routers.acked("a", ack(ours, 5)),
            Err(AckRefused::NotSubscribed { .. })
        ));
        // A new connection starts with nothing sent.
        routers.connect("a", "127.0.0.1:1".parse().unwrap());
        assert!(matches!(
            routers.acked("a", ack(ours, 5)),
            Err(AckRefused::NeverSent { sent: None, .. })
        ));
    }

    #[test]
    fn an_envoy_is_drained_only_by_a_load_report_newer_than_its_ack() {
        let ours = Epoch::from_bits(1);
        let routers = Routers::new(ours);
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let c = routers.connect_kind("envoy-1", address, RouterKind::Envoy);
        routers.sent("envoy-1", c, 3);
        assert!(
            routers
                .xds_applied("envoy-1", Epoch::from_bits(2), 3)
                .is_err(),
            "another epoch never counts"
        );
        assert!(
            routers.xds_applied("envoy-1", ours, 4).is_err(),
            "4 never sent"
        );
        // A report from before the ACK says nothing of requests sent since.
        assert!(routers.load_reported("envoy-1", BTreeMap::new()));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(routers.xds_applied("envoy-1", ours, 3), Ok(()));
        let r = &routers.list()[0];
        assert!(r.has_acked(3) && !r.drained("i-1"), "{r:?}");
        std::thread::sleep(Duration::from_millis(2));
        let busy = BTreeMap::from([("web".into(), BTreeMap::from([("i-1".into(), 2)]))]);
        assert!(routers.load_reported("envoy-1", busy));
        assert!(!routers.list()[0].drained("i-1"), "2 in flight");
        assert!(routers.list()[0].drained("i-2"), "nothing reported for i-2");
        assert!(routers.load_reported("envoy-1", BTreeMap::new()));
        assert!(
            routers.list()[0].drained("i-1"),
            "no report entry: none in flight"
        );
    }

    #[test]
    fn a_grpc_client_is_never_known_drained_and_a_signpost_router_by_its_ack() {
        let ours = Epoch::from_bits(1);
        let routers = Routers::new(ours);
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let g = routers.connect_kind("grpc-1", address, RouterKind::Grpc);
        routers.sent("grpc-1", g, 1);
        assert_eq!(routers.xds_applied("grpc-1", ours, 1), Ok(()));
        assert!(
            !routers.load_reported("grpc-1", BTreeMap::new()),
            "per-locality only"
        );
        let s = routers.connect("r1", address);
        routers.sent("r1", s, 1);
        assert_eq!(routers.acked("r1", ack(ours, 1)), Ok(()));
        let list = routers.list();
        assert!(
            !list[0].drained("i-1"),
            "gRPC: the drain ends at drain_timeout"
        );
        assert!(list[1].drained("i-1"));
        assert_eq!(list[1].kind, RouterKind::Signpost);
    }
}
