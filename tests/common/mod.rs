//! Test harness: a real AWS emulator (moto), real HTTP backends at the
//! instances' own 127.42.x.y addresses, and the real `signpost` binary.
//! Tests of the event path can add LocalStack (`LocalStack`, `EventBus`):
//! SQS and EventBridge there, Auto Scaling and EC2 still on moto.
//!
//! Every test gets its own emulator and its own subnet (127.42.N.0/24,
//! reserved machine-wide by `Subnet`), so tests run in parallel, in one
//! process or several, without sharing addresses; every backend listens on
//! `BACKEND_PORT`.

#![allow(dead_code)]

pub mod faults;
pub mod pki;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_autoscaling::types::Tag;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A tool of tests/xds/env.sh (`envoy`, `python`: the venv with grpcio):
/// from `env_var` (tests/run.sh sets it), else installed by the script.
pub fn xds_tool(which: &str, env_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return path.into();
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/xds/env.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(which)
        .output()
        .expect("run tests/xds/env.sh");
    assert!(
        out.status.success(),
        "tests/xds/env.sh {which} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Polls `cond` every 50 ms until it returns `Some`, or panics with `what`
/// after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The moto_server executable: `SIGNPOST_MOTO_SERVER`, or the harness's
/// pinned install (`localstack/emulator.sh bin` installs it once).
fn moto_server() -> PathBuf {
    if let Ok(path) = std::env::var("SIGNPOST_MOTO_SERVER") {
        return path.into();
    }
    let out = std::process::Command::new("bash")
        .arg(repo().join("localstack/emulator.sh"))
        .arg("bin")
        .stderr(Stdio::inherit())
        .output()
        .expect("run localstack/emulator.sh bin");
    assert!(out.status.success(), "localstack/emulator.sh bin failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A moto_server of the test's own, on a free loopback port.
pub struct Emulator {
    pub port: u16,
    child: Child,
    /// Where the emulator records every CompleteLifecycleAction call
    /// (localstack/lifecycle_hooks.py, `SIGNPOST_HOOKS_CALLS_LOG`).
    calls_log: PathBuf,
}

/// One CompleteLifecycleAction call as the emulator recorded it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct CompleteCall {
    /// Wall time, seconds since the Unix epoch.
    pub time: f64,
    /// The caller's access key id: tests give each controller replica its own.
    pub caller: String,
    /// The hook it named (`signpost-launch`, ...).
    pub hook: Option<String>,
    pub instance: Option<String>,
    pub result: String,
    /// False: no such waiting action (already completed).
    pub found: bool,
}

impl Emulator {
    pub async fn start() -> Emulator {
        let port = free_port();
        let calls_log = std::env::temp_dir().join(format!("signpost-moto-calls-{port}.jsonl"));
        let _ = std::fs::remove_file(&calls_log);
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("SIGNPOST_HOOKS_CALLS_LOG", &calls_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start moto_server");
        let emulator = Emulator {
            port,
            child,
            calls_log,
        };
        let url = format!("{}/moto-api/", emulator.endpoint());
        wait_for(
            "the emulator to answer",
            Duration::from_secs(30),
            || async { http_get(&url).await.ok().map(|_| ()) },
        )
        .await;
        emulator
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freezes the emulator (SIGSTOP): calls hang, as with a stalled AWS
    /// endpoint, and its state is kept for `resume`.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }

    /// Every CompleteLifecycleAction call so far, in order.
    pub fn complete_calls(&self) -> Vec<CompleteCall> {
        let text = std::fs::read_to_string(&self.calls_log).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Creates the DynamoDB table of the HA lease (partition key `name`).
    pub async fn create_lease_table(&self, table: &str) {
        let shared = sdk_config(&self.endpoint()).await;
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        aws_sdk_dynamodb::Client::new(&shared)
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("name")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("name")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("create the lease table");
    }
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The LocalStack server script: `SIGNPOST_LOCALSTACK_SERVER`, or the
/// harness's pinned install (`localstack/localstack.sh bin` installs it once).
fn localstack_server() -> PathBuf {
    if let Ok(path) = std::env::var("SIGNPOST_LOCALSTACK_SERVER") {
        return path.into();
    }
    let out = std::process::Command::new("bash")
        .arg(repo().join("localstack/localstack.sh"))
        .arg("bin")
        .stderr(Stdio::inherit())
        .output()
        .expect("run localstack/localstack.sh bin");
    assert!(out.status.success(), "localstack/localstack.sh bin failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// LocalStack's free edition of the test's own, on a free loopback port: it
/// serves SQS, EventBridge and IAM (its Auto Scaling answers 501, so groups
/// stay on moto). Its account id is 000000000000.
///
/// With `SIGNPOST_LOCALSTACK_ENDPOINT` set (e.g. a LocalStack Pro started
/// with an auth token), that one is used instead and nothing is started;
/// tests then share its default bus, so run them one at a time.
pub struct LocalStack {
    endpoint: String,
    /// Ours to stop and remove; `None` for an external LocalStack.
    own: Option<(Child, PathBuf)>,
}

static NEXT_NAME: AtomicUsize = AtomicUsize::new(0);

impl LocalStack {
    /// Starts it and waits for its health endpoint; panics with its log's
    /// tail if it exits or is not up within 60 s (it takes about 4 s).
    pub async fn start() -> LocalStack {
        if let Ok(endpoint) = std::env::var("SIGNPOST_LOCALSTACK_ENDPOINT") {
            let url = format!("{endpoint}/_localstack/health");
            let answer = http_get(&url).await;
            assert!(
                matches!(answer, Ok((200, _))),
                "SIGNPOST_LOCALSTACK_ENDPOINT={endpoint}: {url} answered {answer:?}"
            );
            return LocalStack {
                endpoint,
                own: None,
            };
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("signpost-localstack-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("localstack.log");
        let mut child = Command::new(localstack_server())
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg(dir.join("files"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("localstack.stderr")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start localstack_server");
        let url = format!("http://127.0.0.1:{port}/_localstack/health");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if matches!(http_get(&url).await, Ok((200, _))) {
                break;
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() >= deadline {
                let tail = |name: &str| {
                    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(20)..].join("\n")
                };
                panic!(
                    "LocalStack did not come up on port {port} ({}):\n{}\n{}",
                    exited.map_or("60 s passed".into(), |s| format!("exited {s}")),
                    tail("localstack.stderr"),
                    tail("localstack.log"),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        LocalStack {
            endpoint: format!("http://127.0.0.1:{port}"),
            own: Some((child, dir)),
        }
    }

    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// `base` made unique to this test run, so that queues left on an
    /// external LocalStack by an earlier run are never read.
    pub fn name(&self, base: &str) -> String {
        match self.own {
            Some(_) => base.to_owned(),
            None => format!(
                "{base}-{}-{}",
                std::process::id(),
                NEXT_NAME.fetch_add(1, Ordering::SeqCst)
            ),
        }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        // SIGKILL is enough: the script execs LocalStack, which starts no
        // processes of its own for these services.
        if let Some((child, dir)) = &mut self.own {
            let _ = child.start_kill();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The operator's EventBridge rules (`iam/setup.sh` reads the same files).
pub const RULE_AUTOSCALING: &str = include_str!("../../iam/event-patterns/autoscaling.json");
pub const RULE_EC2_STATE: &str = include_str!("../../iam/event-patterns/ec2-state.json");

/// SQS and EventBridge clients on one endpoint (LocalStack or moto).
pub struct EventBus {
    pub sqs: aws_sdk_sqs::Client,
    pub events: aws_sdk_eventbridge::Client,
}

impl EventBus {
    pub async fn new(endpoint: &str) -> EventBus {
        let shared = sdk_config(endpoint).await;
        EventBus {
            sqs: aws_sdk_sqs::Client::new(&shared),
            events: aws_sdk_eventbridge::Client::new(&shared),
        }
    }

    /// Creates a queue with `attributes` and returns (url, arn).
    pub async fn queue(&self, name: &str, attributes: &[(&str, &str)]) -> (String, String) {
        use aws_sdk_sqs::types::QueueAttributeName;
        let mut create = self.sqs.create_queue().queue_name(name);
        for (k, v) in attributes {
            create = create.attributes(QueueAttributeName::from(*k), *v);
        }
        let url = create.send().await.unwrap().queue_url.unwrap();
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()
            .remove(&QueueAttributeName::QueueArn)
            .unwrap();
        (url, arn)
    }

    /// The operator's rules on this bus, each targeting the queue `arn`.
    pub async fn rules_to(&self, arn: &str) {
        for (name, pattern) in [
            ("signpost-autoscaling", RULE_AUTOSCALING),
            ("signpost-ec2-state", RULE_EC2_STATE),
        ] {
            self.events
                .put_rule()
                .name(name)
                .event_pattern(pattern.trim())
                .send()
                .await
                .unwrap();
            let out = self
                .events
                .put_targets()
                .rule(name)
                .targets(
                    aws_sdk_eventbridge::types::Target::builder()
                        .id("signpost-queue")
                        .arn(arn)
                        .build()
                        .unwrap(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(out.failed_entry_count, 0, "targets of {name}: {out:?}");
        }
    }

    /// Puts one event on the default bus as `source` would, `detail` as JSON.
    pub async fn put(
        &self,
        source: &str,
        detail_type: &str,
        resource: &str,
        detail: serde_json::Value,
    ) {
        let entry = aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
            .source(source)
            .detail_type(detail_type)
            .resources(resource)
            .detail(detail.to_string())
            .build();
        let out = self
            .events
            .put_events()
            .entries(entry)
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_entry_count, 0, "PutEvents: {out:?}");
    }

    /// Messages visible or in flight in the queue.
    pub async fn queued(&self, url: &str) -> usize {
        queue_depth(&self.sqs, url).await
    }
}

/// The port every test backend listens on. Backends of different tests
/// never collide because each test has addresses of its own (`Subnet`).
pub const BACKEND_PORT: u16 = 18080;

/// A port no backend uses, on which a subnet's `.1` address is held to
/// reserve the subnet.
const RESERVATION_PORT: u16 = 18999;

/// 127.42.16.0/20 is the wide subnet of the benchmarks.
const WIDE: u8 = 16;

static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// A /24 of 127.42.0.0/16 that is this test's alone, across every test
/// process on the machine (cargo test's binaries, nextest's parallel
/// processes, a benchmark): it is reserved by listening on its `.1` address
/// for as long as this value lives. The one allocator of test addresses, so
/// that no two files have to agree on ports or subnets by comment.
pub struct Subnet {
    pub n: u8,
    _held: std::net::TcpListener,
}

impl Subnet {
    pub fn reserve() -> Arc<Subnet> {
        for _ in 0..254 {
            let n = NEXT_SUBNET.fetch_add(1, Ordering::SeqCst).max(1);
            if (WIDE..WIDE + 16).contains(&n) {
                continue;
            }
            if let Some(subnet) = Subnet::hold(n) {
                return subnet;
            }
        }
        panic!("no free test subnet in 127.42.0.0/16");
    }

    fn hold(n: u8) -> Option<Arc<Subnet>> {
        let held =
            std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 42, n, 1), RESERVATION_PORT))
                .ok()?;
        Some(Arc::new(Subnet { n, _held: held }))
    }

    /// The address of host `host` (4 and up are the emulator's instances).
    pub fn ip(&self, host: u8) -> IpAddr {
        [127, 42, self.n, host].into()
    }
}

/// AWS clients on the emulator, with a VPC and a subnet of the test's own.
#[derive(Clone)]
pub struct Cloud {
    pub ec2: aws_sdk_ec2::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub subnet: String,
    /// Held for as long as any clone of this `Cloud` lives.
    pub addresses: Arc<Subnet>,
}

impl Cloud {
    /// The queue `signpost-events` (its URL; the same again for the same
    /// name, as on SQS).
    pub async fn event_queue(&self) -> String {
        self.sqs
            .create_queue()
            .queue_name("signpost-events")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap()
    }

    /// Puts `body` on `queue`, as EventBridge or a hook notification would.
    pub async fn send_event(&self, queue: &str, body: &str) {
        self.sqs
            .send_message()
            .queue_url(queue)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// A subnet of the test's own: its instances get 127.42.N.4, ...
    pub async fn new(emulator: &Emulator) -> Cloud {
        let addresses = Subnet::reserve();
        let cidr = format!("127.42.{}.0/24", addresses.n);
        Cloud::with_subnet(emulator, &cidr, addresses).await
    }

    /// A /20 for fleets of more than 250 instances (benchmarks).
    pub async fn new_wide(emulator: &Emulator) -> Cloud {
        let addresses = Subnet::hold(WIDE).expect("the wide subnet is free");
        Cloud::with_subnet(emulator, "127.42.16.0/20", addresses).await
    }

    async fn with_subnet(emulator: &Emulator, cidr: &str, addresses: Arc<Subnet>) -> Cloud {
        let shared = sdk_config(&emulator.endpoint()).await;
        let ec2 = aws_sdk_ec2::Client::new(&shared);
        let autoscaling = aws_sdk_autoscaling::Client::new(&shared);
        let sqs = aws_sdk_sqs::Client::new(&shared);
        let vpc = ec2
            .create_vpc()
            .cidr_block("127.42.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc
            .unwrap()
            .vpc_id
            .unwrap();
        let subnet = ec2
            .create_subnet()
            .vpc_id(vpc)
            .cidr_block(cidr)
            .availability_zone("us-east-1a")
            .send()
            .await
            .unwrap()
            .subnet
            .unwrap()
            .subnet_id
            .unwrap();
        ec2.create_launch_template()
            .launch_template_name("signpost-test")
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id("ami-12c6146b")
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        Cloud {
            ec2,
            autoscaling,
            sqs,
            subnet,
            addresses,
        }
    }

    /// Creates a group with these tags and desired capacity.
    pub async fn create_group(&self, name: &str, tags: &[(&str, &str)], desired: i32) {
        let tags = tags.iter().map(|(k, v)| {
            Tag::builder()
                .key(*k)
                .value(*v)
                .resource_id(name)
                .resource_type("auto-scaling-group")
                .propagate_at_launch(false)
                .build()
        });
        self.autoscaling
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_name("signpost-test")
                    .build(),
            )
            .min_size(0)
            .max_size(50)
            .desired_capacity(desired)
            .vpc_zone_identifier(&self.subnet)
            .set_tags(Some(tags.collect()))
            .send()
            .await
            .unwrap();
    }

    pub async fn set_desired(&self, name: &str, desired: i32) {
        self.autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(name)
            .desired_capacity(desired)
            .honor_cooldown(false)
            .send()
            .await
            .unwrap();
    }

    /// Adds a lifecycle hook to `group`; `transition` is `launching` or
    /// `terminating`.
    pub async fn put_hook(
        &self,
        group: &str,
        name: &str,
        transition: &str,
        heartbeat_timeout: i32,
        default_result: &str,
    ) {
        let transition = match transition {
            "launching" => "autoscaling:EC2_INSTANCE_LAUNCHING",
            "terminating" => "autoscaling:EC2_INSTANCE_TERMINATING",
            other => panic!("no transition {other}"),
        };
        self.autoscaling
            .put_lifecycle_hook()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(name)
            .lifecycle_transition(transition)
            .heartbeat_timeout(heartbeat_timeout)
            .default_result(default_result)
            .send()
            .await
            .unwrap();
    }

    /// Each instance of the group with its lifecycle state, sorted by id.
    pub async fn lifecycle_states(&self, group: &str) -> Vec<(String, String)> {
        let groups = self
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .unwrap();
        let mut out: Vec<(String, String)> = groups.auto_scaling_groups()[0]
            .instances()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_owned(),
                    i.lifecycle_state().unwrap().as_str().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// EC2's state of one instance (`running`, `terminated`, ...).
    pub async fn ec2_state(&self, id: &str) -> String {
        let described = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        described.reservations()[0].instances()[0]
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str()
            .to_owned()
    }

    /// The private IP of each of these instances.
    pub async fn addresses(&self, ids: &[String]) -> Vec<(String, IpAddr)> {
        let described = self
            .ec2
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .unwrap();
        described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                let ip = i.private_ip_address()?.parse().ok()?;
                Some((i.instance_id()?.to_owned(), ip))
            })
            .collect()
    }

    /// The group's instances (id, private IP), sorted by id.
    pub async fn instances(&self, group: &str) -> Vec<(String, IpAddr)> {
        let ids: Vec<String> = self
            .lifecycle_states(group)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return vec![];
        }
        let mut out = self.addresses(&ids).await;
        assert_eq!(
            out.len(),
            ids.len(),
            "every instance of {group} has an address"
        );
        out.sort();
        out
    }
}

/// One real HTTP server per instance, at the instance's address: the
/// application the instance would run. `/health` answers 200; any other
/// path answers `instance=<id>` and counts the request.
pub struct Backends {
    port: u16,
    running: HashMap<IpAddr, (String, JoinHandle<()>)>,
    hits: HashMap<IpAddr, Arc<AtomicUsize>>,
    /// Per address: `/health` answers 503 while set (the application runs,
    /// its health check fails).
    failing_health: HashMap<IpAddr, Arc<AtomicBool>>,
    /// Whether `/health` of a backend started at a new address fails.
    pub new_failing: bool,
}

impl Backends {
    pub fn new(port: u16) -> Backends {
        Backends {
            port,
            running: HashMap::new(),
            hits: HashMap::new(),
            failing_health: HashMap::new(),
            new_failing: false,
        }
    }

    /// Starts a server for each instance not yet served, and stops the
    /// servers of instances no longer listed.
    pub async fn follow(&mut self, instances: &[(String, IpAddr)]) {
        let keep: Vec<IpAddr> = instances.iter().map(|(_, ip)| *ip).collect();
        let gone: Vec<IpAddr> = self
            .running
            .keys()
            .filter(|ip| !keep.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.stop(ip);
        }
        for (id, ip) in instances {
            if !self.running.contains_key(ip) {
                self.start(id, *ip).await;
            }
        }
    }

    pub async fn start(&mut self, id: &str, ip: IpAddr) {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, self.port))
            .await
            .unwrap_or_else(|e| panic!("bind backend {ip}:{}: {e}", self.port));
        let hits = self.hits.entry(ip).or_default().clone();
        let new_failing = self.new_failing;
        let failing_health = self
            .failing_health
            .entry(ip)
            .or_insert_with(|| Arc::new(AtomicBool::new(new_failing)))
            .clone();
        let id_owned = id.to_owned();
        // Connections live in a JoinSet owned by the accept task, so that
        // stopping the backend closes kept-alive connections too, as a
        // process that dies would.
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let hits = hits.clone();
                let failing_health = failing_health.clone();
                let id = id_owned.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let mut status = hyper::StatusCode::OK;
                        let path = req.uri().path();
                        // `/slow/MS` answers after MS milliseconds: a request
                        // that stays in flight.
                        let delay = path
                            .strip_prefix("/slow/")
                            .and_then(|ms| ms.parse().ok())
                            .map(Duration::from_millis);
                        let body = if path == "/health" {
                            if failing_health.load(Ordering::SeqCst) {
                                status = hyper::StatusCode::SERVICE_UNAVAILABLE;
                            }
                            "ok\n".to_owned()
                        } else {
                            hits.fetch_add(1, Ordering::SeqCst);
                            format!("instance={id}\n")
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        async move {
                            if let Some(delay) = delay {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        self.running.insert(ip, (id.to_owned(), task));
    }

    /// The instances served now: (id, address).
    pub fn serving(&self) -> Vec<(String, IpAddr)> {
        let running = self.running.iter();
        running.map(|(ip, (id, _))| (id.clone(), *ip)).collect()
    }

    /// Stops answering at `ip`: the listener closes, connections are refused.
    pub fn stop(&mut self, ip: IpAddr) {
        if let Some((_, task)) = self.running.remove(&ip) {
            task.abort();
        }
    }

    /// Makes `/health` at `ip` fail (503) or pass; works before `start` too.
    pub fn set_health(&mut self, ip: IpAddr, passing: bool) {
        self.failing_health
            .entry(ip)
            .or_default()
            .store(!passing, Ordering::SeqCst);
    }

    pub fn hits(&self, ip: IpAddr) -> usize {
        self.hits.get(&ip).map_or(0, |h| h.load(Ordering::SeqCst))
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
    }
}

/// The harness's certificates: one CA for the whole test process, the
/// controllers' certificate for 127.0.0.1, the harness's own client
/// certificate (role admin, for reading the API), and one client
/// certificate per router id, made when first asked for.
///
/// Every controller a test starts runs with `[tls]` and `client_ca` unless
/// the test configures `[tls]` or `[auth]` itself (the security tests),
/// serves xDS (Envoy and gRPC clients speak to the xDS listener, which
/// shares the API's TLS; its TLS has tests of its own, and
/// `Controller::start_mtls_with_health` gives such a controller the
/// harness's TLS, as the gRPC and Envoy suites do through
/// `Controller::start_xds_with_health` and `Scene::start_xds_with_health`), or
/// `SIGNPOST_TEST_PLAINTEXT=1` is set (to debug with plain HTTP).
pub struct Pki {
    ca: pki::Ca,
    server: pki::Pair,
    harness: pki::Pair,
    routers: std::sync::Mutex<HashMap<String, Arc<pki::Pair>>>,
}

/// The identity of the harness's client certificate.
const HARNESS: &str = "test-harness";

impl Pki {
    pub fn get() -> &'static Pki {
        static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("signpost-pki-{}", std::process::id()));
            let ca = pki::Ca::new(&dir, "signpost-tests");
            let server = ca.server("controller");
            let harness = ca.client(HARNESS, pki::Name::Cn(HARNESS));
            Pki {
                ca,
                server,
                harness,
                routers: Default::default(),
            }
        })
    }

    /// Whether a controller started with `extra` gets the harness's TLS.
    pub fn applies(extra: &str) -> bool {
        std::env::var_os("SIGNPOST_TEST_PLAINTEXT").is_none()
            && !["[tls]", "[auth]", "[xds]"]
                .iter()
                .any(|table| extra.contains(table))
    }

    fn controller_toml(&self) -> String {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n[auth]\nroles = {{ {HARNESS} = \"admin\" }}\n",
            self.server.cert.display().to_string(),
            self.server.key.display().to_string(),
            self.ca.cert.display().to_string(),
        )
    }

    fn harness_client(&self) -> signpost_router::transport::Controller {
        signpost_router::transport::Controller::new(
            &signpost_router::transport::Credentials {
                controller_ca: Some(self.ca.cert.clone()),
                client_cert: Some(self.harness.cert.clone()),
                client_key: Some(self.harness.key.clone()),
                token_file: None,
            },
            true,
            Duration::from_secs(2),
        )
        .expect("the harness's credentials are usable")
    }

    /// `--controller-ca`, `--client-cert` and `--client-key` for a router
    /// (or agent) `id` of a controller at `url`; none for plain HTTP.
    pub fn router_args(url: &str, id: &str) -> Vec<String> {
        if !url.starts_with("https://") {
            return Vec::new();
        }
        let pki = Pki::get();
        let pair = pki
            .routers
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(pki.ca.client(&format!("router-{id}"), pki::Name::Cn(id))))
            .clone();
        let path = |p: &std::path::Path| p.display().to_string();
        vec![
            "--controller-ca".into(),
            path(&pki.ca.cert),
            "--client-cert".into(),
            path(&pair.cert),
            "--client-key".into(),
            path(&pair.key),
        ]
    }
}

/// The harness's certificates for tests that hand them to clients other
/// than `signpost router` (a gRPC client's xDS bootstrap).
impl Pki {
    /// Whether `SIGNPOST_TEST_PLAINTEXT` asks for plain HTTP and gRPC.
    pub fn plaintext() -> bool {
        std::env::var_os("SIGNPOST_TEST_PLAINTEXT").is_some()
    }

    /// The CA's certificate (PEM): what clients trust the controller by.
    pub fn ca_cert(&self) -> &std::path::Path {
        &self.ca.cert
    }

    /// The CA itself, to issue certificates the harness does not keep.
    pub fn ca(&self) -> &pki::Ca {
        &self.ca
    }

    /// The client certificate for `id` (CN = `id`), the one
    /// `router_args` gives a router of that id; made when first asked for.
    pub fn client(&self, id: &str) -> Arc<pki::Pair> {
        self.routers
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(self.ca.client(&format!("router-{id}"), pki::Name::Cn(id))))
            .clone()
    }
}

/// The `signpost controller` binary, run as a user would, against the emulator.
pub struct Controller {
    pub port: u16,
    child: Child,
    /// Over TLS: a client with the test's credentials. `None`: plain HTTP.
    tls: Option<signpost_router::transport::Controller>,
}

impl Controller {
    /// Starts the controller with short test periods and `extra` top-level
    /// TOML lines.
    pub async fn start(emulator: &Emulator, extra: &str) -> Controller {
        Controller::start_with_health(emulator, extra, "200ms", "150ms").await
    }

    pub async fn start_with_health(
        emulator: &Emulator,
        extra: &str,
        interval: &str,
        timeout: &str,
    ) -> Controller {
        Controller::start_at(emulator, free_port(), extra, interval, timeout).await
    }

    /// Starts the controller with `env` added to its environment (e.g.
    /// `AWS_ENDPOINT_URL_SQS`: SQS on another emulator than moto).
    pub async fn start_with_env(
        emulator: &Emulator,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Controller {
        Controller::start_at_with_env(emulator, free_port(), extra, "200ms", "150ms", env, None)
            .await
    }

    /// Starts a controller whose `extra` config turns TLS on; the harness
    /// talks to it with `credentials` (a CA, and a certificate or token).
    pub async fn start_tls(
        emulator: &Emulator,
        extra: &str,
        credentials: &signpost_router::transport::Credentials,
    ) -> Controller {
        let client =
            signpost_router::transport::Controller::new(credentials, true, Duration::from_secs(2))
                .expect("the test's credentials are usable");
        let port = free_port();
        Controller::start_at_with_env(emulator, port, extra, "200ms", "150ms", &[], Some(client))
            .await
    }

    /// Starts a controller on `port`: a restart, as routers know it by its URL.
    pub async fn start_at(
        emulator: &Emulator,
        port: u16,
        extra: &str,
        interval: &str,
        timeout: &str,
    ) -> Controller {
        Controller::start_at_with_env(emulator, port, extra, interval, timeout, &[], None).await
    }

    pub async fn start_at_with_env(
        emulator: &Emulator,
        port: u16,
        extra: &str,
        interval: &str,
        timeout: &str,
        env: &[(&str, &str)],
        tls: Option<signpost_router::transport::Controller>,
    ) -> Controller {
        let aws = "max_attempts = 1\nattempt_timeout = \"2s\"\noperation_timeout = \"2s\"";
        Controller::spawn(emulator, port, extra, aws, (interval, timeout), env, tls).await
    }

    /// Starts the controller with its `[aws]` section given whole (retries,
    /// timeouts, call budget) and `env` added to its environment.
    pub async fn start_with_aws(
        emulator: &Emulator,
        extra: &str,
        aws: &str,
        env: &[(&str, &str)],
    ) -> Controller {
        let health = ("200ms", "150ms");
        Controller::spawn(emulator, free_port(), extra, aws, health, env, None).await
    }

    /// The same with the health checks' `interval` and `timeout`.
    pub async fn start_with_aws_and_health(
        emulator: &Emulator,
        extra: &str,
        aws: &str,
        health: (&str, &str),
        env: &[(&str, &str)],
    ) -> Controller {
        Controller::spawn(emulator, free_port(), extra, aws, health, env, None).await
    }

    async fn spawn(
        emulator: &Emulator,
        port: u16,
        extra: &str,
        aws: &str,
        (interval, timeout): (&str, &str),
        env: &[(&str, &str)],
        tls: Option<signpost_router::transport::Controller>,
    ) -> Controller {
        let dir = std::env::temp_dir().join(format!("signpost-test-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("controller.toml");
        // Tests resync every second unless they say otherwise.
        let resync = if extra.contains("resync_interval") {
            ""
        } else {
            "resync_interval = \"1s\"\n"
        };
        // Every suite runs with TLS and client certificates, as a deployed
        // controller does, unless the test sets up its own (see `Pki`).
        let (secure, tls) = match tls {
            None if Pki::applies(extra) => {
                let pki = Pki::get();
                (pki.controller_toml(), Some(pki.harness_client()))
            }
            tls => (String::new(), tls),
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\n{resync}{extra}\n\
                 [aws]\n{aws}\n\
                 [health]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n{secure}"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_signpost"))
            .args(["controller", "--config"])
            .arg(&config)
            .env("AWS_ENDPOINT_URL", emulator.endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env(
                "SIGNPOST_LOG",
                std::env::var("SIGNPOST_LOG").unwrap_or("warn".into()),
            )
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .spawn()
            .expect("start signpost controller");
        let controller = Controller { port, child, tls };
        wait_for(
            "the controller to listen",
            Duration::from_secs(10),
            || async { controller.fetch("/healthz").await.ok().map(|_| ()) },
        )
        .await;
        controller
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// A GET, over TLS with the harness's credentials when the controller
    /// has TLS on.
    pub async fn fetch(&self, path: &str) -> Result<(u16, Bytes), String> {
        let Some(client) = &self.tls else {
            return http_get(&self.url(path)).await;
        };
        let request = Request::get(self.url(path)).body(Full::default()).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), client.send(request))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.fetch(path).await.expect("controller answers");
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The value of one Prometheus sample from `/metrics`, e.g.
    /// `signpost_events_total{result="handled"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.fetch("/metrics").await.expect("controller answers");
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// Instance ids of the service's endpoints in `state`, sorted.
    pub async fn endpoints(&self, service: &str, state: &str) -> Vec<String> {
        let (_, body) = self.get(&format!("/v1/services/{service}")).await;
        let mut ids: Vec<String> = body["endpoints"]
            .as_array()
            .map(|eps| {
                eps.iter()
                    .filter(|e| e["state"] == state)
                    .map(|e| e["instance_id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Waits until the service's endpoints in `state` are exactly `ids`.
    pub async fn wait_endpoints(&self, service: &str, state: &str, ids: &[String]) {
        let what = format!("{service} endpoints in state {state} to be {ids:?}");
        wait_for(&what, Duration::from_secs(20), || async {
            (self.endpoints(service, state).await == ids).then_some(())
        })
        .await;
    }

    /// The revision a router acked, from `/v1/routers`.
    pub async fn acked(&self, router: &str) -> Option<u64> {
        self.router_record(router).await?["acked_revision"].as_u64()
    }

    /// Waits until `router` has acked the registry's current revision, and
    /// returns that revision.
    pub async fn wait_in_sync(&self, router: &Router) -> u64 {
        self.wait_acked_by(&router.id).await
    }

    /// The same for any data-plane client by id (an Envoy, an agent).
    pub async fn wait_acked_by(&self, id: &str) -> u64 {
        wait_for(
            &format!("router {id} to ack the registry's revision"),
            Duration::from_secs(20),
            || async {
                let (_, body) = self.get("/v1/routers").await;
                let revision = body["revision"].as_u64()?;
                (self.acked(id).await == Some(revision)).then_some(revision)
            },
        )
        .await
    }

    /// The controller's record of router `id` (any kind), from `/v1/routers`.
    pub async fn router_record(&self, id: &str) -> Option<serde_json::Value> {
        let (_, body) = self.get("/v1/routers").await;
        let routers = body["routers"].as_array()?;
        routers.iter().find(|r| r["id"] == id).cloned()
    }

    pub async fn wait_ready(&self) {
        wait_for("/readyz to answer 200", Duration::from_secs(20), || async {
            (self.get("/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    /// Sends SIGTERM and returns the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        signal(&self.child, "-TERM");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("controller exits within 10s of SIGTERM")
            .unwrap()
    }
}

impl Controller {
    /// Starts a controller whose `extra` has `[xds]` with the harness's
    /// `[tls]` and `client_ca` (`Pki`), which then cover the xDS listener
    /// too; the harness reads the API with its own certificate. Unlike
    /// `start_with_health`, which leaves a controller serving xDS plain.
    pub async fn start_mtls_with_health(
        emulator: &Emulator,
        extra: &str,
        interval: &str,
        timeout: &str,
    ) -> Controller {
        let pki = Pki::get();
        let extra = format!("{extra}\n{}", pki.controller_toml());
        let aws = "max_attempts = 1\nattempt_timeout = \"2s\"\noperation_timeout = \"2s\"";
        let tls = Some(pki.harness_client());
        Controller::spawn(
            emulator,
            free_port(),
            &extra,
            aws,
            (interval, timeout),
            &[],
            tls,
        )
        .await
    }
}

impl Controller {
    /// Starts a controller whose `extra` has `[xds]`: with the harness's
    /// TLS and client CA (`start_mtls_with_health`), unless
    /// `SIGNPOST_TEST_PLAINTEXT` is set, then plain (`start_with_health`).
    pub async fn start_xds_with_health(
        emulator: &Emulator,
        extra: &str,
        interval: &str,
        timeout: &str,
    ) -> Controller {
        if Pki::plaintext() {
            Controller::start_with_health(emulator, extra, interval, timeout).await
        } else {
            Controller::start_mtls_with_health(emulator, extra, interval, timeout).await
        }
    }
}

impl Controller {
    /// SIGKILL: the controller vanishes without a goodbye, as on a crash.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// The `signpost router` binary, proxying on a free port, its log in a file.
pub struct Router {
    pub id: String,
    pub port: u16,
    pub admin_port: u16,
    log: PathBuf,
    child: Child,
}

impl Router {
    /// Starts a router subscribed to `controller` (a base URL), with its
    /// cache at `cache` and `extra` flags; waits until its admin port answers.
    pub async fn start(
        controller: &str,
        id: &str,
        cache: &std::path::Path,
        extra: &[&str],
    ) -> Router {
        let port = free_port();
        let admin_port = free_port();
        let log = std::env::temp_dir().join(format!("signpost-router-{id}-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_signpost"))
            .arg("router")
            .args(["--controller", controller, "--id", id])
            // The harness's certificate for `id`, unless the test brings
            // its own credentials (the security tests).
            .args(match extra.contains(&"--controller-ca") {
                true => Vec::new(),
                false => Pki::router_args(controller, id),
            })
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .arg("--cache")
            .arg(cache)
            .args(extra)
            .env(
                "SIGNPOST_LOG",
                std::env::var("SIGNPOST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start signpost router");
        let router = Router {
            id: id.to_owned(),
            port,
            admin_port,
            log,
            child,
        };
        let url = format!("http://127.0.0.1:{admin_port}/healthz");
        wait_for("the router to listen", Duration::from_secs(10), || async {
            http_get(&url).await.ok().map(|_| ())
        })
        .await;
        router
    }

    /// A request through the proxy: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let (status, body) = http_get(&format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .expect("router answers");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn admin(&self, path: &str) -> (u16, serde_json::Value) {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        let (status, body) = http_get(&url).await.expect("router admin answers");
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Waits until `/readyz` answers 200; returns its body.
    pub async fn wait_ready(&self) -> serde_json::Value {
        wait_for(
            "the router to be ready",
            Duration::from_secs(20),
            || async {
                let (status, body) = self.admin("/readyz").await;
                (status == 200).then_some(body)
            },
        )
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("router running")
    }

    pub async fn terminate(mut self) -> std::process::ExitStatus {
        signal(&self.child, "-TERM");
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("router exits within 15s of SIGTERM")
            .unwrap()
    }

    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// How most tests begin: an emulator, one tagged group whose instances each
/// run their backend, and a controller that sees them all healthy.
pub struct Scene {
    pub emulator: Emulator,
    pub cloud: Cloud,
    pub backends: Backends,
    pub controller: Controller,
    /// The group's instances at the start, sorted by id.
    pub instances: Vec<(String, IpAddr)>,
}

impl Scene {
    /// `controller_toml` is passed to `Controller::start`.
    pub async fn start(
        port: u16,
        group: &str,
        tags: &[(&str, &str)],
        desired: i32,
        controller_toml: &str,
    ) -> Scene {
        Scene::start_with_health(
            port,
            group,
            tags,
            desired,
            controller_toml,
            ("200ms", "150ms"),
        )
        .await
    }

    /// The same with the controller's health interval and timeout.
    pub async fn start_with_health(
        port: u16,
        group: &str,
        tags: &[(&str, &str)],
        desired: i32,
        controller_toml: &str,
        health: (&str, &str),
    ) -> Scene {
        Scene::start_scene(port, group, tags, desired, controller_toml, health, false).await
    }

    /// The same for a controller serving xDS (`controller_toml` has
    /// `[xds]`): with the harness's TLS and client CA, which then cover the
    /// xDS listener too (`Controller::start_xds_with_health`), unless
    /// `SIGNPOST_TEST_PLAINTEXT` is set.
    pub async fn start_xds_with_health(
        port: u16,
        group: &str,
        tags: &[(&str, &str)],
        desired: i32,
        controller_toml: &str,
        health: (&str, &str),
    ) -> Scene {
        Scene::start_scene(port, group, tags, desired, controller_toml, health, true).await
    }

    async fn start_scene(
        port: u16,
        group: &str,
        tags: &[(&str, &str)],
        desired: i32,
        controller_toml: &str,
        (interval, timeout): (&str, &str),
        xds: bool,
    ) -> Scene {
        let emulator = Emulator::start().await;
        let cloud = Cloud::new(&emulator).await;
        let mut backends = Backends::new(port);
        cloud.create_group(group, tags, desired).await;
        let instances = cloud.instances(group).await;
        backends.follow(&instances).await;
        let controller = match xds {
            false => {
                Controller::start_with_health(&emulator, controller_toml, interval, timeout).await
            }
            true => {
                Controller::start_xds_with_health(&emulator, controller_toml, interval, timeout)
                    .await
            }
        };
        let (_, service) = tags
            .iter()
            .find(|(k, _)| *k == "signpost:service")
            .expect("a signpost:service tag");
        controller
            .wait_endpoints(service, "healthy", &ids(&instances))
            .await;
        Scene {
            emulator,
            cloud,
            backends,
            controller,
            instances,
        }
    }
}

pub fn ids(instances: &[(String, IpAddr)]) -> Vec<String> {
    instances.iter().map(|(id, _)| id.clone()).collect()
}

/// A plain HTTP GET: status and body.
pub async fn http_get(url: &str) -> Result<(u16, Bytes), String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse().unwrap()));
    let response = request
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// What runs on an instance: started when the instance appears, stopped
/// when it dies. `Backends` (HTTP) is one; tests/xds_grpc.rs has gRPC.
pub trait Application: Send + 'static {
    /// The instances served now: (id, address).
    fn serving(&self) -> Vec<(String, IpAddr)>;
    fn start(&mut self, id: &str, ip: IpAddr) -> impl Future<Output = ()> + Send;
    fn stop(&mut self, ip: IpAddr) -> impl Future<Output = ()> + Send;
}

impl Application for Backends {
    fn serving(&self) -> Vec<(String, IpAddr)> {
        Backends::serving(self)
    }
    async fn start(&mut self, id: &str, ip: IpAddr) {
        Backends::start(self, id, ip).await
    }
    async fn stop(&mut self, ip: IpAddr) {
        Backends::stop(self, ip)
    }
}

/// Applications that come and go with a group's instances, as on real
/// instances: a server starts when an instance joins the group and stops
/// (connections cut) the moment EC2 terminates it, which with a terminate
/// hook is when the hook completes.
pub struct FollowedGroup<A: Application = Backends> {
    pub backends: Arc<tokio::sync::Mutex<A>>,
    task: JoinHandle<()>,
}

impl<A: Application> FollowedGroup<A> {
    pub fn start(cloud: &Cloud, group: &str, backends: A) -> FollowedGroup<A> {
        let backends = Arc::new(tokio::sync::Mutex::new(backends));
        let task = tokio::spawn({
            let (cloud, group, backends) = (cloud.clone(), group.to_owned(), backends.clone());
            async move {
                // One DescribeAutoScalingGroups a poll. DescribeInstances only
                // for ids not seen before (an address never changes), and for
                // ids that left the group: a backend stops when EC2 says its
                // instance is no longer running, the moment it really dies.
                let mut serving: HashMap<String, IpAddr> =
                    backends.lock().await.serving().into_iter().collect();
                let mut addresses = serving.clone();
                loop {
                    let ids: Vec<String> = cloud
                        .lifecycle_states(&group)
                        .await
                        .into_iter()
                        .map(|(id, _)| id)
                        .collect();
                    let new: Vec<String> = ids
                        .iter()
                        .filter(|id| !addresses.contains_key(*id))
                        .cloned()
                        .collect();
                    if !new.is_empty() {
                        addresses.extend(cloud.addresses(&new).await);
                    }
                    let left: Vec<String> = serving
                        .keys()
                        .filter(|id| !ids.contains(id))
                        .cloned()
                        .collect();
                    let mut backends = backends.lock().await;
                    for id in left {
                        let state = cloud.ec2_state(&id).await;
                        if state != "running" {
                            let ip = serving.remove(&id).expect("serving");
                            backends.stop(ip).await;
                        }
                    }
                    for id in &ids {
                        if let (false, Some(ip)) = (serving.contains_key(id), addresses.get(id)) {
                            backends.start(id, *ip).await;
                            serving.insert(id.clone(), *ip);
                        }
                    }
                    drop(backends);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        FollowedGroup { backends, task }
    }
}

impl<A: Application> Drop for FollowedGroup<A> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Steady traffic through a router: `per_second` requests, each checked (a
/// 200 from an instance), each on its own task so that a slow one does not
/// lower the rate.
pub struct Load {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    pub fn start(url: String, per_second: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let client: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
                let mut requests = tokio::task::JoinSet::new();
                let mut sent = 0;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    sent += 1;
                    let (client, url) = (client.clone(), url.clone());
                    requests.spawn(async move {
                        let started = std::time::SystemTime::now();
                        check_request(&client, &url).await.map_err(|e| {
                            let at = humantime::format_rfc3339_millis(started);
                            format!("{at}: {e}")
                        })
                    });
                }
                let mut failures = Vec::new();
                while let Some(done) = requests.join_next().await {
                    if let Err(e) = done.unwrap() {
                        failures.push(e);
                    }
                }
                failures.sort();
                (sent, failures)
            }
        });
        Load { stop, task }
    }

    /// Stops sending, waits for the answers; (requests sent, failures).
    pub async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// One checked request: a 200 from an instance within 5 s, or why not.
pub async fn check_request(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<(), String> {
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let response = client
            .get(url.parse().unwrap())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && body.starts_with("instance=") {
            Ok(())
        } else {
            Err(format!("HTTP {status}: {}", body.trim()))
        }
    })
    .await;
    answer.unwrap_or_else(|_| Err("no answer within 5s".into()))
}

/// The AWS SDK's configuration for the emulator at `endpoint`: its region
/// and its test credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    let creds = aws_sdk_ec2::config::Credentials::new("test", "test", None, None, "test");
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(creds)
        .load()
        .await
}

/// Messages visible or in flight in an SQS queue.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> usize {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let attrs = attrs.attributes().unwrap();
    let get = |name| {
        attrs
            .get(&aws_sdk_sqs::types::QueueAttributeName::from(name))
            .map_or(0, |v| v.parse::<usize>().unwrap())
    };
    get("ApproximateNumberOfMessages") + get("ApproximateNumberOfMessagesNotVisible")
}

/// The group's instances in `state`, sorted.
pub async fn in_state(cloud: &Cloud, group: &str, state: &str) -> Vec<String> {
    let states = cloud.lifecycle_states(group).await;
    states
        .into_iter()
        .filter(|(_, s)| s == state)
        .map(|(id, _)| id)
        .collect()
}

/// Waits until the group is exactly `n` instances, all InService.
pub async fn wait_in_service(cloud: &Cloud, group: &str, n: usize, limit: Duration) -> Vec<String> {
    wait_for(
        &format!("{group} to be {n} instances, all InService"),
        limit,
        || async {
            let states = cloud.lifecycle_states(group).await;
            let all = states.len() == n && states.iter().all(|(_, s)| s == "InService");
            all.then(|| states.into_iter().map(|(id, _)| id).collect())
        },
    )
    .await
}

/// The completed lifecycle action of `instance`, from `/v1/lifecycle`.
pub async fn completed(controller: &Controller, instance: &str) -> Option<serde_json::Value> {
    let (_, body) = controller.get("/v1/lifecycle").await;
    let recent = body["recent"].as_array()?;
    recent.iter().find(|a| a["instance"] == instance).cloned()
}

pub fn ip_of(instances: &[(String, IpAddr)], id: &str) -> IpAddr {
    instances.iter().find(|(i, _)| i == id).unwrap().1
}

/// signpost's launch and terminate hooks on `group`, with long heartbeat
/// timeouts: completing by timeout would take minutes, so every completion
/// within a test's waits is signpost's.
pub async fn hold_launches_and_terminations(cloud: &Cloud, group: &str) {
    cloud
        .put_hook(group, "signpost-launch", "launching", 600, "ABANDON")
        .await;
    cloud
        .put_hook(group, "signpost-terminate", "terminating", 600, "CONTINUE")
        .await;
}

/// The zero-failure test's scaling: `group` (of `service`) goes 2 → 6 → 2
/// `cycles` times, each step waiting until the group is InService and the
/// controller has the instances healthy.
pub async fn cycle_2_6_2(
    cloud: &Cloud,
    controller: &Controller,
    group: &str,
    service: &str,
    cycles: usize,
) {
    for cycle in 0..cycles {
        for n in [6, 2] {
            cloud.set_desired(group, n).await;
            let ids = wait_in_service(cloud, group, n as usize, Duration::from_secs(30)).await;
            controller.wait_endpoints(service, "healthy", &ids).await;
        }
        eprintln!("{group}: cycle {} done", cycle + 1);
    }
}

/// After a test's scaling: nothing may be left waiting. Prints how many
/// lifecycle actions there were and which a timeout decided.
pub async fn lifecycle_settled(controller: &Controller, group: &str) {
    let (_, lifecycle) = controller.get("/v1/lifecycle").await;
    assert_eq!(
        lifecycle["active"],
        serde_json::json!([]),
        "nothing left waiting"
    );
    let recent = lifecycle["recent"].as_array().unwrap();
    let timed_out: Vec<_> = recent.iter().filter(|a| !a["note"].is_null()).collect();
    eprintln!(
        "{group}: {} actions, {} decided by a timeout: {timed_out:#?}",
        recent.len(),
        timed_out.len()
    );
}

/// A TCP forwarder from a loopback port to `target`, which a test can cut
/// (every connection closed, the port refusing) and restore on the same
/// port: one AWS service out of reach while the others answer.
pub struct TcpProxy {
    pub port: u16,
    ip: IpAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        TcpProxy::start_on([127, 0, 0, 1].into(), target).await
    }

    /// The same listening on another loopback address than 127.0.0.1.
    pub async fn start_on(ip: IpAddr, target: SocketAddr) -> TcpProxy {
        let mut proxy = TcpProxy {
            port: free_port(),
            ip,
            target,
            task: None,
        };
        proxy.restore().await;
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the port and every connection through it.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) {
        self.cut();
        let listener = tokio::net::TcpListener::bind((self.ip, self.port))
            .await
            .expect("the proxy port is free again");
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// An EventBridge "EC2 Instance Launch Successful" event of `group` for
/// `instance`.
pub fn launch_event(group: &str, instance: &str) -> String {
    serde_json::json!({
        "version": "0", "id": "e-1", "source": "aws.autoscaling",
        "detail-type": "EC2 Instance Launch Successful", "account": "123456789012",
        "time": "2026-11-25T10:00:00Z", "region": "us-east-1",
        "detail": { "AutoScalingGroupName": group, "EC2InstanceId": instance, "StatusCode": "InProgress" }
    })
    .to_string()
}
