//! Plain data shared by every module: what the fleet looks like, what the
//! registry holds. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize, Serializer};

/// An EC2 instance id (`i-0123...`). A newtype so that ids, group names and
/// service names cannot be swapped by accident; the field is private so that
/// an id is only ever read as one (`as_str`, `Display`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for InstanceId {
    fn from(s: &str) -> Self {
        InstanceId(s.to_owned())
    }
}

impl From<String> for InstanceId {
    fn from(s: String) -> Self {
        InstanceId(s)
    }
}

/// An instance's Auto Scaling lifecycle state. The states signpost acts on
/// have variants; any other, including those AWS adds later (the warm pool's
/// `Warmed:*`, say), is kept as AWS spelled it and treated as not serving.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LifecycleState {
    Pending,
    /// A launch hook holds the instance.
    PendingWait,
    PendingProceed,
    InService,
    Terminating,
    /// A terminate hook holds the instance.
    TerminatingWait,
    TerminatingProceed,
    Terminated,
    Detaching,
    Detached,
    EnteringStandby,
    Standby,
    Other(String),
}

impl LifecycleState {
    const NAMED: [(LifecycleState, &'static str); 12] = [
        (LifecycleState::Pending, "Pending"),
        (LifecycleState::PendingWait, "Pending:Wait"),
        (LifecycleState::PendingProceed, "Pending:Proceed"),
        (LifecycleState::InService, "InService"),
        (LifecycleState::Terminating, "Terminating"),
        (LifecycleState::TerminatingWait, "Terminating:Wait"),
        (LifecycleState::TerminatingProceed, "Terminating:Proceed"),
        (LifecycleState::Terminated, "Terminated"),
        (LifecycleState::Detaching, "Detaching"),
        (LifecycleState::Detached, "Detached"),
        (LifecycleState::EnteringStandby, "EnteringStandby"),
        (LifecycleState::Standby, "Standby"),
    ];

    /// AWS's name of the state.
    pub fn as_aws(&self) -> &str {
        match self {
            LifecycleState::Other(name) => name,
            known => Self::NAMED
                .iter()
                .find(|(state, _)| state == known)
                .map_or("", |(_, name)| name),
        }
    }

    /// Whether a lifecycle hook holds the instance (`Pending:Wait`,
    /// `Terminating:Wait`) until it is completed.
    pub fn is_held_by_hook(&self) -> bool {
        matches!(
            self,
            LifecycleState::PendingWait | LifecycleState::TerminatingWait
        )
    }

    /// The transition whose hook holds an instance in this state, if any.
    pub fn held_for(&self) -> Option<Transition> {
        match self {
            LifecycleState::PendingWait => Some(Transition::Launching),
            LifecycleState::TerminatingWait => Some(Transition::Terminating),
            _ => None,
        }
    }

    /// Whether an instance in this state may take traffic once healthy.
    /// `Pending:Wait` is among them: a launch hook holds the instance there
    /// precisely so that it can be checked and pushed to routers before the
    /// group counts it in service.
    pub fn is_serving(&self) -> bool {
        matches!(
            self,
            LifecycleState::InService
                | LifecycleState::PendingWait
                | LifecycleState::PendingProceed
        )
    }
}

impl From<&str> for LifecycleState {
    fn from(name: &str) -> Self {
        Self::NAMED
            .iter()
            .find(|(_, known)| *known == name)
            .map_or_else(
                || LifecycleState::Other(name.to_owned()),
                |(state, _)| state.clone(),
            )
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_aws())
    }
}

/// An instance's EC2 state; any state AWS adds later is kept as spelled and
/// treated as not running.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ec2State {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    Other(String),
}

impl Ec2State {
    const NAMED: [(Ec2State, &'static str); 6] = [
        (Ec2State::Pending, "pending"),
        (Ec2State::Running, "running"),
        (Ec2State::ShuttingDown, "shutting-down"),
        (Ec2State::Terminated, "terminated"),
        (Ec2State::Stopping, "stopping"),
        (Ec2State::Stopped, "stopped"),
    ];

    /// AWS's name of the state.
    pub fn as_aws(&self) -> &str {
        match self {
            Ec2State::Other(name) => name,
            known => Self::NAMED
                .iter()
                .find(|(state, _)| state == known)
                .map_or("", |(_, name)| name),
        }
    }
}

impl From<&str> for Ec2State {
    fn from(name: &str) -> Self {
        Self::NAMED
            .iter()
            .find(|(_, known)| *known == name)
            .map_or_else(
                || Ec2State::Other(name.to_owned()),
                |(state, _)| state.clone(),
            )
    }
}

impl fmt::Display for Ec2State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_aws())
    }
}

pub use signpost_protocol::Revision;

/// How an endpoint is health-checked, from the `signpost:health` tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HealthCheck {
    /// HTTP GET of this path; 2xx and 3xx pass.
    Http { path: String },
    /// A TCP connect that succeeds passes.
    Tcp,
    /// The standard gRPC health protocol (`grpc.health.v1.Health/Check`)
    /// for `service` (empty: the server as a whole); SERVING passes.
    Grpc { service: String },
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Http { path } => write!(f, "http:{path}"),
            HealthCheck::Tcp => f.write_str("tcp"),
            HealthCheck::Grpc { service } if service.is_empty() => f.write_str("grpc"),
            HealthCheck::Grpc { service } => write!(f, "grpc:{service}"),
        }
    }
}

impl Serialize for HealthCheck {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a group's tags say about the service it runs. Groups of one service
/// must agree on all of it (see `reconcile`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSettings {
    /// Path prefix routers send to this service.
    pub route: String,
    pub port: u16,
    pub health: HealthCheck,
}

/// One Auto Scaling group as listed, with its tags already interpreted.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedGroup {
    pub name: String,
    /// The service named by `signpost:service`, when that tag is usable.
    pub service: Option<String>,
    /// The group's settings, or why its tags cannot be used.
    pub settings: Result<ServiceSettings, String>,
    pub instances: Vec<ObservedInstance>,
    /// The group's lifecycle hooks. Listed only for a group with an instance
    /// waiting on one (`Pending:Wait`, `Terminating:Wait`); empty otherwise.
    pub hooks: Vec<LifecycleHook>,
}

/// Which change of an instance a lifecycle hook holds. Serialized (in
/// `/v1/lifecycle`) by its short name, the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Transition {
    /// `autoscaling:EC2_INSTANCE_LAUNCHING`: the instance waits in `Pending:Wait`.
    #[serde(rename = "launch")]
    Launching,
    /// `autoscaling:EC2_INSTANCE_TERMINATING`: it waits in `Terminating:Wait`.
    #[serde(rename = "terminate")]
    Terminating,
}

impl Transition {
    pub fn from_aws(name: &str) -> Option<Transition> {
        match name {
            "autoscaling:EC2_INSTANCE_LAUNCHING" => Some(Transition::Launching),
            "autoscaling:EC2_INSTANCE_TERMINATING" => Some(Transition::Terminating),
            _ => None,
        }
    }

    /// A short name for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Transition::Launching => "launch",
            Transition::Terminating => "terminate",
        }
    }
}

/// One instance waiting on one hook: what CompleteLifecycleAction names.
/// How a lifecycle action ends (CompleteLifecycleAction's `LifecycleActionResult`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookResult {
    /// The instance goes on: into service, or on to termination.
    Continue,
    /// On launch, the instance is terminated (and replaced); on terminate,
    /// the same as `Continue`.
    Abandon,
}

impl HookResult {
    pub fn as_aws(self) -> &'static str {
        match self {
            HookResult::Continue => "CONTINUE",
            HookResult::Abandon => "ABANDON",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LifecycleAction {
    pub group: String,
    pub hook: String,
    pub instance: InstanceId,
    pub transition: Transition,
}

/// One lifecycle hook of a group (DescribeLifecycleHooks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleHook {
    pub name: String,
    pub transition: Transition,
    /// How long the action waits without a heartbeat before AWS applies the
    /// hook's default result.
    pub heartbeat_timeout: std::time::Duration,
}

/// One instance of a group: the group's view (lifecycle state) joined with
/// EC2's (state, address).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedInstance {
    pub id: InstanceId,
    pub lifecycle_state: LifecycleState,
    pub zone: String,
    /// EC2's view; `None` when DescribeInstances did not return the instance
    /// (eventual consistency): we then neither add nor remove it.
    pub ec2: Option<Ec2Instance>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ec2Instance {
    pub state: Ec2State,
    pub private_ip: Option<IpAddr>,
    pub launch_time: Option<SystemTime>,
}

impl ObservedInstance {
    /// Only an instance that Auto Scaling has launched (or holds in a launch
    /// hook) and EC2 runs may be registered.
    pub fn is_candidate(&self) -> bool {
        self.lifecycle_state.is_serving()
            && self
                .ec2
                .as_ref()
                .is_some_and(|e| e.state == Ec2State::Running && e.private_ip.is_some())
    }

    /// A terminate hook holds the instance: it still runs and serves the
    /// requests it has, but must get no new ones.
    pub fn is_draining(&self) -> bool {
        self.lifecycle_state == LifecycleState::TerminatingWait
    }

    /// True when we know the instance is going away (past any hook) or is not
    /// serving. An instance EC2 did not describe is not known to be leaving.
    pub fn is_leaving(&self) -> bool {
        !(self.lifecycle_state.is_serving() || self.is_draining())
            || self
                .ec2
                .as_ref()
                .is_some_and(|e| e.state != Ec2State::Running)
    }

    /// The hook transition the instance is waiting on, if any.
    pub fn waiting_on(&self) -> Option<Transition> {
        self.lifecycle_state.held_for()
    }
}

/// A complete listing of every group that carries the `signpost:service`
/// tag. Only a listing that succeeded in full is ever built: a failed page
/// means no `Fleet` value at all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    pub groups: Vec<ObservedGroup>,
}

/// An endpoint's state in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// Registered, not yet passed its health check: never routed to.
    Starting,
    Healthy,
    Unhealthy,
    /// Its instance is terminating (held by a terminate hook): out of
    /// routing, kept until every router has let go of it. Only removal ends it.
    Draining,
}

impl EndpointState {
    pub const ALL: [EndpointState; 4] = [
        EndpointState::Starting,
        EndpointState::Healthy,
        EndpointState::Unhealthy,
        EndpointState::Draining,
    ];

    pub fn is_routable(self) -> bool {
        self == EndpointState::Healthy
    }

    /// The metric label: the name the API shows.
    pub fn label(self) -> &'static str {
        match self {
            EndpointState::Starting => "starting",
            EndpointState::Healthy => "healthy",
            EndpointState::Unhealthy => "unhealthy",
            EndpointState::Draining => "draining",
        }
    }
}

/// One instance serving one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub instance_id: InstanceId,
    pub address: IpAddr,
    pub port: u16,
    pub zone: String,
    pub group: String,
    pub state: EndpointState,
    /// When the endpoint entered `state`.
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

/// A service in the registry: settings agreed by its groups and its endpoints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    #[serde(flatten)]
    pub settings: ServiceSettings,
    pub groups: BTreeSet<String>,
    pub endpoints: BTreeMap<InstanceId, Endpoint>,
}

/// Why a group is not being used as its tags ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupProblem {
    pub group: String,
    /// The service the group names, when it names one.
    pub service: Option<String>,
    pub reason: String,
}

/// An immutable view of the registry, shared by `Arc` with every reader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: Revision,
    /// `Arc` per service so that a change to one service copies only it.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Misconfigured groups, by group name.
    pub problems: BTreeMap<String, GroupProblem>,
}

impl Snapshot {
    pub fn endpoint(&self, service: &str, instance: &InstanceId) -> Option<&Endpoint> {
        self.services.get(service)?.endpoints.get(instance)
    }
}

pub fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// One change to the registry: the language `reconcile::plan` speaks and the
/// registry applies. Health results are changes too, so that the registry
/// stays the only writer.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Create a service, or update its settings and groups.
    PutService {
        name: String,
        settings: ServiceSettings,
        groups: BTreeSet<String>,
    },
    /// Drop a service that no group names any more and has no endpoints.
    RemoveService { name: String },
    /// Register an instance. It starts `Starting`, whatever `endpoint.state` says.
    AddEndpoint { service: String, endpoint: Endpoint },
    RemoveEndpoint {
        service: String,
        instance: InstanceId,
        reason: &'static str,
    },
    /// A health verdict. Applied only while the endpoint still has `address`,
    /// so a late probe result cannot mark a re-registered endpoint.
    SetState {
        service: String,
        instance: InstanceId,
        address: IpAddr,
        port: u16,
        state: EndpointState,
    },
    /// The full set of misconfigured groups.
    SetProblems(BTreeMap<String, GroupProblem>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_state_names_read_back_as_written_and_unknown_ones_are_kept() {
        for (state, name) in LifecycleState::NAMED {
            assert_eq!(LifecycleState::from(name), state);
            assert_eq!(state.to_string(), name);
        }
        for (state, name) in Ec2State::NAMED {
            assert_eq!(Ec2State::from(name), state);
            assert_eq!(state.to_string(), name);
        }
        let warmed = LifecycleState::from("Warmed:Running");
        assert_eq!(warmed, LifecycleState::Other("Warmed:Running".into()));
        assert_eq!(warmed.as_aws(), "Warmed:Running");
        assert!(
            !warmed.is_serving(),
            "a state we do not know takes no traffic"
        );
        assert_eq!(Ec2State::from("hibernating").as_aws(), "hibernating");
    }
}
