//! Reconciliation: a pure `plan(fleet, snapshot) -> changes`, and the loop
//! that lists the fleet on every resync and applies the plan.
//!
//! The loop is level-triggered: every change is derived from a complete
//! listing, so a missed or repeated trigger is harmless. A listing that fails
//! produces no plan at all, so a failure can never remove an endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cloud::{AutoScaling, CallCount, ErrorKind};
use crate::guard::{HeldRemoval, RemovalGuard};
use crate::model::{
    rfc3339, Change, Endpoint, EndpointState, Fleet, GroupProblem, InstanceId, ObservedGroup,
    ObservedInstance, ServiceSettings, Snapshot,
};
use crate::registry::Registry;

/// Computes the changes that bring the registry in line with the fleet.
///
/// Rules, in the order they matter:
/// - an endpoint whose group is gone, whose instance left the group, or whose
///   instance is known to be leaving (past launch or terminate hooks, or EC2
///   not `running`) is removed;
/// - an endpoint whose instance a terminate hook holds (`Terminating:Wait`)
///   goes `draining`: out of routing but kept, so that `lifecycle` can wait
///   for routers to let go of it before the instance may terminate;
/// - a group whose tags cannot be used, and every group of a service whose
///   groups disagree on route, port or health, is reported and frozen: its
///   endpoints stay as they are (but for departures) and nothing is added,
///   because guessing would route traffic to the wrong place;
/// - every other candidate instance (`InService`, or held by a launch hook,
///   and `running` with an address) is registered, starting not ready.
pub fn plan(fleet: &Fleet, current: &Snapshot) -> Vec<Change> {
    let mut problems = BTreeMap::new();
    let mut frozen: BTreeSet<&str> = BTreeSet::new();
    let mut named: BTreeSet<&str> = BTreeSet::new();
    let mut usable: BTreeMap<&str, Vec<(&ObservedGroup, &ServiceSettings)>> = BTreeMap::new();

    for group in &fleet.groups {
        if let Some(service) = &group.service {
            named.insert(service);
        }
        match (&group.service, &group.settings) {
            (Some(service), Ok(settings)) => {
                usable.entry(service).or_default().push((group, settings))
            }
            (service, settings) => {
                let reason = settings
                    .as_ref()
                    .err()
                    .map_or("no service name", |r| r.as_str());
                frozen.insert(&group.name);
                problems.insert(
                    group.name.clone(),
                    problem(group, service, reason.to_owned()),
                );
            }
        }
    }

    let mut agreed: BTreeMap<&str, (&ServiceSettings, Vec<&ObservedGroup>)> = BTreeMap::new();
    for (service, groups) in usable {
        let first = groups[0].1;
        if groups.iter().all(|(_, s)| *s == first) {
            agreed.insert(service, (first, groups.iter().map(|(g, _)| *g).collect()));
            continue;
        }
        let detail = groups
            .iter()
            .map(|(g, s)| {
                format!(
                    "{} has route {} port {} health {}",
                    g.name, s.route, s.port, s.health
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        for (group, _) in &groups {
            frozen.insert(&group.name);
            let reason = format!(
                "groups of service {service} disagree ({detail}); its endpoints are kept as they are until the tags agree"
            );
            problems.insert(group.name.clone(), problem(group, &group.service, reason));
        }
    }

    let groups: HashMap<&str, &ObservedGroup> =
        fleet.groups.iter().map(|g| (g.name.as_str(), g)).collect();
    let mut changes = Vec::new();
    let mut removed: BTreeSet<(&str, &InstanceId)> = BTreeSet::new();

    for (service, svc) in &current.services {
        for (id, endpoint) in &svc.endpoints {
            let reason = removal_reason(service, endpoint, &groups, &frozen, &agreed);
            if let Some(reason) = reason {
                removed.insert((service, id));
                changes.push(Change::RemoveEndpoint {
                    service: service.clone(),
                    instance: id.clone(),
                    reason,
                });
            } else if endpoint.state != EndpointState::Draining
                && observed(&groups, endpoint).is_some_and(|i| i.is_draining())
            {
                changes.push(Change::SetState {
                    service: service.clone(),
                    instance: id.clone(),
                    address: endpoint.address,
                    port: endpoint.port,
                    state: EndpointState::Draining,
                });
            }
        }
    }

    for (service, (settings, service_groups)) in &agreed {
        let all_groups: BTreeSet<String> = fleet
            .groups
            .iter()
            .filter(|g| g.service.as_deref() == Some(*service))
            .map(|g| g.name.clone())
            .collect();
        let existing = current.services.get(*service);
        if existing.is_none_or(|s| s.settings != **settings || s.groups != all_groups) {
            changes.push(Change::PutService {
                name: service.to_string(),
                settings: (*settings).clone(),
                groups: all_groups,
            });
        }
        for group in service_groups {
            for instance in group.instances.iter().filter(|i| i.is_candidate()) {
                let registered = existing.is_some_and(|s| s.endpoints.contains_key(&instance.id))
                    && !removed.contains(&(*service, &instance.id));
                if registered {
                    continue;
                }
                let ec2 = instance.ec2.as_ref().expect("candidates have EC2 state");
                changes.push(Change::AddEndpoint {
                    service: service.to_string(),
                    endpoint: Endpoint {
                        instance_id: instance.id.clone(),
                        address: ec2.private_ip.expect("candidates have an address"),
                        port: settings.port,
                        zone: instance.zone.clone(),
                        group: group.name.clone(),
                        state: EndpointState::Starting,
                        since: SystemTime::UNIX_EPOCH,
                    },
                });
            }
        }
    }

    for (service, svc) in &current.services {
        let all_gone = svc
            .endpoints
            .keys()
            .all(|id| removed.contains(&(service.as_str(), id)));
        if !named.contains(service.as_str()) && all_gone {
            changes.push(Change::RemoveService {
                name: service.clone(),
            });
        }
    }

    if problems != current.problems {
        changes.push(Change::SetProblems(problems));
    }
    changes
}

fn problem(group: &ObservedGroup, service: &Option<String>, reason: String) -> GroupProblem {
    GroupProblem {
        group: group.name.clone(),
        service: service.clone(),
        reason,
    }
}

/// The fleet's view of an endpoint's instance, in the endpoint's group.
fn observed<'a>(
    groups: &HashMap<&str, &'a ObservedGroup>,
    endpoint: &Endpoint,
) -> Option<&'a ObservedInstance> {
    groups
        .get(endpoint.group.as_str())?
        .instances
        .iter()
        .find(|i| i.id == endpoint.instance_id)
}

fn removal_reason(
    service: &str,
    endpoint: &Endpoint,
    groups: &HashMap<&str, &ObservedGroup>,
    frozen: &BTreeSet<&str>,
    agreed: &BTreeMap<&str, (&ServiceSettings, Vec<&ObservedGroup>)>,
) -> Option<&'static str> {
    let Some(group) = groups.get(endpoint.group.as_str()) else {
        return Some("group deleted or no longer tagged");
    };
    let Some(instance) = observed(groups, endpoint) else {
        return Some("instance left the group");
    };
    if instance.is_leaving() {
        return Some("instance is leaving (lifecycle past its hooks, or EC2 not running)");
    }
    if frozen.contains(group.name.as_str()) {
        return None;
    }
    if group.service.as_deref() != Some(service) {
        return Some("group now serves another service");
    }
    let (settings, _) = agreed.get(service)?;
    let address = instance.ec2.as_ref().and_then(|e| e.private_ip);
    if address.is_some_and(|a| a != endpoint.address) || settings.port != endpoint.port {
        return Some("address or port changed");
    }
    None
}

/// What readiness is judged on: the outcome of the last listings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    /// When the last complete listing was applied.
    #[serde(serialize_with = "opt_rfc3339")]
    pub last_success: Option<SystemTime>,
    /// When listings started failing, if the last one failed.
    #[serde(serialize_with = "opt_rfc3339")]
    pub failing_since: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Wall time and AWS calls of the last complete listing.
    pub last_duration_ms: Option<u64>,
    pub last_calls: Option<CallCount>,
    pub groups: usize,
    pub instances: usize,
    /// Since start: AWS calls made by complete listings, listings that
    /// failed, and failures by API and kind (for metrics).
    pub calls_total: CallCount,
    pub syncs_total: u64,
    #[serde(serialize_with = "by_api_and_kind")]
    pub failures_total: BTreeMap<(&'static str, ErrorKind), u64>,
    /// Removals the mass-removal guard holds after the last listing.
    pub held_removals: Vec<HeldRemoval>,
}

/// Failures keyed `api/kind` in `/readyz`, as they always were.
fn by_api_and_kind<S: serde::Serializer>(
    failures: &BTreeMap<(&'static str, ErrorKind), u64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        failures
            .iter()
            .map(|((api, kind), n)| (format!("{api}/{}", kind.label()), n)),
    )
}

fn opt_rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

impl SyncStatus {
    /// Ready once a complete listing has been applied, and while the last one
    /// is younger than three resync periods.
    pub fn readiness(&self, now: SystemTime, resync: Duration) -> Result<(), String> {
        let failing = || match (&self.last_error, self.failing_since) {
            (Some(e), Some(since)) => format!(
                "; listing has failed since {}: {e}",
                humantime::format_rfc3339_seconds(since)
            ),
            _ => String::new(),
        };
        let Some(last) = self.last_success else {
            return Err(format!("no complete sync yet{}", failing()));
        };
        let age = now.duration_since(last).unwrap_or_default();
        if age > resync * 3 {
            return Err(format!(
                "last complete sync was {:.1}s ago (limit {}){}",
                age.as_secs_f64(),
                humantime::format_duration(resync * 3),
                failing()
            ));
        }
        Ok(())
    }
}

/// Resolves once the registry is worth routing on after a start: a complete
/// listing has been applied and no endpoint is still `starting` (each has
/// its first verdict), or `limit` after that listing, so that one instance
/// that never answers cannot hold every router for ever. Resolves never if
/// the sync status sender is gone first.
pub async fn warmed_up(
    mut status: watch::Receiver<SyncStatus>,
    mut registry: watch::Receiver<Arc<Snapshot>>,
    limit: Duration,
) {
    if status.wait_for(|s| s.last_success.is_some()).await.is_err() {
        return std::future::pending().await;
    }
    let settled = registry.wait_for(|snap| {
        snap.services
            .values()
            .flat_map(|s| s.endpoints.values())
            .all(|e| e.state != EndpointState::Starting)
    });
    let _ = tokio::time::timeout(limit, settled).await;
}

/// The reconcile loop: list, plan, apply, then wait for the next resync or an
/// early trigger. After a failure it retries sooner, with jittered
/// exponential backoff capped at the resync interval.
pub struct Reconciler<C> {
    pub cloud: Arc<C>,
    pub registry: Arc<Registry>,
    pub status: watch::Sender<SyncStatus>,
    /// Every complete listing, once applied (for `lifecycle`).
    pub fleet: watch::Sender<Arc<Fleet>>,
    pub resync_interval: Duration,
    /// Asks for a reconcile now (events, tests). Extra wake-ups are harmless.
    pub trigger: Arc<Notify>,
    /// Holds suspicious mass removals (see `guard`). Only this loop uses it.
    pub guard: std::sync::Mutex<RemovalGuard>,
}

impl<C: AutoScaling> Reconciler<C> {
    pub async fn run(self, shutdown: CancellationToken) {
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(self.resync_interval)
            .with_jitter()
            .without_max_times();
        let mut backoff = retry.build();
        loop {
            let wait = match self.sync_once().await {
                Ok(()) => {
                    backoff = retry.build();
                    self.resync_interval
                }
                Err(()) => backoff.next().unwrap_or(self.resync_interval),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.trigger.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One list-plan-apply pass. The error is already logged and recorded.
    pub async fn sync_once(&self) -> Result<(), ()> {
        let started = Instant::now();
        match self.cloud.describe_fleet().await {
            Ok((fleet, calls)) => {
                let current = self.registry.snapshot();
                let mut guard = self.guard.lock().unwrap();
                let changes = guard.filter(&fleet, &current, plan(&fleet, &current));
                let held = guard.held();
                drop(guard);
                // Before the registry moves, so that /metrics and /readyz
                // never lag the problem /v1/services shows.
                self.status
                    .send_modify(|s| s.held_removals.clone_from(&held));
                let now = SystemTime::now();
                if let Some(revision) = self.registry.apply(&changes, now) {
                    info!(revision, changes = changes.len(), "registry updated");
                }
                let elapsed = started.elapsed();
                let instances = fleet.groups.iter().map(|g| g.instances.len()).sum();
                let groups = fleet.groups.len();
                self.fleet.send_replace(Arc::new(fleet));
                self.status.send_modify(|s| {
                    if let Some(since) = s.failing_since {
                        info!(failed_since = %humantime::format_rfc3339_seconds(since), "listing recovered");
                    }
                    s.last_success = Some(now);
                    s.failing_since = None;
                    s.last_error = None;
                    s.last_duration_ms = Some(elapsed.as_millis() as u64);
                    s.last_calls = Some(calls);
                    s.calls_total.describe_auto_scaling_groups += calls.describe_auto_scaling_groups;
                    s.calls_total.describe_instances += calls.describe_instances;
                    s.calls_total.describe_lifecycle_hooks += calls.describe_lifecycle_hooks;
                    s.syncs_total += 1;
                    s.groups = groups;
                    s.instances = instances;
                });
                tracing::debug!(groups, instances, ?elapsed, ?calls, "resync complete");
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                let key = (error.api, error.kind);
                self.status.send_modify(|s| {
                    *s.failures_total.entry(key).or_default() += 1;
                    let since = *s.failing_since.get_or_insert_with(SystemTime::now);
                    warn!(
                        error = %message,
                        failing_since = %humantime::format_rfc3339_seconds(since),
                        "fleet listing failed; registry kept as it was"
                    );
                    s.last_error = Some(message.clone());
                });
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Ec2Instance, HealthCheck, ObservedInstance};

    fn settings(port: u16) -> ServiceSettings {
        ServiceSettings {
            route: "/users".into(),
            port,
            health: HealthCheck::Http {
                path: "/health".into(),
            },
        }
    }

    fn instance(id: &str, last_octet: u8, lifecycle: &str, state: &str) -> ObservedInstance {
        ObservedInstance {
            id: id.into(),
            lifecycle_state: lifecycle.into(),
            zone: "us-east-1a".into(),
            ec2: Some(Ec2Instance {
                state: state.into(),
                private_ip: Some([127, 42, 1, last_octet].into()),
                launch_time: None,
            }),
        }
    }

    fn running(id: &str, last_octet: u8) -> ObservedInstance {
        instance(id, last_octet, "InService", "running")
    }

    fn group(
        name: &str,
        service: &str,
        port: u16,
        instances: Vec<ObservedInstance>,
    ) -> ObservedGroup {
        ObservedGroup {
            name: name.into(),
            service: Some(service.into()),
            settings: Ok(settings(port)),
            instances,
            hooks: vec![],
        }
    }

    /// Applies plans until nothing changes, as the loop would.
    fn converge(fleet: &Fleet, registry: &Registry) -> Vec<Change> {
        let changes = plan(fleet, &registry.snapshot());
        registry.apply(&changes, SystemTime::now());
        assert_eq!(
            plan(fleet, &registry.snapshot()),
            vec![],
            "a second plan is empty"
        );
        changes
    }

    fn ids(registry: &Registry, service: &str) -> Vec<String> {
        registry
            .snapshot()
            .services
            .get(service)
            .map_or(vec![], |s| {
                s.endpoints.keys().map(InstanceId::to_string).collect()
            })
    }

    #[test]
    fn candidates_are_registered_starting() {
        let r = Registry::new();
        let fleet = Fleet {
            groups: vec![group(
                "users-a",
                "users",
                8080,
                vec![
                    running("i-1", 4),
                    running("i-2", 5),
                    instance("i-3", 6, "Pending", "pending"),
                    instance("i-4", 7, "InService", "stopping"),
                ],
            )],
        };
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-1", "i-2"]);
        let snap = r.snapshot();
        let e = snap.endpoint("users", &"i-1".into()).unwrap();
        assert_eq!(
            (e.state, e.port, e.address.to_string()),
            (EndpointState::Starting, 8080, "127.42.1.4".into())
        );
    }

    #[test]
    fn scale_in_removes_exactly_the_instances_that_left() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group(
                "g",
                "users",
                80,
                (1..=6).map(|n| running(&format!("i-{n}"), n)).collect(),
            )],
        };
        converge(&fleet, &r);
        fleet.groups[0]
            .instances
            .retain(|i| i.id.as_str() == "i-2" || i.id.as_str() == "i-5");
        let changes = converge(&fleet, &r);
        assert_eq!(changes.len(), 4);
        assert_eq!(ids(&r, "users"), ["i-2", "i-5"]);
    }

    #[test]
    fn terminating_and_stopped_instances_are_removed() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group(
                "g",
                "users",
                80,
                vec![running("i-1", 1), running("i-2", 2), running("i-3", 3)],
            )],
        };
        converge(&fleet, &r);
        fleet.groups[0].instances[0].lifecycle_state = "Terminating:Proceed".into();
        fleet.groups[0].instances[1].ec2.as_mut().unwrap().state = "stopped".into();
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-3"]);
    }

    #[test]
    fn hooks_hold_launching_instances_in_and_terminating_ones_draining() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group(
                "g",
                "users",
                80,
                vec![
                    running("i-1", 1),
                    instance("i-2", 2, "Pending:Wait", "running"),
                    instance("i-3", 3, "Terminating:Wait", "running"),
                ],
            )],
        };
        converge(&fleet, &r);
        assert_eq!(
            ids(&r, "users"),
            ["i-1", "i-2"],
            "a launch hook's instance is checked and pushed before it is InService; a terminating one is never added"
        );

        fleet.groups[0].instances[0].lifecycle_state = "Terminating:Wait".into();
        converge(&fleet, &r);
        let state = |id: &str| r.snapshot().endpoint("users", &id.into()).map(|e| e.state);
        assert_eq!(state("i-1"), Some(EndpointState::Draining));

        // Still draining while frozen: departures apply to frozen groups.
        fleet.groups[0].settings = Err("bad tag".into());
        converge(&fleet, &r);
        assert_eq!(state("i-1"), Some(EndpointState::Draining));

        // Past the hook: removed.
        fleet.groups[0].instances[0].lifecycle_state = "Terminating:Proceed".into();
        converge(&fleet, &r);
        assert_eq!(state("i-1"), None);
    }

    #[test]
    fn instance_unknown_to_ec2_is_neither_added_nor_removed() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group(
                "g",
                "users",
                80,
                vec![running("i-1", 1), running("i-2", 2)],
            )],
        };
        fleet.groups[0].instances[1].ec2 = None;
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-1"]);
        fleet.groups[0].instances[1] = running("i-2", 2);
        converge(&fleet, &r);
        fleet.groups[0].instances[0].ec2 = None;
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-1", "i-2"]);
    }

    #[test]
    fn groups_of_one_service_merge() {
        let r = Registry::new();
        let fleet = Fleet {
            groups: vec![
                group("blue", "users", 80, vec![running("i-1", 1)]),
                group("green", "users", 80, vec![running("i-2", 2)]),
            ],
        };
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-1", "i-2"]);
        let snap = r.snapshot();
        assert_eq!(
            snap.services["users"].groups,
            BTreeSet::from(["blue".into(), "green".into()])
        );
    }

    #[test]
    fn conflicting_groups_are_reported_and_their_service_frozen() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group("blue", "users", 80, vec![running("i-1", 1)])],
        };
        converge(&fleet, &r);
        fleet
            .groups
            .push(group("green", "users", 9090, vec![running("i-2", 2)]));
        converge(&fleet, &r);
        let snap = r.snapshot();
        assert_eq!(ids(&r, "users"), ["i-1"], "nothing guessed, nothing lost");
        assert_eq!(snap.problems.len(), 2);
        let reason = &snap.problems["green"].reason;
        assert!(
            reason.contains("blue has route /users port 80")
                && reason.contains("green has route /users port 9090"),
            "{reason}"
        );
        // Departures still apply to a frozen service.
        fleet.groups[0].instances.clear();
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), Vec::<String>::new());
        // Agreement unfreezes it.
        fleet.groups[1].settings = Ok(settings(80));
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-2"]);
        assert!(r.snapshot().problems.is_empty());
    }

    #[test]
    fn misconfigured_group_is_reported_while_others_carry_on() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![
                group("users", "users", 80, vec![running("i-1", 1)]),
                group("orders", "orders", 80, vec![running("i-2", 2)]),
            ],
        };
        converge(&fleet, &r);
        fleet.groups[1].settings =
            Err("tag signpost:port=\"abc\": not a port number (1-65535)".into());
        fleet.groups[1].instances.push(running("i-3", 3));
        fleet.groups[0].instances.push(running("i-4", 4));
        converge(&fleet, &r);
        assert_eq!(ids(&r, "users"), ["i-1", "i-4"]);
        assert_eq!(ids(&r, "orders"), ["i-2"], "kept, and nothing new added");
        let p = &r.snapshot().problems["orders"];
        assert_eq!(p.service.as_deref(), Some("orders"));
        assert!(p.reason.contains("signpost:port"));
    }

    #[test]
    fn deleted_group_takes_its_endpoints_and_service_with_it() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group("g", "users", 80, vec![running("i-1", 1)])],
        };
        converge(&fleet, &r);
        fleet.groups.clear();
        converge(&fleet, &r);
        assert!(r.snapshot().services.is_empty());
    }

    #[test]
    fn port_change_re_registers_the_endpoint() {
        let r = Registry::new();
        let mut fleet = Fleet {
            groups: vec![group("g", "users", 80, vec![running("i-1", 1)])],
        };
        converge(&fleet, &r);
        r.apply(
            &[Change::SetState {
                service: "users".into(),
                instance: InstanceId::from("i-1"),
                address: [127, 42, 1, 1].into(),
                port: 80,
                state: EndpointState::Healthy,
            }],
            SystemTime::now(),
        );
        fleet.groups[0].settings = Ok(settings(81));
        converge(&fleet, &r);
        let snap = r.snapshot();
        let e = snap.endpoint("users", &"i-1".into()).unwrap();
        assert_eq!((e.port, e.state), (81, EndpointState::Starting));
    }

    #[tokio::test]
    async fn a_failed_listing_changes_nothing_and_is_reported() {
        let cloud = crate::cloud::FakeAutoScaling::default();
        cloud.set(Ok(Fleet {
            groups: vec![group(
                "g",
                "users",
                80,
                vec![running("i-1", 1), running("i-2", 2)],
            )],
        }));
        let (status, status_rx) = watch::channel(SyncStatus::default());
        let reconciler = Reconciler {
            cloud: Arc::new(cloud),
            registry: Arc::new(Registry::new()),
            status,
            fleet: watch::Sender::new(Arc::default()),
            resync_interval: Duration::from_secs(30),
            trigger: Arc::new(Notify::new()),
            guard: Default::default(),
        };
        reconciler.sync_once().await.unwrap();
        let before = reconciler.registry.snapshot();
        assert_eq!(before.services["users"].endpoints.len(), 2);

        reconciler
            .cloud
            .set(Err("DescribeInstances: Throttling: Rate exceeded".into()));
        assert!(reconciler.sync_once().await.is_err());
        assert_eq!(
            reconciler.registry.snapshot(),
            before,
            "nothing removed, no new revision"
        );
        let s = status_rx.borrow().clone();
        assert!(s.last_error.unwrap().contains("Rate exceeded"));
        assert!(s.failing_since.is_some() && s.last_success.is_some());

        reconciler.cloud.set(Ok(Fleet::default()));
        // Three agreeing listings: the mass-removal guard's default.
        for _ in 0..3 {
            reconciler.sync_once().await.unwrap();
        }
        assert!(
            reconciler.registry.snapshot().services.is_empty(),
            "complete empty listings do remove"
        );
        assert!(status_rx.borrow().failing_since.is_none());
    }

    #[test]
    fn readiness_needs_a_recent_complete_sync() {
        let now = SystemTime::now();
        let resync = Duration::from_secs(30);
        let mut s = SyncStatus::default();
        assert!(s
            .readiness(now, resync)
            .unwrap_err()
            .contains("no complete sync yet"));
        s.last_success = Some(now - Duration::from_secs(60));
        assert!(s.readiness(now, resync).is_ok());
        s.last_error = Some("DescribeAutoScalingGroups: connection refused".into());
        s.failing_since = Some(now - Duration::from_secs(95));
        s.last_success = Some(now - Duration::from_secs(100));
        let err = s.readiness(now, resync).unwrap_err();
        assert!(
            err.contains("100.0s ago (limit 1m 30s)") && err.contains("connection refused"),
            "{err}"
        );
    }
}
