//! Plain data shared by every module: what the fleet looks like, what the
//! registry holds. No I/O here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize, Serializer};

/// An EC2 instance id (`i-0123...`). A newtype so that ids, group names and
/// service names cannot be swapped by accident.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct InstanceId(pub String);

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

pub use signpost_protocol::Revision;

/// How an endpoint is health-checked, from the `signpost:health` tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HealthCheck {
    /// HTTP GET of this path; 2xx and 3xx pass.
    Http { path: String },
    /// A TCP connect that succeeds passes.
    Tcp,
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Http { path } => write!(f, "http:{path}"),
            HealthCheck::Tcp => f.write_str("tcp"),
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

/// Which change of an instance a lifecycle hook holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transition {
    /// `autoscaling:EC2_INSTANCE_LAUNCHING`: the instance waits in `Pending:Wait`.
    Launching,
    /// `autoscaling:EC2_INSTANCE_TERMINATING`: it waits in `Terminating:Wait`.
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
    /// Auto Scaling lifecycle state: `InService`, `Pending:Wait`, `Terminating`, ...
    pub lifecycle_state: String,
    pub zone: String,
    /// EC2's view; `None` when DescribeInstances did not return the instance
    /// (eventual consistency): we then neither add nor remove it.
    pub ec2: Option<Ec2Instance>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ec2Instance {
    /// `pending`, `running`, `stopping`, ...
    pub state: String,
    pub private_ip: Option<IpAddr>,
    pub launch_time: Option<SystemTime>,
}

/// Lifecycle states in which an instance may take traffic once healthy.
/// `Pending:Wait` is among them: a launch hook holds the instance there
/// precisely so that it can be checked and pushed to routers before the
/// group counts it in service.
const SERVING: [&str; 3] = ["InService", "Pending:Wait", "Pending:Proceed"];

impl ObservedInstance {
    /// Only an instance that Auto Scaling has launched (or holds in a launch
    /// hook) and EC2 runs may be registered.
    pub fn is_candidate(&self) -> bool {
        SERVING.contains(&self.lifecycle_state.as_str())
            && self
                .ec2
                .as_ref()
                .is_some_and(|e| e.state == "running" && e.private_ip.is_some())
    }

    /// A terminate hook holds the instance: it still runs and serves the
    /// requests it has, but must get no new ones.
    pub fn is_draining(&self) -> bool {
        self.lifecycle_state == "Terminating:Wait"
    }

    /// True when we know the instance is going away (past any hook) or is not
    /// serving. An instance EC2 did not describe is not known to be leaving.
    pub fn is_leaving(&self) -> bool {
        !(SERVING.contains(&self.lifecycle_state.as_str()) || self.is_draining())
            || self.ec2.as_ref().is_some_and(|e| e.state != "running")
    }

    /// The hook transition the instance is waiting on, if any.
    pub fn waiting_on(&self) -> Option<Transition> {
        match self.lifecycle_state.as_str() {
            "Pending:Wait" => Some(Transition::Launching),
            "Terminating:Wait" => Some(Transition::Terminating),
            _ => None,
        }
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
    pub fn is_routable(self) -> bool {
        self == EndpointState::Healthy
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
