//! Discovery benchmark: resync wall time and AWS calls for 100 and 1,000
//! instances on the emulator, and the controller's CPU for health-probing
//! 1,000 endpoints every second. Run: `cargo bench --bench discovery`.
//!
//! Everything is real: moto, one HTTP backend per instance at its own
//! 127.42.x.y address, and the release `signpost` binary. CPU is read from
//! /proc for the controller process only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{wait_for, Backends, Cloud, Controller, Emulator};

const PORT: u16 = common::BACKEND_PORT;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("discovery benchmark: run with `cargo bench --bench discovery`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    println!("| instances | resync wall time p50 | max | AWS calls per resync |");
    println!("|---:|---:|---:|---:|");
    for n in [100, 1000] {
        resync(n).await;
    }
    println!();
    probe_cpu(1000).await;
}

/// Starts moto with one tagged group of `n` instances and the controller,
/// and reads the controller's own account of its last 10 resyncs.
async fn resync(n: i32) {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new_wide(&emulator).await;
    create_fleet(&cloud, n).await;
    let controller = Controller::start(&emulator, "").await;
    let mut durations = Vec::new();
    let mut calls = 0;
    let mut last = String::new();
    while durations.len() < 10 {
        let sync = wait_for("a new resync", Duration::from_secs(60), || async {
            let (_, body) = controller.get("/readyz").await;
            let sync = body["sync"].clone();
            let at = sync["last_success"].as_str().unwrap_or_default().to_owned();
            (!at.is_empty() && at != last && sync["instances"] == n).then_some((at, sync))
        })
        .await;
        last = sync.0;
        durations.push(sync.1["last_duration_ms"].as_u64().unwrap());
        let c = &sync.1["last_calls"];
        calls = c["describe_auto_scaling_groups"].as_u64().unwrap()
            + c["describe_instances"].as_u64().unwrap();
    }
    durations.sort();
    println!(
        "| {n} | {} ms | {} ms | {calls} |",
        durations[durations.len() / 2],
        durations[durations.len() - 1]
    );
}

/// Groups of at most 100 instances (as fleets are usually split), all in the
/// bench's wide subnet.
async fn create_fleet(cloud: &Cloud, n: i32) -> Vec<(String, std::net::IpAddr)> {
    let mut all = Vec::new();
    let mut left = n;
    let mut g = 0;
    while left > 0 {
        let size = left.min(100);
        let name = format!("svc-{g}");
        cloud
            .create_group(
                &name,
                &[("signpost:service", "bench"), ("signpost:port", "18080")],
                size,
            )
            .await;
        all.extend(cloud.instances(&name).await);
        left -= size;
        g += 1;
    }
    all
}

async fn probe_cpu(n: i32) {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new_wide(&emulator).await;
    let instances = create_fleet(&cloud, n).await;
    let mut backends = Backends::new(PORT);
    backends.follow(&instances).await;
    let controller = Controller::start_with_health(&emulator, "", "1s", "500ms").await;
    wait_for(
        "all endpoints healthy",
        Duration::from_secs(120),
        || async {
            let (_, body) = controller.get("/v1/services/bench").await;
            (body["healthy"] == n).then_some(())
        },
    )
    .await;
    let pid = controller.pid();
    let window = Duration::from_secs(20);
    let (cpu0, t0) = (cpu_ticks(pid), std::time::Instant::now());
    tokio::time::sleep(window).await;
    let (cpu1, elapsed) = (cpu_ticks(pid), t0.elapsed());
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu = (cpu1 - cpu0) as f64 / ticks_per_sec / elapsed.as_secs_f64() * 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
            .unwrap()
    };
    println!("| health probing | endpoints | interval | controller CPU | RSS | OS threads |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| HTTP GET /health, keep-alive | {n} | 1 s | {cpu:.1} % of one core | {} MiB | {} |",
        field("VmRSS:").parse::<u64>().unwrap() / 1024,
        field("Threads:")
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}
