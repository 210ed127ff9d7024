//! The mass-removal guard: a complete listing can still be wrong (a tag
//! removed by mistake, an API answering an empty group), and one such
//! answer would empty a service. So when a listing would remove more than a
//! share of a service's endpoints, and AWS has not itself said that those
//! instances are leaving, the removal is held until enough consecutive
//! listings agree on it, or until AWS confirms.
//!
//! A removal is *confirmed* when the listing still shows the instance and
//! says it is going away (lifecycle past its hooks, or EC2 not `running`),
//! or when a terminate hook held it (its endpoint is draining): an ordinary
//! scale-in. It is *unconfirmed* when the instance, or its whole group, or
//! the group's tag, is simply no longer there.
//!
//! The guard is a filter on `plan`'s output with a little memory (what it
//! held at the last listing), so `plan` stays pure and the guard is tested
//! on its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::model::{Change, EndpointState, Fleet, GroupProblem, InstanceId, Snapshot};

/// `[removal_guard]` in the config.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Off: every removal a complete listing asks for is applied at once.
    pub enabled: bool,
    /// A removal of more than this share of a service's endpoints is
    /// suspicious (0.5: more than half).
    pub max_share: f64,
    /// ... and of at least this many endpoints.
    pub min_endpoints: usize,
    /// Consecutive listings that must agree before a held removal is applied.
    pub listings: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            max_share: 0.5,
            min_endpoints: 2,
            listings: 3,
        }
    }
}

/// A removal being held, for the API, `/readyz` and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeldRemoval {
    pub service: String,
    /// The endpoints the listings would remove.
    pub instances: Vec<String>,
    /// The service's endpoints when the removal was first asked for.
    pub endpoints: usize,
    /// Consecutive listings that asked for exactly this removal so far.
    pub listings: u32,
}

/// The guard's memory: per service, the removal held at the last listing.
#[derive(Debug, Default)]
pub struct RemovalGuard {
    config: GuardConfig,
    held: BTreeMap<String, HeldRemoval>,
}

/// The guard's entries in the registry's problems have keys of their own,
/// apart from group names.
const PROBLEM_PREFIX: &str = "removal held: ";

fn problem_key(service: &str) -> String {
    format!("{PROBLEM_PREFIX}{service}")
}

/// Whether a key of the registry's problems is the guard's.
pub fn is_guard_problem(key: &str) -> bool {
    key.starts_with(PROBLEM_PREFIX)
}

impl RemovalGuard {
    pub fn new(config: GuardConfig) -> RemovalGuard {
        RemovalGuard {
            config,
            held: BTreeMap::new(),
        }
    }

    /// What is held now.
    pub fn held(&self) -> Vec<HeldRemoval> {
        self.held.values().cloned().collect()
    }

    /// Takes the changes `plan` made of a complete listing and returns those
    /// to apply: suspicious unconfirmed removals (and the removal of their
    /// service) are left out while held, and the registry's problems say so.
    pub fn filter(
        &mut self,
        fleet: &Fleet,
        current: &Snapshot,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let leaving: HashMap<(&str, &InstanceId), bool> = fleet
            .groups
            .iter()
            .flat_map(|g| {
                g.instances
                    .iter()
                    .map(move |i| ((g.name.as_str(), &i.id), i.is_leaving()))
            })
            .collect();
        // Per service, the removals AWS has not confirmed.
        let mut unconfirmed: BTreeMap<String, BTreeSet<InstanceId>> = BTreeMap::new();
        for change in &changes {
            let Change::RemoveEndpoint {
                service, instance, ..
            } = change
            else {
                continue;
            };
            let Some(endpoint) = current.endpoint(service, instance) else {
                continue;
            };
            // Draining: a terminate hook held the instance, so AWS did say
            // it was leaving; it may since have gone from the group.
            let confirmed = endpoint.state == EndpointState::Draining
                || leaving
                    .get(&(endpoint.group.as_str(), instance))
                    .copied()
                    .unwrap_or(false);
            if !confirmed {
                unconfirmed
                    .entry(service.clone())
                    .or_default()
                    .insert(instance.clone());
            }
        }

        let mut hold: BTreeMap<String, BTreeSet<InstanceId>> = BTreeMap::new();
        let mut still_held = BTreeMap::new();
        for (service, instances) in unconfirmed {
            let total = current
                .services
                .get(&service)
                .map_or(0, |s| s.endpoints.len());
            let suspicious = self.config.enabled
                && instances.len() >= self.config.min_endpoints
                && instances.len() as f64 > self.config.max_share * total as f64;
            if !suspicious {
                continue;
            }
            let names: Vec<String> = instances.iter().map(|i| i.to_string()).collect();
            let listings = match self.held.get(&service) {
                Some(h) if h.instances == names => h.listings + 1,
                _ => 1,
            };
            if listings >= self.config.listings {
                info!(%service, endpoints = names.len(), listings, "held removal applied: consecutive listings agree");
                continue;
            }
            if listings == 1 {
                warn!(%service, endpoints = names.len(), of = total, needed = self.config.listings, "removal of most of a service held: AWS has not said these instances are leaving; waiting for agreeing listings");
            }
            still_held.insert(
                service.clone(),
                HeldRemoval {
                    service: service.clone(),
                    instances: names,
                    endpoints: total,
                    listings,
                },
            );
            hold.insert(service, instances);
        }
        for service in self.held.keys() {
            if !still_held.contains_key(service) && !hold.contains_key(service) {
                info!(%service, "removal no longer held");
            }
        }
        self.held = still_held;

        let mut kept: Vec<Change> = changes
            .into_iter()
            .filter(|c| match c {
                Change::RemoveEndpoint {
                    service, instance, ..
                } => !hold.get(service).is_some_and(|h| h.contains(instance)),
                Change::RemoveService { name } => !hold.contains_key(name),
                _ => true,
            })
            .collect();
        self.set_problems(current, &mut kept);
        kept
    }

    /// Puts the held removals among the registry's problems, beside the
    /// group problems `plan` computed (which never carry the guard's keys).
    fn set_problems(&self, current: &Snapshot, changes: &mut Vec<Change>) {
        let from_plan = changes
            .iter()
            .position(|c| matches!(c, Change::SetProblems(_)));
        let mut problems = match from_plan {
            Some(i) => match changes.remove(i) {
                Change::SetProblems(p) => p,
                _ => unreachable!("matched SetProblems"),
            },
            // plan found the problems unchanged: the current ones, less
            // what the guard put there.
            None => current
                .problems
                .iter()
                .filter(|(k, _)| !is_guard_problem(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        for held in self.held.values() {
            let groups: BTreeSet<&str> = held
                .instances
                .iter()
                .filter_map(|i| current.endpoint(&held.service, &InstanceId::from(i.as_str())))
                .map(|e| e.group.as_str())
                .collect();
            problems.insert(
                problem_key(&held.service),
                GroupProblem {
                    group: groups.into_iter().collect::<Vec<_>>().join(","),
                    service: Some(held.service.clone()),
                    reason: format!(
                        "removal of {} of {} endpoints held ({} of {} agreeing listings): AWS has not said these instances are leaving; the group's tags or the listing may be wrong (removal_guard)",
                        held.instances.len(),
                        held.endpoints,
                        held.listings,
                        self.config.listings
                    ),
                },
            );
        }
        if problems != current.problems {
            changes.push(Change::SetProblems(problems));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        Ec2Instance, HealthCheck, ObservedGroup, ObservedInstance, ServiceSettings,
    };
    use crate::reconcile::plan;
    use crate::registry::Registry;
    use std::time::SystemTime;

    fn settings() -> ServiceSettings {
        ServiceSettings {
            route: "/users".into(),
            port: 80,
            health: HealthCheck::Tcp,
        }
    }

    fn instance(n: u8, lifecycle: &str) -> ObservedInstance {
        ObservedInstance {
            id: format!("i-{n}").as_str().into(),
            lifecycle_state: lifecycle.into(),
            zone: "a".into(),
            ec2: Some(Ec2Instance {
                state: "running".into(),
                private_ip: Some([127, 42, 1, n].into()),
                launch_time: None,
            }),
        }
    }

    fn group(service: Option<&str>, instances: Vec<ObservedInstance>) -> Fleet {
        // `service: None` is a group whose tags are unusable: plan freezes it.
        Fleet {
            groups: vec![ObservedGroup {
                name: "users-a".into(),
                service: service.map(str::to_owned),
                settings: Ok(settings()),
                instances,
                hooks: vec![],
            }],
        }
    }

    fn in_service(n: u8) -> Vec<ObservedInstance> {
        (1..=n).map(|i| instance(i, "InService")).collect()
    }

    /// A registry with four endpoints of `users`, and a guard.
    fn four() -> (Registry, RemovalGuard) {
        let registry = Registry::new();
        let fleet = group(Some("users"), in_service(4));
        registry.apply(&plan(&fleet, &registry.snapshot()), SystemTime::now());
        (registry, RemovalGuard::new(GuardConfig::default()))
    }

    /// One listing through plan and the guard.
    fn list(registry: &Registry, guard: &mut RemovalGuard, fleet: &Fleet) -> usize {
        let current = registry.snapshot();
        let changes = guard.filter(fleet, &current, plan(fleet, &current));
        registry.apply(&changes, SystemTime::now());
        registry
            .snapshot()
            .services
            .get("users")
            .map_or(0, |s| s.endpoints.len())
    }

    #[test]
    fn a_tag_removed_by_mistake_is_held_until_three_listings_agree() {
        let (registry, mut guard) = four();
        // The listing asks AWS for groups with a `signpost:service` tag: a
        // group whose tag was removed is simply not in it.
        let untagged = Fleet { groups: vec![] };
        assert_eq!(
            list(&registry, &mut guard, &untagged),
            4,
            "first listing: held"
        );
        let problem = &registry.snapshot().problems["removal held: users"];
        assert!(
            problem.reason.contains("4 of 4 endpoints held (1 of 3"),
            "{problem:?}"
        );
        assert_eq!(guard.held()[0].listings, 1);
        assert_eq!(list(&registry, &mut guard, &untagged), 4, "second: held");
        assert_eq!(
            list(&registry, &mut guard, &untagged),
            0,
            "third agrees: applied"
        );
        assert!(guard.held().is_empty());
        assert!(!registry
            .snapshot()
            .problems
            .keys()
            .any(|k| k.starts_with("removal held")));
    }

    #[test]
    fn a_tag_put_back_before_the_listings_agree_loses_nothing() {
        let (registry, mut guard) = four();
        let before = registry.snapshot();
        list(&registry, &mut guard, &Fleet { groups: vec![] });
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), in_service(4))),
            4
        );
        assert!(guard.held().is_empty());
        let after = registry.snapshot();
        assert_eq!(
            after.services["users"].endpoints,
            before.services["users"].endpoints
        );
        assert!(after.problems.is_empty(), "{:?}", after.problems);
    }

    #[test]
    fn an_ordinary_scale_in_to_half_is_applied_at_once() {
        let (registry, mut guard) = four();
        // AWS says two are leaving: confirmed, whatever the share.
        let mut instances = in_service(2);
        instances.push(instance(3, "Terminating:Proceed"));
        instances.push(instance(4, "Terminated"));
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), instances)),
            2
        );
        // And three of four leaving the group without a word: held.
        let (registry, mut guard) = four();
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), in_service(1))),
            4
        );
    }

    #[test]
    fn a_group_deleted_is_held_then_applied_with_its_service() {
        let (registry, mut guard) = four();
        let deleted = Fleet { groups: vec![] };
        assert_eq!(list(&registry, &mut guard, &deleted), 4);
        assert_eq!(list(&registry, &mut guard, &deleted), 4);
        assert!(registry.snapshot().services.contains_key("users"));
        assert_eq!(list(&registry, &mut guard, &deleted), 0);
        assert!(
            !registry.snapshot().services.contains_key("users"),
            "the service goes with its last group"
        );
    }

    #[test]
    fn an_empty_answer_for_a_group_is_held_then_applied() {
        let (registry, mut guard) = four();
        let empty = group(Some("users"), vec![]);
        assert_eq!(list(&registry, &mut guard, &empty), 4);
        assert_eq!(list(&registry, &mut guard, &empty), 4);
        assert_eq!(list(&registry, &mut guard, &empty), 0);
        assert!(registry.snapshot().services.contains_key("users"));
    }

    #[test]
    fn half_or_fewer_and_single_removals_are_not_suspicious() {
        let (registry, mut guard) = four();
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), in_service(2))),
            2,
            "half"
        );
        let registry = Registry::new();
        let two = group(Some("users"), in_service(2));
        registry.apply(&plan(&two, &registry.snapshot()), SystemTime::now());
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), in_service(1))),
            1,
            "one of two"
        );
    }

    #[test]
    fn draining_endpoints_leaving_the_group_are_confirmed() {
        let (registry, mut guard) = four();
        let mut instances = in_service(1);
        instances.extend((2..=4).map(|n| instance(n, "Terminating:Wait")));
        list(&registry, &mut guard, &group(Some("users"), instances));
        // The hooks completed; the instances are gone from the group.
        assert_eq!(
            list(&registry, &mut guard, &group(Some("users"), in_service(1))),
            1
        );
    }

    #[test]
    fn a_different_removal_starts_the_count_again() {
        let (registry, mut guard) = four();
        list(&registry, &mut guard, &group(Some("users"), in_service(1)));
        list(&registry, &mut guard, &group(Some("users"), in_service(1)));
        // Now four go: not the removal the last two listings agreed on.
        assert_eq!(list(&registry, &mut guard, &Fleet { groups: vec![] }), 4);
        assert_eq!(guard.held()[0].listings, 1);
    }

    #[test]
    fn disabled_it_applies_every_removal_at_once() {
        let (registry, _) = four();
        let mut guard = RemovalGuard::new(GuardConfig {
            enabled: false,
            ..GuardConfig::default()
        });
        assert_eq!(list(&registry, &mut guard, &Fleet { groups: vec![] }), 0);
    }
}
