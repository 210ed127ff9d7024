//! The simulated account behind the `AutoScaling` trait: the call pattern
//! of the real listing (`cloud::AwsFleet::describe_fleet`), each call paid
//! through `Calls`, answered from a `SimFleet`.
//!
//! The pattern, as the real listing makes it (no events here, so no hints):
//! - round one, at the same time: DescribeAutoScalingGroups pages of 100
//!   groups, one after the other; DescribeInstances of the ids the last
//!   listing saw, 100 ids a call, `INSTANCE_LANES` calls at a time;
//! - round two, at the same time: DescribeInstances of the ids round one
//!   did not foresee (100 a call, in lanes likewise); DescribeLifecycleHooks for each group
//!   with an instance a hook holds and no fresh hooks in the cache
//!   (`cloud::HookCache`, on simulated time), one after the other.
//!
//! Calls are counted in the returned `CallCount` exactly where the real
//! listing counts them (once per call, retries inside it not counted).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::cloud::{
    ActionCall, AutoScaling, CallCount, CloudError, HookCache, INSTANCE_BATCH, INSTANCE_LANES,
};
use crate::model::{
    Ec2Instance, Fleet, HookResult, LifecycleAction, LifecycleHook, LifecycleState, ObservedGroup,
    ObservedInstance, Transition,
};
use crate::sim::calls::{Api, Calls};
use crate::sim::fleet::SimFleet;
use crate::tags;

/// Groups per DescribeAutoScalingGroups page (`MaxRecords = 100`).
const GROUP_PAGE: usize = 100;

pub struct SimAutoScaling {
    /// A std mutex, never held across an await: each listing reads the
    /// account once, as one moment of it.
    fleet: Mutex<SimFleet>,
    calls: Calls,
    /// `default_port` from the config, for the tags.
    default_port: Option<u16>,
    /// The instance ids of the last listing (as `AwsFleet` keeps them).
    last_ids: Mutex<BTreeSet<String>>,
    /// The hooks of groups as last read (the real `HookCache`).
    hook_cache: Mutex<HookCache>,
    /// The simulated clock's start, as the cache's `Instant`.
    origin: tokio::time::Instant,
    /// Nanoseconds spent reading the account for answers: AWS's side of
    /// the work, which a benchmark subtracts from the controller's.
    answering: AtomicU64,
}

/// One group as a DescribeAutoScalingGroups page holds it.
struct Listed {
    name: String,
    tags: Vec<(String, String)>,
    instances: Vec<(String, LifecycleState, &'static str)>,
    hooks: Vec<LifecycleHook>,
}

impl SimAutoScaling {
    pub fn new(fleet: SimFleet, calls: Calls) -> SimAutoScaling {
        SimAutoScaling {
            fleet: Mutex::new(fleet),
            calls,
            default_port: None,
            last_ids: Mutex::default(),
            hook_cache: Mutex::default(),
            origin: tokio::time::Instant::now(),
            answering: AtomicU64::new(0),
        }
    }

    /// The account, to move it on (`SimFleet::advance`) or look at it.
    pub fn fleet(&self) -> MutexGuard<'_, SimFleet> {
        self.fleet.lock().expect("fleet lock")
    }

    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// Time spent reading the account for answers since the start.
    pub fn answering(&self) -> Duration {
        Duration::from_nanos(self.answering.load(Ordering::Relaxed))
    }

    fn answered(&self, since: std::time::Instant) {
        let spent = since.elapsed().as_nanos() as u64;
        self.answering.fetch_add(spent, Ordering::Relaxed);
    }

    /// `n` calls to `api`, one after the other.
    async fn sequential(&self, api: Api, n: usize) -> Result<(), CloudError> {
        for _ in 0..n {
            self.calls.call(api).await?;
        }
        Ok(())
    }

    /// `n` DescribeInstances calls, `INSTANCE_LANES` at a time.
    async fn in_lanes(&self, n: usize) -> Result<(), CloudError> {
        let lane = |k: usize| {
            let calls = n / INSTANCE_LANES + usize::from(k < n % INSTANCE_LANES);
            self.sequential(Api::DescribeInstances, calls)
        };
        tokio::try_join!(lane(0), lane(1), lane(2), lane(3))?;
        Ok(())
    }

    /// The account as AWS would answer it now: the groups and their
    /// instances, and what EC2 says of each instance.
    fn read(&self) -> (Vec<Listed>, HashMap<String, Ec2Instance>, Duration) {
        let fleet = self.fleet();
        let mut ec2 = HashMap::new();
        let listed = fleet
            .groups()
            .iter()
            .map(|g| Listed {
                name: g.name.clone(),
                tags: g.tags.clone(),
                instances: g
                    .instances
                    .iter()
                    .map(|i| {
                        ec2.insert(
                            i.id.clone(),
                            Ec2Instance {
                                state: i.ec2.clone(),
                                private_ip: Some(i.address),
                                launch_time: Some(i.launched),
                            },
                        );
                        (i.id.clone(), i.lifecycle.clone(), i.zone)
                    })
                    .collect(),
                hooks: g.hooks.clone(),
            })
            .collect();
        (listed, ec2, fleet.clock())
    }
}

impl AutoScaling for SimAutoScaling {
    async fn describe_fleet(&self) -> Result<(Fleet, CallCount), CloudError> {
        let reading = std::time::Instant::now();
        let (listed, mut ec2, clock) = self.read();
        // The cache's clock is the account's: simulated time.
        let now = self.origin + clock;
        self.answered(reading);
        let expected: Vec<String> = self
            .last_ids
            .lock()
            .expect("ids lock")
            .iter()
            .cloned()
            .collect();

        // Round one.
        let mut calls = CallCount {
            // The real loop asks for a first page even when there is none.
            describe_auto_scaling_groups: listed.len().div_ceil(GROUP_PAGE).max(1) as u32,
            describe_instances: expected.len().div_ceil(INSTANCE_BATCH) as u32,
            describe_lifecycle_hooks: 0,
        };
        tokio::try_join!(
            self.sequential(
                Api::DescribeAutoScalingGroups,
                calls.describe_auto_scaling_groups as usize
            ),
            self.in_lanes(calls.describe_instances as usize),
        )?;

        // Round two.
        let ids: BTreeSet<String> = listed
            .iter()
            .flat_map(|g| g.instances.iter().map(|(id, _, _)| id.clone()))
            .collect();
        let unforeseen = ids
            .iter()
            .filter(|id| expected.binary_search(id).is_err())
            .count();
        let waiting = listed.iter().filter_map(|g| {
            let held: BTreeSet<Transition> = g
                .instances
                .iter()
                .filter_map(|(_, s, _)| s.held_for())
                .collect();
            Some((g.name.as_str(), held)).filter(|(_, held)| !held.is_empty())
        });
        let mut hooks = HashMap::new();
        let to_read = self
            .hook_cache
            .lock()
            .expect("hooks lock")
            .answer(waiting, &mut hooks, now);
        let late = unforeseen.div_ceil(INSTANCE_BATCH);
        tokio::try_join!(
            self.in_lanes(late),
            self.sequential(Api::DescribeLifecycleHooks, to_read.len()),
        )?;
        calls.describe_instances += late as u32;
        calls.describe_lifecycle_hooks = to_read.len() as u32;
        {
            let mut cache = self.hook_cache.lock().expect("hooks lock");
            for g in listed.iter().filter(|g| to_read.contains(&g.name)) {
                cache.store(&g.name, &g.hooks, now);
                hooks.insert(g.name.clone(), g.hooks.clone());
            }
            cache.keep_only(&listed.iter().map(|g| g.name.as_str()).collect());
        }

        // The answers, made into the model as the real listing makes them.
        let groups = listed
            .iter()
            .map(|g| {
                let tag_pairs = g.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                let (service, settings) = match tags::parse(tag_pairs.clone(), self.default_port) {
                    Ok((name, settings)) => (Some(name), Ok(settings)),
                    Err(e) => (
                        tags::service_name(tag_pairs).and_then(Result::ok),
                        Err(e.to_string()),
                    ),
                };
                ObservedGroup {
                    name: g.name.clone(),
                    service,
                    settings,
                    instances: g
                        .instances
                        .iter()
                        .map(|(id, state, zone)| ObservedInstance {
                            id: id.as_str().into(),
                            lifecycle_state: state.clone(),
                            zone: (*zone).to_owned(),
                            ec2: ec2.remove(id),
                        })
                        .collect(),
                    hooks: hooks.remove(&g.name).unwrap_or_default(),
                }
            })
            .collect();
        *self.last_ids.lock().expect("ids lock") = ids;
        Ok((Fleet { groups }, calls))
    }

    async fn complete_action(
        &self,
        action: &LifecycleAction,
        result: HookResult,
    ) -> Result<ActionCall, CloudError> {
        self.calls.call(Api::LifecycleAction).await?;
        let done = self.fleet().complete(
            &action.group,
            action.instance.as_str(),
            action.transition,
            result,
        );
        Ok(if done {
            ActionCall::Done
        } else {
            ActionCall::NotWaiting
        })
    }

    async fn heartbeat(&self, action: &LifecycleAction) -> Result<ActionCall, CloudError> {
        self.calls.call(Api::LifecycleAction).await?;
        let fleet = self.fleet();
        let waiting = fleet
            .groups()
            .iter()
            .filter(|g| g.name == action.group)
            .flat_map(|g| &g.instances)
            .any(|i| i.id == action.instance.as_str() && i.lifecycle.is_held_by_hook());
        Ok(if waiting {
            ActionCall::Done
        } else {
            ActionCall::NotWaiting
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AwsConfig;
    use crate::sim::{FleetSpec, Latency};

    fn sim(instances: usize, groups: usize) -> SimAutoScaling {
        let aws = AwsConfig {
            calls_per_second: 1e6,
            ..AwsConfig::default()
        };
        SimAutoScaling::new(
            SimFleet::new(FleetSpec::new(instances, groups)),
            Calls::new(Latency::zero(), &aws, None),
        )
    }

    #[tokio::test]
    async fn calls_grow_with_n_over_100_as_in_the_real_listing() {
        let cloud = sim(10_000, 500);
        let (fleet, first) = cloud.describe_fleet().await.unwrap();
        assert_eq!(fleet.groups.len(), 500);
        assert!(fleet.groups.iter().all(|g| g.settings.is_ok()));
        // Nothing foreseen yet: every id is described in round two.
        assert_eq!(
            (first.describe_auto_scaling_groups, first.describe_instances),
            (5, 100)
        );
        let (_, steady) = cloud.describe_fleet().await.unwrap();
        assert_eq!(steady.total(), 105, "{steady:?}");

        // A minute of churn: new instances are unforeseen (one more call),
        // and each group with an instance held by a hook costs a
        // DescribeLifecycleHooks.
        cloud.fleet().advance(Duration::from_secs(60));
        let (fleet, churned) = cloud.describe_fleet().await.unwrap();
        let waiting = fleet
            .groups
            .iter()
            .filter(|g| g.instances.iter().any(|i| i.waiting_on().is_some()))
            .count() as u32;
        assert!(waiting > 0);
        assert_eq!(churned.describe_instances, 101);
        assert_eq!(churned.describe_lifecycle_hooks, waiting);
        assert!(fleet
            .groups
            .iter()
            .filter(|g| !g.hooks.is_empty())
            .all(|g| g.instances.iter().any(|i| i.waiting_on().is_some())));

        // Hooks read are cached: half a minute on, only the groups that had
        // no instance held before are read, and every group with one held
        // still has its hooks.
        let before: BTreeSet<String> = fleet
            .groups
            .iter()
            .filter(|g| !g.hooks.is_empty())
            .map(|g| g.name.clone())
            .collect();
        cloud.fleet().advance(Duration::from_secs(30));
        let (fleet, cached) = cloud.describe_fleet().await.unwrap();
        let holding: Vec<&ObservedGroup> = fleet
            .groups
            .iter()
            .filter(|g| g.instances.iter().any(|i| i.waiting_on().is_some()))
            .collect();
        let new = holding.iter().filter(|g| !before.contains(&g.name)).count();
        assert_eq!(cached.describe_lifecycle_hooks as usize, new);
        assert!(new < holding.len(), "some were cached");
        assert!(holding.iter().all(|g| g.hooks.len() == 2));
    }
}
