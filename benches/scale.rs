//! Scale benchmark: an account's worth (1,000 / 5,000 / 10,000 instances,
//! 10,000 in 500 groups) against the real controller pieces, with the cost
//! of each measured. Run: `cargo bench --bench scale` (release build; about
//! 10 minutes). `ROUNDS=n` sets the resyncs per size (default 7);
//! `HEALTH=0` skips the health-check row, `THROTTLED=0` the throttled one.
//!
//! The account is `signpost_controller::sim` (feature `testing`): the real
//! listing's call pattern, each call taking an assumed in-region latency
//! (`sim::Latency::in_region`), the real call budget (20 calls/s) and 1 % of
//! the instances replaced a minute through launch and terminate hooks.
//! Between two resyncs the account moves on 30 s (the default
//! `resync_interval`). What runs against it is the real `Reconciler`
//! (`sync_once`: list, plan, mass-removal guard, registry apply) and, for
//! the health row, the real `HealthScheduler` with the real `NetProbe`
//! probing 10,000 HTTP listeners on 127.100.x.y, served by two child
//! processes of this binary.
//!
//! CPU is the process's own (getrusage), minus the simulated AWS's work of
//! reading its account for an answer (`SimAutoScaling::answering`); each
//! size runs in a process of its own so that its memory is its own. Not
//! included: the AWS SDK's HTTP and XML parsing of real answers.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_controller::cloud::CallCount;
use signpost_controller::config::{AwsConfig, HealthConfig};
use signpost_controller::guard::{GuardConfig, RemovalGuard};
use signpost_controller::health::{HealthScheduler, NetProbe};
use signpost_controller::model::{EndpointState, Snapshot};
use signpost_controller::reconcile::{plan, Reconciler, SyncStatus};
use signpost_controller::registry::Registry;
use signpost_controller::sim::{Calls, FleetSpec, Latency, SimAutoScaling, SimFleet, Throttle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

const RESYNC: Duration = Duration::from_secs(30);
/// Listings before the measured ones (45 minutes of churn).
const WARM_UP: usize = 90;
const PORT: u16 = 18_081;
/// Backends per child process: each holds a listener and a connection per
/// endpoint, under the machine's 20,000 open files.
const PER_BACKEND_PROCESS: usize = 5_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |at: usize| args[at].clone();
    if let Some(at) = args.iter().position(|a| a == "row") {
        let (n, groups) = (arg(at + 2).parse().unwrap(), arg(at + 3).parse().unwrap());
        match arg(at + 1).as_str() {
            "resync" => current_thread().block_on(resync_row(n, groups, None)),
            "throttled" => {
                let share = Throttle {
                    burst: 20.0,
                    per_second: 2.0,
                };
                current_thread().block_on(resync_row(n, groups, Some(share)))
            }
            _ => tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(health_row(n, groups)),
        }
        return;
    }
    if let Some(at) = args.iter().position(|a| a == "backends") {
        let first: u32 = arg(at + 1).parse().unwrap();
        let count: usize = arg(at + 2).parse().unwrap();
        current_thread().block_on(backends(first, count));
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("scale benchmark: run with `cargo bench --bench scale`");
        return;
    }
    let env_on = |name: &str| std::env::var(name).ok().is_none_or(|v| v != "0");
    println!("| instances | groups | AWS calls per resync (DASG + DI + DLH) | controller CPU per resync | wall time per resync | endpoints changed | RSS with the endpoints |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (n, groups) in [("1000", "50"), ("5000", "250"), ("10000", "500")] {
        child(&["row", "resync", n, groups]);
    }
    if env_on("THROTTLED") {
        child(&["row", "throttled", "10000", "500"]);
    }
    if env_on("HEALTH") {
        println!();
        println!("| health probing | endpoints | interval | controller CPU | RSS | sockets | OS threads |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        child(&["row", "health", "10000", "500"]);
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn child(args: &[&str]) {
    let me = std::env::current_exe().unwrap();
    let status = std::process::Command::new(me)
        .args(args)
        .status()
        .expect("run a row");
    assert!(status.success(), "row {args:?} failed");
}

fn rounds() -> usize {
    std::env::var("ROUNDS").map_or(7, |r| r.parse().unwrap())
}

/// One resync measured.
struct Sample {
    calls: CallCount,
    wall: Duration,
    cpu: Duration,
    changed: usize,
    /// `plan` alone on the same listing and registry, rerun afterwards.
    plan: Duration,
}

fn reconciler(cloud: Arc<SimAutoScaling>) -> (Reconciler<SimAutoScaling>, Arc<Registry>) {
    let registry = Arc::new(Registry::new());
    let reconciler = Reconciler {
        cloud,
        registry: registry.clone(),
        status: watch::Sender::new(SyncStatus::default()),
        fleet: watch::Sender::new(Arc::default()),
        resync_interval: RESYNC,
        trigger: Arc::new(Notify::new()),
        guard: Mutex::new(RemovalGuard::new(GuardConfig::default())),
    };
    (reconciler, registry)
}

fn sim(n: usize, groups: usize, throttle: Option<Throttle>) -> Arc<SimAutoScaling> {
    let fleet = SimFleet::new(FleetSpec::new(n, groups));
    let calls = Calls::new(Latency::in_region(), &AwsConfig::default(), throttle);
    Arc::new(SimAutoScaling::new(fleet, calls))
}

async fn sync(reconciler: &Reconciler<SimAutoScaling>, registry: &Registry) -> Option<Sample> {
    let before = registry.snapshot();
    let answering = reconciler.cloud.answering();
    let (cpu, wall) = (cpu_time(), Instant::now());
    let listed = reconciler.sync_once().await;
    let wall = wall.elapsed();
    // Saturating: the answering time is wall time (the simulated AWS's
    // sections run between awaits, on this thread), CPU has its own clock.
    let cpu = (cpu_time() - cpu).saturating_sub(reconciler.cloud.answering() - answering);
    listed.ok()?;
    let after = registry.snapshot();
    let fleet = reconciler.fleet.borrow().clone();
    let started = cpu_time();
    std::hint::black_box(plan(&fleet, &before));
    let plan_cpu = cpu_time() - started;
    Some(Sample {
        calls: reconciler.status.borrow().last_calls.expect("a listing"),
        wall,
        cpu,
        changed: changed(&before, &after),
        plan: plan_cpu,
    })
}

/// Endpoints added, removed or with a new state between two snapshots.
fn changed(before: &Snapshot, after: &Snapshot) -> usize {
    let flat = |s: &Snapshot| -> BTreeMap<(String, String), EndpointState> {
        s.services
            .values()
            .flat_map(|svc| {
                svc.endpoints
                    .values()
                    .map(|e| ((svc.name.clone(), e.instance_id.to_string()), e.state))
            })
            .collect()
    };
    let (a, b) = (flat(before), flat(after));
    let gone_or_moved = a.iter().filter(|(k, v)| b.get(*k) != Some(v)).count();
    gone_or_moved + b.keys().filter(|k| !a.contains_key(*k)).count()
}

/// The first listing; 45 simulated minutes of listings at no cost (their
/// most calls reported); then `ROUNDS` measured resyncs, each 30 s of
/// churn after the last, reported as medians.
async fn resync_row(n: usize, groups: usize, throttle: Option<Throttle>) {
    let cloud = sim(n, groups, throttle);
    let (reconciler, registry) = reconciler(cloud.clone());
    // Throttled, the first listing is made at no cost too: the row is
    // about resyncs once running.
    cloud.calls().set_free(throttle.is_some());
    let first = sync(&reconciler, &registry).await.expect("first listing");
    let label = if throttle.is_some() {
        " (throttled: 2 calls/s left)"
    } else {
        ""
    };
    // Steady state first: 45 simulated minutes of churn, listed every 30 s
    // at no cost, so that what has memory across listings (the instance
    // ids to expect, any cache) is as it would be in a long-running
    // controller.
    cloud.calls().set_free(true);
    let mut warm_up = CallCount::default();
    for _ in 0..WARM_UP {
        cloud.fleet().advance(RESYNC);
        let s = sync(&reconciler, &registry).await.expect("free listing");
        if s.calls.total() > warm_up.total() {
            warm_up = s.calls;
        }
    }
    cloud.calls().set_free(false);
    let rounds = if throttle.is_some() { 3 } else { rounds() };
    let mut samples = Vec::new();
    let mut failed = 0;
    for _ in 0..rounds {
        cloud.fleet().advance(RESYNC);
        match sync(&reconciler, &registry).await {
            Some(s) => samples.push(s),
            None => failed += 1,
        }
    }
    let endpoints: usize = registry
        .snapshot()
        .services
        .values()
        .map(|s| s.endpoints.len())
        .sum();
    let rss = status_field("VmRSS:") / 1024;
    let calls = |c: &CallCount| {
        format!(
            "{} ({} + {} + {})",
            c.total(),
            c.describe_auto_scaling_groups,
            c.describe_instances,
            c.describe_lifecycle_hooks
        )
    };
    println!(
        "| {n} | {groups} | first listing{label}: {} | {:.1} ms | {:.1} s | {} | |",
        calls(&first.calls),
        ms(first.cpu),
        first.wall.as_secs_f64(),
        first.changed
    );
    println!(
        "| {n} | {groups} | most in the next {} min{label}: {} | | | | |",
        WARM_UP / 2,
        calls(&warm_up)
    );
    if samples.is_empty() {
        println!("| {n} | {groups} | every resync{label} failed ({failed}) | | | | |");
        return;
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut by_total: Vec<&Sample> = samples.iter().collect();
    by_total.sort_by_key(|s| s.calls.total());
    let mid = by_total[by_total.len() / 2];
    let mut changed: Vec<usize> = samples.iter().map(|s| s.changed).collect();
    changed.sort();
    let totals: Vec<u32> = samples.iter().map(|s| s.calls.total()).collect();
    println!(
        "| {n} | {groups} | resync{label}, median of {} (all: {totals:?}{}): {} | {:.1} ms (plan {:.1} ms) | {:.1} s | {} | {rss} MiB ({endpoints} endpoints) |",
        samples.len(),
        if failed > 0 { format!("; {failed} failed") } else { String::new() },
        calls(&mid.calls),
        ms(median(samples.iter().map(|s| s.cpu).collect())),
        ms(median(samples.iter().map(|s| s.plan).collect())),
        median(samples.iter().map(|s| s.wall).collect()).as_secs_f64(),
        changed[changed.len() / 2],
    );
    if throttle.is_some() {
        let refused = cloud
            .calls()
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "| {n} | {groups} | attempts refused with Throttling over the run: {refused} | | | | |"
        );
    }
}

/// 10,000 endpoints health-checked every second over HTTP (GET /health,
/// kept alive) by the real scheduler and probe, the backends in child
/// processes; CPU over 20 s once every endpoint is healthy.
async fn health_row(n: usize, groups: usize) {
    let mut spec = FleetSpec::new(n, groups);
    spec.churn_per_minute = 0.0;
    spec.port = PORT;
    let first = u32::from(spec.first_address);
    let mut children = Vec::new();
    for start in (0..n).step_by(PER_BACKEND_PROCESS) {
        let count = PER_BACKEND_PROCESS.min(n - start);
        let me = std::env::current_exe().unwrap();
        let mut child = tokio::process::Command::new(me)
            .args([
                "backends",
                &(first + start as u32).to_string(),
                &count.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start backends");
        let mut ready = [0u8; 6];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .await
            .expect("backends ready");
        children.push(child);
    }
    let fleet = SimFleet::new(spec);
    let calls = Calls::new(Latency::zero(), &AwsConfig::default(), None);
    let cloud = Arc::new(SimAutoScaling::new(fleet, calls));
    let (reconciler, registry) = reconciler(cloud);
    reconciler.sync_once().await.expect("listing");
    let config = HealthConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(900),
        ..HealthConfig::default()
    };
    let stop = CancellationToken::new();
    let scheduler = HealthScheduler::new(NetProbe::default(), registry.clone(), config);
    let task = tokio::spawn(scheduler.run(stop.clone()));
    let started = Instant::now();
    let healthy = |s: &Snapshot| {
        s.services
            .values()
            .flat_map(|s| s.endpoints.values())
            .filter(|e| e.state == EndpointState::Healthy)
            .count()
    };
    while healthy(&registry.snapshot()) < n {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "only {} of {n} endpoints healthy after 180 s",
            healthy(&registry.snapshot())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let to_healthy = started.elapsed();
    let window = Duration::from_secs(20);
    let (cpu0, t0) = (cpu_time(), Instant::now());
    tokio::time::sleep(window).await;
    let cpu = (cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64() * 100.0;
    let sockets = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count();
    println!(
        "| HTTP GET /health, keep-alive (all healthy {:.0} s after the first listing) | {n} | 1 s | {cpu:.1} % of one core | {} MiB | {sockets} | {} |",
        to_healthy.as_secs_f64(),
        status_field("VmRSS:") / 1024,
        status_field("Threads:")
    );
    stop.cancel();
    let _ = task.await;
    // Killed and waited for: a next run binds the same addresses.
    for mut child in children {
        let _ = child.kill().await;
    }
}

/// `count` HTTP servers at consecutive addresses from `first`, each
/// answering every request `200 ok` on kept-alive connections. Says
/// `ready\n` once every listener is bound.
async fn backends(first: u32, count: usize) {
    for n in 0..count {
        let ip = IpAddr::from(Ipv4Addr::from(first + n as u32));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, PORT))
            .await
            .unwrap_or_else(|e| panic!("bind {ip}:{PORT}: {e}"));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let mut have = 0;
                    loop {
                        let Ok(read) = stream.read(&mut buf[have..]).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        have += read;
                        // One request head at a time (probes send no body).
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                            if stream.write_all(reply).await.is_err() {
                                return;
                            }
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                        }
                        if have == buf.len() {
                            return;
                        }
                    }
                });
            }
        });
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        out.write_all(b"ready\n").unwrap();
        out.flush().unwrap();
    }
    std::future::pending::<()>().await;
}

/// User and system CPU time of this process, all threads (getrusage).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A `kB` (or count) field of /proc/self/status.
fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
