//! The soak (not in CI, `#[ignore]`): steady, checked load through a
//! signpost router for `SIGNPOST_SOAK_MINUTES` (30) while the group's
//! desired capacity changes every minute through signpost's lifecycle
//! hooks, and AWS faults from the fault proxy (`common::faults`) come and
//! go at random on the APIs the controller calls.
//!
//! ```sh
//! cargo test --test soak -- --ignored --nocapture
//! ```
//!
//! A row every 30 s as it goes (a run cut short still shows its data):
//! requests and failures so far, the controller's and the router's RSS and
//! open file descriptors. At the end a summary and the verdict: no failed
//! request, no lifecycle timeout (signpost's own, or a hook left to expire
//! at AWS), every scale operation converged, and RSS after warm-up within a
//! margin. `SIGNPOST_SOAK_SEED` replays the same schedule of scale
//! operations and faults; the product's timing still differs run to run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use common::faults::{Fault, FaultProxy, Times};
use common::{
    check_request, ids, Backends, Cloud, Controller, Emulator, EventBus, FollowedGroup, Router,
};

const GROUP: &str = "web-soak";
const SERVICE: &str = "web";
const TAGS: [(&str, &str); 3] = [
    ("signpost:service", SERVICE),
    ("signpost:port", "18080"),
    ("signpost:route", "/"),
];
const LAUNCH_HOOK: &str = "signpost-launch";
const TERMINATE_HOOK: &str = "signpost-terminate";

/// Requests a second through the router, as in the zero-failure tests.
const RATE: u32 = 100;
const SCALE_EVERY: Duration = Duration::from_secs(60);
/// A scale operation must be done (InService, healthy in the registry)
/// well within its minute: four launches take a few seconds, a fault a few
/// more, and the listing after it one resync.
const CONVERGE_WITHIN: Duration = Duration::from_secs(50);
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// The group's capacity moves within this range.
const SMALLEST: i32 = 2;
const LARGEST: i32 = 6;

/// The hooks' heartbeat timeout (s). Short enough that an action signpost
/// lost expires within a short run and is counted, long enough that a
/// fault of a few seconds cannot make it expire; signpost heartbeats every
/// third of it, so a wait held past 20 s exercises the heartbeats.
const HEARTBEAT_TIMEOUT: i32 = 60;

/// Faults: one every 10–30 s (or at the next scale operation), held 3–10 s
/// (held 5 s or more, a fault on the listing meets at least one resync).
const FAULT_GAP_S: (u64, u64) = (10, 30);
const FAULT_HELD_S: (u64, u64) = (3, 10);
/// The APIs the controller calls that the proxy can fault.
const APIS: [&str; 5] = [
    "DescribeAutoScalingGroups",
    "DescribeInstances",
    "DescribeLifecycleHooks",
    "CompleteLifecycleAction",
    "ReceiveMessage",
];

/// A realistic controller, made fast: a resync of 5 s (30 s by default)
/// with the event queue carrying changes at once; the router grace short,
/// as it only matters at start; the default launch and drain timeouts.
fn controller_toml(queue: &str) -> String {
    format!(
        "resync_interval = \"5s\"\n\
         [events]\nqueue_url = \"{queue}\"\nwait_time = \"5s\"\n\
         [lifecycle]\nrouter_grace = \"3s\"\n"
    )
}
/// The SDK's standard retries; timeouts shorter than the defaults (5 s,
/// 20 s) so that a stall is a failure within seconds.
const AWS: &str =
    "max_attempts = 3\nattempt_timeout = \"2s\"\noperation_timeout = \"6s\"\ncalls_per_second = 10";
/// Health checks a loaded 2-core machine passes reliably (as tests/lifecycle.rs).
const HEALTH: (&str, &str) = ("500ms", "400ms");

/// After warm-up, RSS may grow by this share of its first sample, and at
/// least `RSS_FLOOR_KB`. glibc's malloc keeps freed memory in per-thread
/// arenas (up to 8 per core), so RSS steps up by a few MiB when a burst
/// (a fault's recovery, six instances' probes, TLS handshakes) first lands
/// on another worker thread, without any leak; such steps stop once every
/// thread has its arena. A leak grows with time: 100 bytes a request is
/// 15 MB over 25 minutes at 100 requests/s, beyond this margin.
const RSS_GROWTH: f64 = 0.20;
const RSS_FLOOR_KB: u64 = 4 * 1024;

/// A small deterministic generator (splitmix64): the schedule replays from
/// its seed, without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

/// What the proxy can do to `api`, for how many calls. A page that fails
/// only exists for the paginated listings; a throttle for the next 2 calls
/// is the burst the SDK's retries absorb.
fn repertoire(api: &str, rng: &mut Rng) -> Vec<(Fault, Times)> {
    let stall = Duration::from_secs(rng.between(3, 8));
    let mut faults = vec![
        (Fault::Throttle { retry_after: None }, Times::Always),
        (
            Fault::Throttle {
                retry_after: Some(1),
            },
            Times::Always,
        ),
        (Fault::Throttle { retry_after: None }, Times::Next(2)),
        (Fault::Status(500), Times::Always),
        (Fault::Status(503), Times::Always),
        (Fault::Reset, Times::Always),
        (Fault::Stall(stall), Times::Always),
        (Fault::Truncated, Times::Always),
        (Fault::Malformed, Times::Always),
        (Fault::Slow(Duration::from_millis(600)), Times::Always),
    ];
    if matches!(api, "DescribeAutoScalingGroups" | "DescribeInstances") {
        faults.push((Fault::BrokenPage, Times::Always));
    }
    faults
}

/// A fault's kind for the summary: its name without the durations.
fn kind(fault: Fault, times: Times) -> String {
    let name = match fault {
        Fault::Stall(_) => "stall".to_owned(),
        Fault::Slow(_) => "slow answer".to_owned(),
        other => other.name(),
    };
    match times {
        Times::Always => name,
        Times::Next(n) => format!("{name} (next {n} calls)"),
    }
}

/// Minutes and seconds since `start`.
fn clock(start: Instant, at: Instant) -> String {
    let s = at.saturating_duration_since(start).as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// Steady traffic through the router: `per_second` requests, each on its
/// own task and checked (a 200 from an instance); unlike `common::Load` it
/// counts as it goes, so that every sample can say how many failed, and
/// keeps failures by reason.
struct CheckedLoad {
    progress: Arc<LoadProgress>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct LoadProgress {
    sent: AtomicUsize,
    failed: AtomicUsize,
    /// Failures by reason (what the client saw, without the time).
    reasons: Mutex<BTreeMap<String, usize>>,
    /// The first failures with their time, to set against the log.
    first: Mutex<Vec<String>>,
}

impl CheckedLoad {
    fn start(url: String, per_second: u32) -> CheckedLoad {
        let progress = Arc::new(LoadProgress::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let (progress, stop) = (progress.clone(), stop.clone());
            async move {
                let client: Client<HttpConnector, Full<Bytes>> =
                    Client::builder(TokioExecutor::new()).build(HttpConnector::new());
                let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
                let mut requests = tokio::task::JoinSet::new();
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    progress.sent.fetch_add(1, Ordering::SeqCst);
                    let (client, url, progress) = (client.clone(), url.clone(), progress.clone());
                    requests.spawn(async move {
                        let started = std::time::SystemTime::now();
                        if let Err(reason) = check_request(&client, &url).await {
                            progress.failed.fetch_add(1, Ordering::SeqCst);
                            *progress
                                .reasons
                                .lock()
                                .unwrap()
                                .entry(reason.clone())
                                .or_default() += 1;
                            let mut first = progress.first.lock().unwrap();
                            if first.len() < 10 {
                                let at = humantime::format_rfc3339_millis(started);
                                first.push(format!("{at}: {reason}"));
                            }
                        }
                    });
                    while requests.try_join_next().is_some() {}
                }
                while requests.join_next().await.is_some() {}
            }
        });
        CheckedLoad {
            progress,
            stop,
            task,
        }
    }

    /// Stops sending and waits for every request sent to be answered.
    async fn finish(self) -> Arc<LoadProgress> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.progress
    }
}

fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    controller: Option<Usage>,
    router: Option<Usage>,
}

/// What the soak's tasks share with the rows they print.
#[derive(Default)]
struct Progress {
    scale_ops: AtomicUsize,
    desired: AtomicI32,
    faults: AtomicUsize,
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn usage_cells(usage: Option<Usage>) -> String {
    match usage {
        Some((rss, fds)) => format!("{:>8.1} | {fds:>4}", mib(rss)),
        None => format!("{:>8} | {:>4}", "gone", "-"),
    }
}

/// Samples both processes every `SAMPLE_EVERY` and prints a row each time.
fn start_sampler(
    start: Instant,
    pids: (u32, u32),
    load: Arc<LoadProgress>,
    progress: Arc<Progress>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> JoinHandle<()> {
    eprintln!(
        "soak:  time | scale ops | desired | faults | requests | failed | controller MiB |  fds | router MiB |  fds"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sample = Sample {
                at: Instant::now(),
                controller: usage(pids.0),
                router: usage(pids.1),
            };
            samples.lock().unwrap().push(sample);
            eprintln!(
                "soak: {:>5} | {:>9} | {:>7} | {:>6} | {:>8} | {:>6} |       {} |   {}",
                clock(start, sample.at),
                progress.scale_ops.load(Ordering::SeqCst),
                progress.desired.load(Ordering::SeqCst),
                progress.faults.load(Ordering::SeqCst),
                load.sent.load(Ordering::SeqCst),
                load.failed.load(Ordering::SeqCst),
                usage_cells(sample.controller),
                usage_cells(sample.router),
            );
        }
    })
}

/// One fault as injected.
struct Injected {
    api: &'static str,
    kind: String,
}

/// Injects a random fault on a random API, holds it 3–10 s, clears it; the
/// next one 10–30 s later or, one time in three, within the first 4 s of
/// the next scale operation: the lifecycle calls (CompleteLifecycleAction,
/// the listings that find the waiting actions) are made in those seconds,
/// and a fault at a random moment would seldom meet them. Runs until
/// aborted; the caller clears whatever is left.
fn start_faults(
    start: Instant,
    mut rng: Rng,
    proxy: Arc<FaultProxy>,
    progress: Arc<Progress>,
    injected: Arc<Mutex<Vec<Injected>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = Instant::now();
            let at = if rng.between(0, 2) == 0 {
                let ops = (now - start).as_secs() / SCALE_EVERY.as_secs() + 1;
                start + SCALE_EVERY * ops as u32 + Duration::from_millis(rng.between(0, 4000))
            } else {
                now + Duration::from_secs(rng.between(FAULT_GAP_S.0, FAULT_GAP_S.1))
            };
            tokio::time::sleep_until(at).await;
            let api = *rng.pick(&APIS);
            let repertoire = repertoire(api, &mut rng);
            let (fault, times) = *rng.pick(&repertoire);
            let held =
                Duration::from_millis(rng.between(FAULT_HELD_S.0 * 1000, FAULT_HELD_S.1 * 1000));
            proxy.inject(api, fault, times);
            progress.faults.fetch_add(1, Ordering::SeqCst);
            eprintln!(
                "soak: {:>5}   fault on {api}: {} ({times:?}) for {:.1} s",
                clock(start, Instant::now()),
                fault.name(),
                held.as_secs_f64()
            );
            injected.lock().unwrap().push(Injected {
                api,
                kind: kind(fault, times),
            });
            tokio::time::sleep(held).await;
            proxy.clear(api);
        }
    })
}

/// The instances the controller lists healthy, sorted; `None` if it did
/// not answer.
async fn healthy(controller: &Controller) -> Option<Vec<String>> {
    let (_, body) = controller
        .fetch(&format!("/v1/services/{SERVICE}"))
        .await
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mut ids: Vec<String> = body["endpoints"]
        .as_array()?
        .iter()
        .filter(|e| e["state"] == "healthy")
        .filter_map(|e| e["instance_id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Some(ids)
}

/// Waits until the group is `n` instances, all InService, and the
/// controller lists exactly those healthy, with nothing left waiting in
/// `/v1/lifecycle`. How long it took, or what was seen at `limit`.
async fn converge(
    cloud: &Cloud,
    controller: &Controller,
    n: usize,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let states = cloud.lifecycle_states(GROUP).await;
        let seen = if states.len() == n && states.iter().all(|(_, s)| s == "InService") {
            let ids: Vec<String> = states.into_iter().map(|(id, _)| id).collect();
            let listed = healthy(controller).await;
            let active = match controller.fetch("/v1/lifecycle").await {
                Ok((_, body)) => serde_json::from_slice::<serde_json::Value>(&body)
                    .map(|b| b["active"].clone())
                    .unwrap_or_default(),
                Err(e) => serde_json::Value::String(e),
            };
            if listed.as_ref() == Some(&ids) && active == serde_json::json!([]) {
                return Ok(started.elapsed());
            }
            format!(
                "InService {ids:?}; controller lists healthy {listed:?}; active actions {active}"
            )
        } else {
            format!("the group: {states:?}")
        };
        if started.elapsed() >= limit {
            return Err(seen);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every sample of `family` in the Prometheus text: (labels, value).
fn samples_of(metrics: &str, family: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Hook actions of signpost's hooks that AWS (the emulator) ended by
/// itself at the heartbeat timeout, rather than signpost: an action with
/// no CompleteLifecycleAction of signpost's that found it waiting (the
/// emulator's record of every call).
///
/// A launch held past its heartbeat timeout ends in the hook's default,
/// ABANDON: the instance is terminated at once, without a terminate
/// action. A launch that a scale-in cancelled while it waited goes on to
/// the terminate hook instead; it is counted apart (the schedule scales
/// again only once the previous operation is done, or has failed to be).
/// Every instance that was in service (from the start, or launched with
/// CONTINUE) and is gone went through the terminate hook.
async fn expired_at_aws(
    cloud: &Cloud,
    emulator: &Emulator,
    initial: &BTreeSet<String>,
) -> HookActions {
    let described = cloud
        .ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("subnet-id")
                .values(&cloud.subnet)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(described.next_token().is_none(), "one page of instances");
    let instances: Vec<(String, String)> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            let state = i.state().and_then(|s| s.name()).map(|n| n.as_str());
            (
                i.instance_id().unwrap().to_owned(),
                state.unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let completions: BTreeMap<(String, String), String> = emulator
        .complete_calls()
        .into_iter()
        .filter(|c| c.found)
        .filter_map(|c| Some(((c.instance?, c.hook?), c.result)))
        .collect();
    let completed = |id: &str, hook: &str| completions.get(&(id.to_owned(), hook.to_owned()));
    let mut actions = HookActions::default();
    for (id, state) in &instances {
        let launch = completed(id, LAUNCH_HOOK).map(String::as_str);
        let terminate = completed(id, TERMINATE_HOOK).is_some();
        if !initial.contains(id) {
            actions.launches += 1;
            match (launch, terminate) {
                (None, false) => actions.expired_launches.push(id.clone()),
                (None, true) => actions.cancelled_launches += 1,
                _ => {}
            }
        }
        let gone = matches!(state.as_str(), "shutting-down" | "terminated");
        let in_service = initial.contains(id) || launch == Some("CONTINUE");
        if gone && (in_service || terminate) {
            actions.terminations += 1;
            if !terminate {
                actions.expired_terminations.push(id.clone());
            }
        }
    }
    actions
}

/// The hook actions of the soak as AWS saw them.
#[derive(Default)]
struct HookActions {
    launches: usize,
    terminations: usize,
    /// Launches a scale-in cancelled while they waited (then terminated).
    cancelled_launches: usize,
    /// Instances whose action AWS ended at its timeout, not signpost.
    expired_launches: Vec<String>,
    expired_terminations: Vec<String>,
}

/// One process's resident memory (kB, VmRSS) and open file descriptors.
type Usage = (u64, usize);

/// Which process of a sample.
type Reading = fn(&Sample) -> Option<Usage>;

/// One process after warm-up: its first and last sample, and its largest RSS.
struct OverTime {
    first: Usage,
    last: Usage,
    max_rss: u64,
}

fn over_time(samples: &[Sample], warm_up: Instant, of: Reading) -> Option<OverTime> {
    let after: Vec<Usage> = samples
        .iter()
        .filter(|s| s.at >= warm_up)
        .filter_map(of)
        .collect();
    Some(OverTime {
        first: *after.first()?,
        last: *after.last()?,
        max_rss: after.iter().map(|(rss, _)| *rss).max()?,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of 30 minutes: cargo test --test soak -- --ignored --nocapture"]
async fn soak_steady_load_while_the_group_scales_every_minute_under_random_aws_faults() {
    let minutes: f64 = std::env::var("SIGNPOST_SOAK_MINUTES")
        .ok()
        .map(|m| {
            m.parse()
                .expect("SIGNPOST_SOAK_MINUTES: a number of minutes")
        })
        .unwrap_or(30.0);
    let length = Duration::from_secs_f64(minutes * 60.0);
    let seed: u64 = std::env::var("SIGNPOST_SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("SIGNPOST_SOAK_SEED: an unsigned integer"))
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.unwrap().as_nanos() as u64 ^ u64::from(std::process::id())
        });
    // Warm-up: connections, pools, arenas and the lifecycle's records fill
    // during the first minutes; growth is judged after.
    let warm_up = (length / 3).min(Duration::from_secs(300));
    eprintln!(
        "soak: {minutes} min, seed {seed} (SIGNPOST_SOAK_SEED={seed} replays the schedule), {RATE} requests/s, warm-up {} s",
        warm_up.as_secs()
    );

    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    // The operator's EventBridge rules on the emulator's bus, to a queue of
    // its SQS: the emulator's hooks put their events there.
    let bus = EventBus::new(&emulator.endpoint()).await;
    let (queue, queue_arn) = bus.queue("signpost-soak-events", &[]).await;
    bus.rules_to(&queue_arn).await;
    cloud.create_group(GROUP, &TAGS, SMALLEST).await;
    cloud
        .put_hook(
            GROUP,
            LAUNCH_HOOK,
            "launching",
            HEARTBEAT_TIMEOUT,
            "ABANDON",
        )
        .await;
    cloud
        .put_hook(
            GROUP,
            TERMINATE_HOOK,
            "terminating",
            HEARTBEAT_TIMEOUT,
            "CONTINUE",
        )
        .await;
    let instances = cloud.instances(GROUP).await;
    let initial: BTreeSet<String> = ids(&instances).into_iter().collect();
    let mut backends = Backends::new(common::BACKEND_PORT);
    backends.follow(&instances).await;
    let proxy = Arc::new(FaultProxy::start(&emulator.endpoint()).await);
    let controller = Controller::start_with_aws_and_health(
        &emulator,
        &controller_toml(&queue),
        AWS,
        HEALTH,
        &[("AWS_ENDPOINT_URL", &proxy.url())],
    )
    .await;
    controller
        .wait_endpoints(SERVICE, "healthy", &ids(&instances))
        .await;
    let cache = std::env::temp_dir().join(format!("signpost-soak-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&cache);
    let router = Router::start(&controller.url(""), "edge-1", &cache, &[]).await;
    router.wait_ready().await;
    controller.wait_in_sync(&router).await;
    let _followed = FollowedGroup::start(&cloud, GROUP, backends);

    let load = CheckedLoad::start(format!("http://127.0.0.1:{}/", router.port), RATE);
    let start = Instant::now();
    let progress = Arc::new(Progress::default());
    progress.desired.store(SMALLEST, Ordering::SeqCst);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = start_sampler(
        start,
        (controller.pid(), router.pid()),
        load.progress.clone(),
        progress.clone(),
        samples.clone(),
    );
    let injected = Arc::new(Mutex::new(Vec::new()));
    let faults = start_faults(
        start,
        Rng(seed ^ 0xfa17),
        proxy.clone(),
        progress.clone(),
        injected.clone(),
    );

    // Every minute, another capacity in 2..=6, through the hooks.
    let mut rng = Rng(seed);
    let mut desired = SMALLEST;
    let mut slowest = Duration::ZERO;
    let mut not_converged = Vec::new();
    let mut op = 0;
    while SCALE_EVERY * op < length {
        tokio::time::sleep_until(start + SCALE_EVERY * op).await;
        op += 1;
        let from = desired;
        while desired == from {
            desired = rng.between(SMALLEST as u64, LARGEST as u64) as i32;
        }
        cloud.set_desired(GROUP, desired).await;
        progress.desired.store(desired, Ordering::SeqCst);
        let outcome = converge(&cloud, &controller, desired as usize, CONVERGE_WITHIN).await;
        progress.scale_ops.fetch_add(1, Ordering::SeqCst);
        match outcome {
            Ok(took) => {
                slowest = slowest.max(took);
                eprintln!(
                    "soak: {:>5}   scale {from} → {desired}: done in {:.1} s",
                    clock(start, Instant::now()),
                    took.as_secs_f64()
                );
            }
            Err(seen) => {
                eprintln!(
                    "soak: {:>5}   scale {from} → {desired}: NOT done within {CONVERGE_WITHIN:?}: {seen}",
                    clock(start, Instant::now())
                );
                not_converged.push(format!("{from} → {desired}: {seen}"));
            }
        }
    }
    tokio::time::sleep_until(start + length).await;
    sampler.abort();
    let last = Sample {
        at: Instant::now(),
        controller: usage(controller.pid()),
        router: usage(router.pid()),
    };
    samples.lock().unwrap().push(last);

    // The end: no more faults, everything settles, the load stops.
    faults.abort();
    for api in APIS {
        proxy.clear(api);
    }
    let settled = converge(&cloud, &controller, desired as usize, CONVERGE_WITHIN).await;
    let ended = Instant::now();
    let load = load.finish().await;
    let samples = samples.lock().unwrap().clone();

    let sent = load.sent.load(Ordering::SeqCst);
    let failed = load.failed.load(Ordering::SeqCst);
    let metrics = match controller.fetch("/metrics").await {
        Ok((_, body)) => String::from_utf8_lossy(&body).into_owned(),
        Err(e) => panic!("the controller's /metrics at the end: {e}"),
    };
    let timeouts = samples_of(&metrics, "signpost_lifecycle_timeouts_total");
    // The family is listed once a timeout has happened; its help is
    // always there, so that a renamed family cannot pass for no timeout.
    assert!(
        metrics.contains("signpost_lifecycle_timeouts"),
        "/metrics declares the lifecycle timeouts"
    );
    let signpost_timeouts = timeouts.iter().fold(0.0, |sum, (_, v)| sum + v);
    let HookActions {
        launches,
        terminations,
        cancelled_launches,
        expired_launches,
        expired_terminations,
    } = expired_at_aws(&cloud, &emulator, &initial).await;

    eprintln!("\nsoak summary (seed {seed}, {minutes} min)");
    eprintln!(
        "requests: {sent} sent ({:.0}/s), {failed} failed",
        sent as f64 / (ended - start).as_secs_f64()
    );
    for (reason, n) in load.reasons.lock().unwrap().iter() {
        eprintln!("  {n} × {reason}");
    }
    for first in load.first.lock().unwrap().iter() {
        eprintln!("  e.g. {first}");
    }
    eprintln!(
        "scale operations: {op} ({} not converged within {CONVERGE_WITHIN:?}; slowest {:.1} s); at the end: {}",
        not_converged.len(),
        slowest.as_secs_f64(),
        match &settled {
            Ok(took) => format!("settled in {:.1} s", took.as_secs_f64()),
            Err(seen) => format!("NOT settled: {seen}"),
        }
    );
    let injected = std::mem::take(&mut *injected.lock().unwrap());
    eprintln!("faults injected: {}", injected.len());
    for api in APIS {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for i in injected.iter().filter(|i| i.api == api) {
            *kinds.entry(&i.kind).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        eprintln!(
            "  {api}: {} calls, {} answered with a fault; {}",
            proxy.calls(api).len(),
            proxy.faulted(api),
            if kinds.is_empty() {
                "none".to_owned()
            } else {
                kinds.join(", ")
            }
        );
    }
    let show = |family: &str| {
        let all: Vec<String> = samples_of(&metrics, family)
            .into_iter()
            .map(|(labels, v)| format!("{labels} {v}"))
            .collect();
        match all.is_empty() {
            true => "none".to_owned(),
            false => all.join(", "),
        }
    };
    eprintln!(
        "lifecycle actions (signpost_lifecycle_actions_total): {}",
        show("signpost_lifecycle_actions_total")
    );
    eprintln!(
        "heartbeats: {}; events: {}",
        show("signpost_lifecycle_heartbeats_total"),
        show("signpost_events_total")
    );
    eprintln!(
        "lifecycle timeouts: {signpost_timeouts} of signpost's ({}); left to expire at AWS: {} of {launches} launches {expired_launches:?} ({cancelled_launches} more cancelled by a scale-in), {} of {terminations} terminations {expired_terminations:?}",
        show("signpost_lifecycle_timeouts_total"),
        expired_launches.len(),
        expired_terminations.len()
    );
    let warmed = start + warm_up;
    let mut grew = Vec::new();
    let processes: [(&str, Reading); 2] =
        [("controller", |s| s.controller), ("router", |s| s.router)];
    for (name, of) in processes {
        let Some(OverTime {
            first: (first, first_fds),
            last: (last, last_fds),
            max_rss,
        }) = over_time(&samples, warmed, of)
        else {
            grew.push(format!("{name}: no sample after warm-up (process gone?)"));
            continue;
        };
        let allowed = ((first as f64 * RSS_GROWTH) as u64).max(RSS_FLOOR_KB);
        eprintln!(
            "{name}: RSS {:.1} MiB first after warm-up, {:.1} last, {:.1} max (allowed {:.1}); fds {first_fds} first after warm-up, {last_fds} last",
            mib(first),
            mib(last),
            mib(max_rss),
            mib(first + allowed)
        );
        if last > first + allowed {
            grew.push(format!(
                "{name}: RSS {:.1} → {:.1} MiB after warm-up, more than {:.0}% or {} MiB",
                mib(first),
                mib(last),
                RSS_GROWTH * 100.0,
                RSS_FLOOR_KB / 1024
            ));
        }
    }

    assert_eq!(
        failed,
        0,
        "{failed} of {sent} requests failed: {:#?}",
        load.reasons.lock().unwrap()
    );
    assert!(
        signpost_timeouts == 0.0 && expired_launches.is_empty() && expired_terminations.is_empty(),
        "lifecycle timeouts: signpost's {timeouts:?}; expired at AWS: launches {expired_launches:?}, terminations {expired_terminations:?}"
    );
    assert!(
        not_converged.is_empty(),
        "scale operations not done within {CONVERGE_WITHIN:?}: {not_converged:#?}"
    );
    settled.expect("everything settled at the end");
    assert!(grew.is_empty(), "{grew:#?}");
}
