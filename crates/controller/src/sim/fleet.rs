//! The simulated account: Auto Scaling groups and their instances as AWS
//! would list them, and churn. Pure and synchronous: time moves only in
//! `advance`, by whatever step the caller chooses.
//!
//! An instance's life, with hooks (every group has a launch and a
//! terminate hook named `signpost-…` when `FleetSpec::hooks` is set):
//!
//! ```text
//!  Pending (EC2 pending) ─boot─► Pending:Wait ─launch_wait or completed─► InService
//!  InService ─replaced─► Terminating:Wait ─terminate_wait or completed─►
//!     Terminating:Proceed (EC2 shutting-down) ─shutdown─► gone from the group
//! ```
//!
//! Without hooks the waits are skipped (`Pending` → `InService`,
//! `InService` → `Terminating`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use crate::model::{Ec2State, HookResult, LifecycleHook, LifecycleState, Transition};
use crate::sim::Rng;
use crate::tags;

/// From `Pending` until EC2 runs the instance.
const BOOT: Duration = Duration::from_secs(10);
/// From leaving service until the instance is gone from its group.
const SHUTDOWN: Duration = Duration::from_secs(10);
/// Zones the instances of a group are spread over.
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

/// The shape of the account.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    pub instances: usize,
    pub groups: usize,
    /// Groups are spread round-robin over this many services (the groups of
    /// one service carry the same tags, as they must).
    pub services: usize,
    pub port: u16,
    /// Share of the fleet replaced per minute of `advance` (0.01: 1 %).
    pub churn_per_minute: f64,
    /// Every group has a launch and a terminate hook.
    pub hooks: bool,
    /// How long a launch hook holds an instance unless it is completed.
    pub launch_wait: Duration,
    /// How long a terminate hook holds an instance (the drain) unless it is
    /// completed.
    pub terminate_wait: Duration,
    /// Instance addresses are allocated upwards from here, one per instance
    /// ever launched (a loopback range, so that a benchmark can listen on
    /// them).
    pub first_address: Ipv4Addr,
    pub seed: u64,
}

impl FleetSpec {
    /// `instances` in `groups`, 10 groups per service, 1 % churn a minute,
    /// hooks on every group (launches held 10 s, drains 30 s).
    pub fn new(instances: usize, groups: usize) -> FleetSpec {
        FleetSpec {
            instances,
            groups,
            services: groups.div_ceil(10).max(1),
            port: 8080,
            churn_per_minute: 0.01,
            hooks: true,
            launch_wait: Duration::from_secs(10),
            terminate_wait: Duration::from_secs(30),
            first_address: Ipv4Addr::new(127, 100, 0, 1),
            seed: 17,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimInstance {
    pub id: String,
    pub address: IpAddr,
    pub zone: &'static str,
    pub lifecycle: LifecycleState,
    pub ec2: Ec2State,
    pub launched: SystemTime,
    /// Simulated time at which it entered `lifecycle`.
    entered: Duration,
}

#[derive(Clone, Debug)]
pub struct SimGroup {
    pub name: String,
    /// The group's tags as AWS lists them.
    pub tags: Vec<(String, String)>,
    pub hooks: Vec<LifecycleHook>,
    pub instances: Vec<SimInstance>,
}

/// The account. One value; the `AutoScaling` side holds it behind a lock.
#[derive(Debug)]
pub struct SimFleet {
    spec: FleetSpec,
    groups: Vec<SimGroup>,
    /// Simulated time since the start.
    clock: Duration,
    next_address: u32,
    next_id: u64,
    rng: Rng,
    /// Replacements made or skipped so far: churn is owed on the whole
    /// simulated time, so that steps of any size add up to the same count.
    churned: u64,
    /// Instances replaced since the start.
    pub replaced: u64,
}

impl SimFleet {
    /// The account at rest: every instance `InService` and running.
    pub fn new(spec: FleetSpec) -> SimFleet {
        let mut fleet = SimFleet {
            groups: Vec::with_capacity(spec.groups),
            clock: Duration::ZERO,
            next_address: u32::from(spec.first_address),
            next_id: 0,
            rng: Rng::new(spec.seed),
            churned: 0,
            replaced: 0,
            spec,
        };
        for g in 0..fleet.spec.groups {
            let service = format!("svc-{}", g % fleet.spec.services);
            let hooks = if fleet.spec.hooks {
                vec![
                    LifecycleHook {
                        name: "signpost-launch".into(),
                        transition: Transition::Launching,
                        heartbeat_timeout: Duration::from_secs(600),
                    },
                    LifecycleHook {
                        name: "signpost-terminate".into(),
                        transition: Transition::Terminating,
                        heartbeat_timeout: Duration::from_secs(600),
                    },
                ]
            } else {
                Vec::new()
            };
            fleet.groups.push(SimGroup {
                name: format!("{service}-g{g}"),
                tags: vec![
                    (tags::SERVICE.into(), service),
                    (tags::PORT.into(), fleet.spec.port.to_string()),
                    (tags::HEALTH.into(), "http:/health".into()),
                ],
                hooks,
                instances: Vec::new(),
            });
        }
        // Instances spread evenly: the first `instances % groups` groups
        // have one more.
        for n in 0..fleet.spec.instances {
            let g = n % fleet.spec.groups;
            let mut instance = fleet.launch(g);
            instance.lifecycle = LifecycleState::InService;
            instance.ec2 = Ec2State::Running;
            fleet.groups[g].instances.push(instance);
        }
        fleet
    }

    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// Simulated time since the start.
    pub fn clock(&self) -> Duration {
        self.clock
    }

    pub fn groups(&self) -> &[SimGroup] {
        &self.groups
    }

    /// Every instance, by id: what EC2 answers DescribeInstances from.
    pub fn by_id(&self) -> HashMap<&str, &SimInstance> {
        self.groups
            .iter()
            .flat_map(|g| &g.instances)
            .map(|i| (i.id.as_str(), i))
            .collect()
    }

    /// Moves the account on by `step`, one simulated second at a time:
    /// waits end, instances boot and go, churn replaces instances.
    pub fn advance(&mut self, step: Duration) {
        let end = self.clock + step;
        while self.clock < end {
            let tick = (end - self.clock).min(Duration::from_secs(1));
            self.clock += tick;
            // The epsilon: 60 ticks of 1/60 must make one, not 0.999...
            let due =
                (self.spec.instances as f64 * self.spec.churn_per_minute * self.clock.as_secs_f64()
                    / 60.0
                    + 1e-9)
                    .floor() as u64;
            while self.churned < due {
                self.churned += 1;
                self.replace_one();
            }
            self.progress();
        }
    }

    /// Completes a lifecycle action: true when the instance was waiting on
    /// a hook of that transition (AWS otherwise answers "No active
    /// Lifecycle Action").
    pub fn complete(
        &mut self,
        group: &str,
        instance: &str,
        transition: Transition,
        result: HookResult,
    ) -> bool {
        let clock = self.clock;
        let Some(i) = self
            .groups
            .iter_mut()
            .filter(|g| g.name == group)
            .flat_map(|g| g.instances.iter_mut())
            .find(|i| i.id == instance)
        else {
            return false;
        };
        let next = match (&i.lifecycle, transition, result) {
            (LifecycleState::PendingWait, Transition::Launching, HookResult::Continue) => {
                LifecycleState::InService
            }
            (LifecycleState::PendingWait, Transition::Launching, HookResult::Abandon) => {
                LifecycleState::Terminating
            }
            (LifecycleState::TerminatingWait, Transition::Terminating, _) => {
                LifecycleState::TerminatingProceed
            }
            _ => return false,
        };
        i.lifecycle = next;
        i.entered = clock;
        true
    }

    /// A new instance for group `g`, `Pending`.
    fn launch(&mut self, g: usize) -> SimInstance {
        self.next_id += 1;
        let address = Ipv4Addr::from(self.next_address);
        self.next_address += 1;
        SimInstance {
            id: format!("i-{:017x}", self.next_id),
            address: address.into(),
            zone: ZONES[self.groups[g].instances.len() % ZONES.len()],
            lifecycle: LifecycleState::Pending,
            ec2: Ec2State::Pending,
            launched: SystemTime::now(),
            entered: self.clock,
        }
    }

    /// One instance in service leaves (through its terminate hook) and a
    /// new one is launched into its group.
    fn replace_one(&mut self) {
        let hooks = self.spec.hooks;
        for _ in 0..16 {
            let g = self.rng.below(self.groups.len());
            let group = &self.groups[g];
            if group.instances.is_empty() {
                continue;
            }
            let n = self.rng.below(group.instances.len());
            if group.instances[n].lifecycle != LifecycleState::InService {
                continue;
            }
            let clock = self.clock;
            let old = &mut self.groups[g].instances[n];
            old.lifecycle = if hooks {
                LifecycleState::TerminatingWait
            } else {
                LifecycleState::Terminating
            };
            old.entered = clock;
            let new = self.launch(g);
            self.groups[g].instances.push(new);
            self.replaced += 1;
            return;
        }
    }

    /// Ends the waits and boots that are due.
    fn progress(&mut self) {
        let (clock, hooks) = (self.clock, self.spec.hooks);
        let (launch_wait, terminate_wait) = (self.spec.launch_wait, self.spec.terminate_wait);
        for group in &mut self.groups {
            for i in &mut group.instances {
                let age = clock - i.entered;
                let next = match i.lifecycle {
                    LifecycleState::Pending if age >= BOOT => {
                        i.ec2 = Ec2State::Running;
                        Some(if hooks {
                            LifecycleState::PendingWait
                        } else {
                            LifecycleState::InService
                        })
                    }
                    LifecycleState::PendingWait if age >= launch_wait => {
                        Some(LifecycleState::InService)
                    }
                    LifecycleState::TerminatingWait if age >= terminate_wait => {
                        Some(LifecycleState::TerminatingProceed)
                    }
                    LifecycleState::Terminating | LifecycleState::TerminatingProceed => {
                        i.ec2 = Ec2State::ShuttingDown;
                        (age >= SHUTDOWN).then_some(LifecycleState::Terminated)
                    }
                    _ => None,
                };
                if let Some(next) = next {
                    i.lifecycle = next;
                    i.entered = clock;
                }
            }
            group
                .instances
                .retain(|i| i.lifecycle != LifecycleState::Terminated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(fleet: &SimFleet, state: &LifecycleState) -> usize {
        fleet
            .groups()
            .iter()
            .flat_map(|g| &g.instances)
            .filter(|i| i.lifecycle == *state)
            .count()
    }

    #[test]
    fn the_fleet_starts_in_service_spread_over_its_groups() {
        let fleet = SimFleet::new(FleetSpec::new(1003, 10));
        assert_eq!(fleet.groups().len(), 10);
        let sizes: Vec<usize> = fleet.groups().iter().map(|g| g.instances.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1003);
        assert!(sizes.iter().all(|s| (100..=101).contains(s)), "{sizes:?}");
        assert_eq!(count(&fleet, &LifecycleState::InService), 1003);
        assert_eq!(fleet.by_id().len(), 1003, "ids are unique");
    }

    #[test]
    fn one_percent_a_minute_is_replaced_through_the_hooks() {
        let mut fleet = SimFleet::new(FleetSpec::new(10_000, 500));
        fleet.advance(Duration::from_secs(60));
        assert_eq!(fleet.replaced, 100);
        // A minute on, the first replacements have booted and wait on their
        // launch hook, and the drains (30 s) of the first half have ended.
        assert!(count(&fleet, &LifecycleState::PendingWait) > 0);
        assert!(count(&fleet, &LifecycleState::TerminatingWait) > 0);
        fleet.advance(Duration::from_secs(600));
        assert_eq!(fleet.replaced, 1100);
        let total: usize = fleet.groups().iter().map(|g| g.instances.len()).sum();
        // Beside their replacements, the last 40 s of departures (drain,
        // then shutdown) are still listed.
        assert!((10_000..10_200).contains(&total), "{total}");
    }

    #[test]
    fn a_completed_action_moves_the_instance_on_and_only_once() {
        let mut fleet = SimFleet::new(FleetSpec::new(100, 1));
        fleet.advance(Duration::from_secs(60 * 5 + 11));
        let group = fleet.groups()[0].name.clone();
        let waiting = fleet.groups()[0]
            .instances
            .iter()
            .find(|i| i.lifecycle == LifecycleState::PendingWait)
            .map(|i| i.id.clone())
            .expect("a launch waits");
        let done = |f: &mut SimFleet| {
            f.complete(
                &group,
                &waiting,
                Transition::Launching,
                HookResult::Continue,
            )
        };
        assert!(done(&mut fleet));
        assert!(!done(&mut fleet), "no longer waiting");
    }
}
