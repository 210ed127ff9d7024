//! Proxyless gRPC: a real grpcio client (tests/xds/grpc_fleet.py) with an
//! `xds:///echo` channel, resolved by the controller's xDS server, calling
//! real grpcio servers at the instances' addresses, which the controller
//! health-checks with the standard gRPC health protocol
//! (`signpost:health=grpc:<service>`). The group scales out and in with
//! lifecycle hooks under checked load: zero failed calls.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    free_port, wait_for, wait_in_service, Application, Cloud, Controller, Emulator, FollowedGroup,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The instances' gRPC port in this file's tests.
const PORT: u16 = 18580;
const GROUP: &str = "echo-grpc";

fn fleet_script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/xds/grpc_fleet.py")
}

fn python() -> std::path::PathBuf {
    common::xds_tool("python", "SIGNPOST_XDS_PYTHON")
}

/// The instances' applications: grpcio servers (`grpc_fleet.py servers`),
/// one per instance address, in one Python process driven on stdin.
struct GrpcServers {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    serving: BTreeMap<IpAddr, String>,
}

impl GrpcServers {
    fn start() -> GrpcServers {
        let mut child = Command::new(python())
            .arg(fleet_script())
            .arg("servers")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start grpc_fleet.py servers");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        GrpcServers {
            child,
            stdin,
            stdout,
            serving: BTreeMap::new(),
        }
    }

    /// Sends one command and waits for its answer line.
    async fn command(&mut self, line: String, expect: String) {
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no answer to {line:?} within 10s"))
            .unwrap();
        assert_eq!(answer.as_deref(), Some(expect.as_str()), "{line:?}");
    }
}

impl Application for GrpcServers {
    fn serving(&self) -> Vec<(String, IpAddr)> {
        let serving = self.serving.iter();
        serving.map(|(ip, id)| (id.clone(), *ip)).collect()
    }

    async fn start(&mut self, id: &str, ip: IpAddr) {
        self.command(format!("start {id} {ip} {PORT}\n"), format!("started {ip}"))
            .await;
        self.serving.insert(ip, id.into());
    }

    async fn stop(&mut self, ip: IpAddr) {
        self.command(format!("stop {ip}\n"), format!("stopped {ip}"))
            .await;
        self.serving.remove(&ip);
    }
}

impl Drop for GrpcServers {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// What the client has counted so far (its newest progress line).
#[derive(Clone, Default)]
struct Progress {
    by_instance: BTreeMap<String, u64>,
    last_failure: Option<String>,
}

/// A proxyless gRPC client (`grpc_fleet.py client`) calling `xds:///echo`
/// `per_second` times a second, with a bootstrap naming the controller's
/// xDS server and node `id`.
struct GrpcClient {
    id: String,
    child: Child,
    progress: Arc<Mutex<Progress>>,
    last: tokio::task::JoinHandle<Option<serde_json::Value>>,
}

impl GrpcClient {
    fn start(id: &str, xds_port: u16, per_second: u32) -> GrpcClient {
        let dir = std::env::temp_dir().join(format!("signpost-grpc-{id}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bootstrap = dir.join("bootstrap.json");
        // README's bootstrap for proxyless gRPC.
        std::fs::write(
            &bootstrap,
            serde_json::json!({
                "xds_servers": [{
                    "server_uri": format!("127.0.0.1:{xds_port}"),
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"]
                }],
                "node": {"id": id, "locality": {"zone": "us-east-1a"}}
            })
            .to_string(),
        )
        .unwrap();
        let mut child = Command::new(python())
            .arg(fleet_script())
            .args(["client", "xds:///echo", &per_second.to_string()])
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start grpc_fleet.py client");
        let progress = Arc::new(Mutex::new(Progress::default()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let last = tokio::spawn({
            let progress = progress.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
                    let by_instance = v["by_instance"].as_object().unwrap();
                    *progress.lock().unwrap() = Progress {
                        by_instance: by_instance
                            .iter()
                            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                            .collect(),
                        last_failure: v["last_failure"].as_str().map(str::to_owned),
                    };
                    if v["done"] == true {
                        return Some(v);
                    }
                }
                None
            }
        });
        GrpcClient {
            id: id.into(),
            child,
            progress,
            last,
        }
    }

    fn progress(&self) -> Progress {
        self.progress.lock().unwrap().clone()
    }

    /// Waits until every one of `instances` has answered at least once
    /// more than it had when the wait began.
    async fn wait_answered_by(&self, instances: &[String]) {
        let before = self.progress().by_instance;
        let count = |m: &BTreeMap<String, u64>, i: &String| m.get(i).copied().unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now = self.progress();
            if instances
                .iter()
                .all(|i| count(&now.by_instance, i) > count(&before, i))
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "calls from {} did not reach {instances:?} within 20s; answered by {:?}, last failure {:?}",
                self.id,
                now.by_instance,
                now.last_failure
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops calling, waits for the calls in flight; (sent, failures).
    async fn finish(mut self) -> (u64, Vec<String>) {
        drop(self.child.stdin.take());
        let last = tokio::time::timeout(Duration::from_secs(20), &mut self.last)
            .await
            .expect("the client's summary within 20s")
            .unwrap()
            .expect("a summary line");
        let failures = last["failures"].as_array().unwrap();
        let failures = failures.iter().map(|f| f.as_str().unwrap().to_owned());
        (last["sent"].as_u64().unwrap(), failures.collect())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_follows_scale_out_and_in_through_xds_with_zero_failed_calls() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    let tags = [
        ("signpost:service", "echo"),
        ("signpost:port", "18580"),
        ("signpost:health", "grpc:signpost.test.Echo"),
    ];
    cloud.create_group(GROUP, &tags, 2).await;
    common::hold_launches_and_terminations(&cloud, GROUP).await;
    let followed = FollowedGroup::start(&cloud, GROUP, GrpcServers::start());

    let xds_port = free_port();
    let toml = format!(
        "[lifecycle]\nrouter_grace = \"3s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"3s\"\n\
         [xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let controller = Controller::start_with_health(&emulator, &toml, "500ms", "400ms").await;
    let two = wait_in_service(&cloud, GROUP, 2, Duration::from_secs(30)).await;
    controller.wait_endpoints("echo", "healthy", &two).await;

    let client = GrpcClient::start("grpc-1", xds_port, 50);
    controller.wait_acked_by("grpc-1").await;
    client.wait_answered_by(&two).await;
    let record = controller.router_record("grpc-1").await.unwrap();
    assert_eq!(record["kind"], "grpc", "{record}");
    assert!(record["xds"]["last_nack"].is_null(), "{record}");

    cloud.set_desired(GROUP, 6).await;
    let six = wait_in_service(&cloud, GROUP, 6, Duration::from_secs(30)).await;
    controller.wait_endpoints("echo", "healthy", &six).await;
    client.wait_answered_by(&six).await;

    cloud.set_desired(GROUP, 2).await;
    let last_two = wait_in_service(&cloud, GROUP, 2, Duration::from_secs(30)).await;
    wait_for(
        "the four terminated instances' servers to stop",
        Duration::from_secs(30),
        || async { (followed.backends.lock().await.serving().len() == 2).then_some(()) },
    )
    .await;
    client.wait_answered_by(&last_two).await;

    let spread = client.progress().by_instance;
    let (sent, failures) = client.finish().await;
    eprintln!("{sent} calls through xds:///echo, spread {spread:?}");
    assert!(
        failures.is_empty(),
        "{} of {sent} calls failed: {failures:#?}",
        failures.len()
    );
    // Every launch went on with the client's ACK (a note says otherwise);
    // terminations end at drain_timeout, as a gRPC client reports no load.
    let (_, lifecycle) = controller.get("/v1/lifecycle").await;
    let recent = lifecycle["recent"].as_array().unwrap();
    let launches: Vec<_> = recent
        .iter()
        .filter(|a| a["transition"] == "launch")
        .collect();
    assert_eq!(launches.len(), 4, "{recent:#?}");
    for launch in launches {
        assert!(launch["note"].is_null(), "{launch:#}");
        assert_eq!(launch["result"], "continue", "{launch:#}");
    }
}
