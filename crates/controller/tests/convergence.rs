//! Model-based convergence test: random histories of an Auto Scaling account
//! (scale-outs and scale-ins with and without hooks, instances stopped, tags
//! changed, groups created and deleted), listings at random moments (a
//! resync, an event; an event lost is a listing that does not happen, an
//! event duplicated is two), AWS failures, health verdicts and controller
//! restarts, run through the real listing loop (`Reconciler::sync_once`
//! against the fake fleet), `plan`, the mass-removal guard and the registry.
//!
//! Invariants, checked after every step:
//! - a failed listing changes nothing;
//! - after a successful listing, the registry holds exactly the listing's
//!   candidates (instances serving or held by a launch hook), draining those
//!   of its instances held by a terminate hook that were registered, and
//!   nothing else but removals the guard holds;
//! - nothing is routable unless its instance was a candidate in the last
//!   successful listing (or its removal is held) and its last health verdict
//!   passed; a draining instance is never routable;
//! - once the history ends, listings that agree converge the registry to the
//!   truth exactly.
//!
//! `cargo test` runs 64 histories; `PROPTEST_CASES=10000 cargo test -p
//! signpost-controller --test convergence --release` runs a long one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use signpost_controller::cloud::FakeAutoScaling;
use signpost_controller::guard::{GuardConfig, RemovalGuard};
use signpost_controller::model::{
    Change, Ec2Instance, EndpointState, Fleet, HealthCheck, ObservedGroup, ObservedInstance,
    ServiceSettings, Snapshot,
};
use signpost_controller::reconcile::{Reconciler, SyncStatus};
use signpost_controller::registry::Registry;
use tokio::sync::{watch, Notify};

const GROUPS: u8 = 3;
const SERVICES: u8 = 2;

/// One instance as AWS has it.
#[derive(Clone, Debug)]
struct Instance {
    lifecycle: &'static str,
    ec2: &'static str,
    ip: u8,
}

/// One group as AWS has it; `service: None` is a group without the tag,
/// which the listing (filtered by tag key) does not return.
#[derive(Clone, Debug, Default)]
struct Group {
    service: Option<u8>,
    instances: BTreeMap<u32, Instance>,
}

/// The account: the truth the controller only sees through listings.
#[derive(Clone, Debug, Default)]
struct Truth {
    groups: BTreeMap<u8, Group>,
    next_id: u32,
}

#[derive(Clone, Debug)]
enum Step {
    CreateGroup { group: u8, service: u8 },
    DeleteGroup { group: u8 },
    Retag { group: u8, service: Option<u8> },
    ScaleOut { group: u8, hook: bool },
    LaunchProceeds { group: u8, pick: u8 },
    ScaleIn { group: u8, pick: u8, hook: bool },
    TerminateCompletes { group: u8, pick: u8 },
    Stop { group: u8, pick: u8 },
    Listing { fails: bool },
    Health { pick: u8, passing: bool },
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let g = 0..GROUPS;
    prop_oneof![
        1 => (g.clone(), 0..SERVICES).prop_map(|(group, service)| Step::CreateGroup { group, service }),
        1 => g.clone().prop_map(|group| Step::DeleteGroup { group }),
        1 => (g.clone(), proptest::option::of(0..SERVICES)).prop_map(|(group, service)| Step::Retag { group, service }),
        4 => (g.clone(), any::<bool>()).prop_map(|(group, hook)| Step::ScaleOut { group, hook }),
        2 => (g.clone(), any::<u8>()).prop_map(|(group, pick)| Step::LaunchProceeds { group, pick }),
        3 => (g.clone(), any::<u8>(), any::<bool>()).prop_map(|(group, pick, hook)| Step::ScaleIn { group, pick, hook }),
        2 => (g.clone(), any::<u8>()).prop_map(|(group, pick)| Step::TerminateCompletes { group, pick }),
        1 => (g, any::<u8>()).prop_map(|(group, pick)| Step::Stop { group, pick }),
        5 => proptest::bool::weighted(0.25).prop_map(|fails| Step::Listing { fails }),
        4 => (any::<u8>(), any::<bool>()).prop_map(|(pick, passing)| Step::Health { pick, passing }),
        1 => Just(Step::Restart),
    ]
}

fn pick<T>(items: impl Iterator<Item = T>, n: u8) -> Option<T> {
    let items: Vec<T> = items.collect();
    if items.is_empty() {
        return None;
    }
    let i = n as usize % items.len();
    items.into_iter().nth(i)
}

fn settings(service: u8) -> ServiceSettings {
    ServiceSettings {
        route: format!("/s{service}"),
        port: 8080,
        health: HealthCheck::Tcp,
    }
}

impl Truth {
    fn apply(&mut self, step: &Step) {
        match *step {
            Step::CreateGroup { group, service } => {
                self.groups.entry(group).or_insert_with(|| Group {
                    service: Some(service),
                    ..Group::default()
                });
            }
            Step::DeleteGroup { group } => {
                self.groups.remove(&group);
            }
            Step::Retag { group, service } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.service = service;
                }
            }
            Step::ScaleOut { group, hook } => {
                let id = self.next_id;
                if let Some(g) = self.groups.get_mut(&group) {
                    self.next_id += 1;
                    g.instances.insert(
                        id,
                        Instance {
                            lifecycle: if hook { "Pending:Wait" } else { "InService" },
                            ec2: "running",
                            ip: (id % 250) as u8 + 4,
                        },
                    );
                }
            }
            Step::LaunchProceeds { group, pick: n } => {
                let g = self.groups.get_mut(&group);
                if let Some(i) = g.and_then(|g| {
                    pick(
                        g.instances
                            .values_mut()
                            .filter(|i| i.lifecycle == "Pending:Wait"),
                        n,
                    )
                }) {
                    i.lifecycle = "InService";
                }
            }
            Step::ScaleIn {
                group,
                pick: n,
                hook,
            } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                let serving = g
                    .instances
                    .iter()
                    .filter(|(_, i)| i.lifecycle == "InService")
                    .map(|(id, _)| *id);
                if let Some(id) = pick(serving, n) {
                    if hook {
                        g.instances.get_mut(&id).unwrap().lifecycle = "Terminating:Wait";
                    } else {
                        g.instances.remove(&id);
                    }
                }
            }
            Step::TerminateCompletes { group, pick: n } => {
                let Some(g) = self.groups.get_mut(&group) else {
                    return;
                };
                let waiting = g
                    .instances
                    .iter()
                    .filter(|(_, i)| i.lifecycle == "Terminating:Wait")
                    .map(|(id, _)| *id);
                if let Some(id) = pick(waiting, n) {
                    g.instances.remove(&id);
                }
            }
            Step::Stop { group, pick: n } => {
                let g = self.groups.get_mut(&group);
                if let Some(i) = g.and_then(|g| pick(g.instances.values_mut(), n)) {
                    i.ec2 = "stopped";
                }
            }
            Step::Listing { .. } | Step::Health { .. } | Step::Restart => {}
        }
    }

    /// What a complete listing returns.
    fn listing(&self) -> Fleet {
        Fleet {
            groups: self
                .groups
                .iter()
                .filter_map(|(n, g)| {
                    let service = g.service?;
                    Some(ObservedGroup {
                        name: format!("g{n}"),
                        service: Some(format!("s{service}")),
                        settings: Ok(settings(service)),
                        instances: g
                            .instances
                            .iter()
                            .map(|(id, i)| ObservedInstance {
                                id: format!("i-{id}").as_str().into(),
                                lifecycle_state: i.lifecycle.into(),
                                zone: "a".into(),
                                ec2: Some(Ec2Instance {
                                    state: i.ec2.into(),
                                    private_ip: Some(IpAddr::from([127, 42, 1, i.ip])),
                                    launch_time: None,
                                }),
                            })
                            .collect(),
                        hooks: vec![],
                    })
                })
                .collect(),
        }
    }

    /// Whether a health probe of this instance would pass: it exists and runs.
    fn reachable(&self, instance: &str) -> bool {
        self.groups.values().any(|g| {
            g.instances
                .iter()
                .any(|(id, i)| format!("i-{id}") == instance && i.ec2 == "running")
        })
    }
}

/// (service, instance) → whether it should be draining, for every instance
/// a listing says should be registered.
fn expected(fleet: &Fleet) -> BTreeMap<(String, String), bool> {
    fleet
        .groups
        .iter()
        .flat_map(|g| {
            let service = g.service.clone().unwrap();
            g.instances.iter().filter_map(move |i| {
                let draining = i.is_draining() && !i.is_leaving();
                (i.is_candidate() || draining)
                    .then(|| ((service.clone(), i.id.to_string()), i.is_draining()))
            })
        })
        .collect()
}

fn registered(snap: &Snapshot) -> BTreeMap<(String, String), EndpointState> {
    snap.services
        .iter()
        .flat_map(|(name, s)| {
            s.endpoints
                .iter()
                .map(move |(id, e)| ((name.clone(), id.to_string()), e.state))
        })
        .collect()
}

struct Controller {
    reconciler: Reconciler<FakeAutoScaling>,
}

fn controller() -> Controller {
    Controller {
        reconciler: Reconciler {
            cloud: Arc::new(FakeAutoScaling::default()),
            registry: Arc::new(Registry::new()),
            status: watch::Sender::new(SyncStatus::default()),
            fleet: watch::Sender::new(Arc::default()),
            resync_interval: Duration::from_secs(30),
            trigger: Arc::new(Notify::new()),
            guard: std::sync::Mutex::new(RemovalGuard::new(GuardConfig::default())),
        },
    }
}

impl Controller {
    fn held(&self) -> BTreeSet<(String, String)> {
        self.reconciler
            .guard
            .lock()
            .unwrap()
            .held()
            .into_iter()
            .flat_map(|h| {
                let service = h.service;
                h.instances.into_iter().map(move |i| (service.clone(), i))
            })
            .collect()
    }
}

/// Runs one history; returns a description of the first broken invariant.
fn run(history: &[Step]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut truth = Truth::default();
        let mut c = controller();
        // The listing the registry was last built from.
        let mut listed: Option<Fleet> = None;
        for (n, step) in history.iter().enumerate() {
            truth.apply(step);
            let registry = &c.reconciler.registry;
            let before = registry.snapshot();
            match step {
                Step::Restart => {
                    c = controller();
                    listed = None;
                    continue;
                }
                Step::Listing { fails: true } => {
                    c.reconciler
                        .cloud
                        .set(Err("Throttling: Rate exceeded".into()));
                    if c.reconciler.sync_once().await.is_ok() {
                        return Err(format!("step {n}: a failed listing succeeded"));
                    }
                    if registry.snapshot() != before {
                        return Err(format!("step {n}: a failed listing changed the registry"));
                    }
                }
                Step::Listing { fails: false } => {
                    let fleet = truth.listing();
                    c.reconciler.cloud.set(Ok(fleet.clone()));
                    c.reconciler
                        .sync_once()
                        .await
                        .map_err(|()| format!("step {n}: listing failed"))?;
                    let want = expected(&fleet);
                    let held = c.held();
                    let have = registered(&registry.snapshot());
                    for (key, draining) in &want {
                        match have.get(key) {
                            // Never registered before a terminate hook held
                            // it: not added, as it is going away.
                            None if *draining => {}
                            None => {
                                return Err(format!("step {n}: {key:?} listed but not registered"))
                            }
                            Some(EndpointState::Draining) if !draining => {
                                return Err(format!("step {n}: {key:?} draining but serving"))
                            }
                            Some(s) if *draining && *s != EndpointState::Draining => {
                                return Err(format!(
                                    "step {n}: {key:?} should be draining, is {s:?}"
                                ))
                            }
                            _ => {}
                        }
                    }
                    for key in have.keys() {
                        if !want.contains_key(key) && !held.contains(key) {
                            return Err(format!(
                                "step {n}: {key:?} registered but not listed nor held"
                            ));
                        }
                    }
                    listed = Some(fleet);
                }
                Step::Health { pick: p, passing } => {
                    let snap = registry.snapshot();
                    let endpoints = snap.services.iter().flat_map(|(s, svc)| {
                        svc.endpoints.values().map(move |e| (s.clone(), e.clone()))
                    });
                    if let Some((service, e)) = pick(endpoints, *p) {
                        // A probe passes only if the instance is there to answer.
                        let passing = *passing && truth.reachable(&e.instance_id.to_string());
                        let state = if passing {
                            EndpointState::Healthy
                        } else {
                            EndpointState::Unhealthy
                        };
                        registry.apply(
                            &[Change::SetState {
                                service,
                                instance: e.instance_id.clone(),
                                address: e.address,
                                port: e.port,
                                state,
                            }],
                            SystemTime::now(),
                        );
                    }
                }
                _ => {}
            }
            // Routable only if listed as a candidate (or held), never draining.
            let candidates: BTreeSet<(String, String)> = listed
                .as_ref()
                .map(|f| {
                    expected(f)
                        .into_iter()
                        .filter(|(_, d)| !d)
                        .map(|(k, _)| k)
                        .collect()
                })
                .unwrap_or_default();
            let held = c.held();
            for (key, state) in registered(&c.reconciler.registry.snapshot()) {
                if state.is_routable() && !candidates.contains(&key) && !held.contains(&key) {
                    return Err(format!(
                        "step {n}: {key:?} routable but not a listed candidate"
                    ));
                }
            }
        }
        // The history is over: listings that agree converge to the truth.
        let fleet = truth.listing();
        c.reconciler.cloud.set(Ok(fleet.clone()));
        for _ in 0..GuardConfig::default().listings {
            c.reconciler
                .sync_once()
                .await
                .map_err(|()| "final listing failed".to_string())?;
        }
        let want = expected(&fleet);
        let have: BTreeSet<_> = registered(&c.reconciler.registry.snapshot())
            .into_keys()
            .collect();
        let candidates: BTreeSet<_> = want
            .iter()
            .filter(|(_, d)| !**d)
            .map(|(k, _)| k.clone())
            .collect();
        let draining: BTreeSet<_> = want
            .iter()
            .filter(|(_, d)| **d)
            .map(|(k, _)| k.clone())
            .collect();
        if !candidates.is_subset(&have)
            || !have.difference(&candidates).all(|k| draining.contains(k))
        {
            return Err(format!("did not converge: want {want:?}, have {have:?}"));
        }
        if !c.held().is_empty() {
            return Err("removals still held after agreeing listings".into());
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_history_keeps_the_invariants_and_converges(history in proptest::collection::vec(step(), 1..80)) {
        if let Err(broken) = run(&history) {
            prop_assert!(false, "{broken}\nhistory: {history:#?}");
        }
    }
}
