//! Proxyless gRPC: a real grpcio client (tests/xds/grpc_fleet.py) with an
//! `xds:///echo` channel, resolved by the controller's xDS server, calling
//! real grpcio servers at the instances' addresses, which the controller
//! health-checks with the standard gRPC health protocol
//! (`signpost:health=grpc:<service>`). The group scales out and in with
//! lifecycle hooks under checked load: zero failed calls.
//!
//! The xDS listener has the harness's TLS and client CA (`common::Pki`), as
//! a deployed controller's would, and each client's bootstrap has
//! `channel_creds` `tls` (gRFC A65) with its own client certificate;
//! `SIGNPOST_TEST_PLAINTEXT=1` runs the suite with `insecure` creds on a
//! plain listener instead, except the mTLS test, which always has TLS.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pki::{Ca, Name, Pair};
use common::{
    free_port, wait_for, wait_in_service, Application, Cloud, Controller, Emulator, FollowedGroup,
    Pki,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The instances' gRPC port in this file's tests.
const PORT: u16 = 18580;
const GROUP: &str = "echo-grpc";

/// The instances' tags: service `echo`, checked over `grpc.health.v1`.
const TAGS: [(&str, &str); 3] = [
    ("signpost:service", "echo"),
    ("signpost:port", "18580"),
    ("signpost:health", "grpc:signpost.test.Echo"),
];

/// How a client's bootstrap reaches the xDS server (`channel_creds`).
enum XdsCreds {
    /// `{"type": "insecure"}`: plain gRPC.
    Insecure,
    /// `{"type": "tls"}` (gRFC A65): the controller verified against `ca`,
    /// and `client`'s certificate and key presented, if any.
    Tls { ca: PathBuf, client: Option<Pair> },
}

impl XdsCreds {
    /// The harness's: its CA and the client certificate naming `id`, or
    /// plain with `SIGNPOST_TEST_PLAINTEXT`.
    fn harness(id: &str) -> XdsCreds {
        if Pki::plaintext() {
            return XdsCreds::Insecure;
        }
        let pki = Pki::get();
        let pair = pki.client(id);
        XdsCreds::Tls {
            ca: pki.ca_cert().into(),
            client: Some(Pair {
                cert: pair.cert.clone(),
                key: pair.key.clone(),
            }),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            XdsCreds::Insecure => serde_json::json!([{"type": "insecure"}]),
            XdsCreds::Tls { ca, client } => {
                let mut config = serde_json::json!({"ca_certificate_file": ca});
                if let Some(pair) = client {
                    config["certificate_file"] = serde_json::json!(pair.cert);
                    config["private_key_file"] = serde_json::json!(pair.key);
                }
                serde_json::json!([{"type": "tls", "config": config}])
            }
        }
    }
}

/// A controller serving xDS on `xds_port`, with `lifecycle` settings: with
/// the harness's TLS and client CA on the API and xDS listeners, unless
/// `SIGNPOST_TEST_PLAINTEXT` is set.
async fn start_controller(emulator: &Emulator, lifecycle: &str, xds_port: u16) -> Controller {
    let toml = format!(
        "{lifecycle}[xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{}\"\n",
        free_port()
    );
    Controller::start_xds_with_health(emulator, &toml, "500ms", "400ms").await
}

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
    ok: u64,
    failed: u64,
    by_instance: BTreeMap<String, u64>,
    last_failure: Option<String>,
}

/// A proxyless gRPC client (`grpc_fleet.py client`) calling `xds:///echo`
/// `per_second` times a second, with a bootstrap naming the controller's
/// xDS server, its `channel_creds` and node `id`.
struct GrpcClient {
    id: String,
    child: Child,
    progress: Arc<Mutex<Progress>>,
    last: tokio::task::JoinHandle<Option<serde_json::Value>>,
}

impl GrpcClient {
    fn start(id: &str, xds_port: u16, per_second: u32, creds: &XdsCreds) -> GrpcClient {
        let dir = std::env::temp_dir().join(format!("signpost-grpc-{id}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bootstrap = dir.join("bootstrap.json");
        // README's bootstrap for proxyless gRPC.
        std::fs::write(
            &bootstrap,
            serde_json::json!({
                "xds_servers": [{
                    "server_uri": format!("127.0.0.1:{xds_port}"),
                    "channel_creds": creds.json(),
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
                        ok: v["ok"].as_u64().unwrap(),
                        failed: v["failed"].as_u64().unwrap(),
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

    /// Waits until at least `n` calls have failed and returns the last
    /// failure, as grpcio reported it; panics if any call succeeded.
    async fn wait_failed(&self, n: u64) -> String {
        let what = format!("{n} failed calls from {}", self.id);
        let failure = wait_for(&what, Duration::from_secs(30), || async {
            let now = self.progress();
            (now.failed >= n).then_some(now.last_failure)
        })
        .await;
        self.assert_never_answered();
        failure.expect("a failure")
    }

    fn assert_never_answered(&self) {
        let now = self.progress();
        assert_eq!(
            now.ok, 0,
            "{} was answered: {:?} (last failure {:?})",
            self.id, now.by_instance, now.last_failure
        );
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
    cloud.create_group(GROUP, &TAGS, 2).await;
    common::hold_launches_and_terminations(&cloud, GROUP).await;
    let followed = FollowedGroup::start(&cloud, GROUP, GrpcServers::start());

    let xds_port = free_port();
    let lifecycle =
        "[lifecycle]\nrouter_grace = \"3s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"3s\"\n";
    let controller = start_controller(&emulator, lifecycle, xds_port).await;
    let two = wait_in_service(&cloud, GROUP, 2, Duration::from_secs(30)).await;
    controller.wait_endpoints("echo", "healthy", &two).await;

    let client = GrpcClient::start("grpc-1", xds_port, 50, &XdsCreds::harness("grpc-1"));
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

/// The xDS listener over mTLS (the harness's certificate and client CA): a
/// grpcio client whose bootstrap has `channel_creds` `tls` with a client
/// certificate naming its `node.id` resolves `xds:///echo` and its calls
/// reach the instances. Refused, each seen from a real grpcio client whose
/// calls all fail and which is never listed (so it can neither hold nor
/// release a hook): a certificate naming another id (PERMISSION_DENIED,
/// `not_itself`), no certificate (UNAUTHENTICATED, `no_credentials`), a
/// certificate of another CA (the handshake fails), and a client that
/// trusts another CA than the controller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_a_grpc_client_is_served_only_as_the_node_its_certificate_names() {
    let emulator = Emulator::start().await;
    let cloud = Cloud::new(&emulator).await;
    cloud.create_group("echo-mtls", &TAGS, 2).await;
    let _followed = FollowedGroup::start(&cloud, "echo-mtls", GrpcServers::start());
    let xds_port = free_port();
    let toml = format!(
        "[xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{}\"\n",
        free_port()
    );
    // TLS even with SIGNPOST_TEST_PLAINTEXT: this test is about TLS.
    let controller = Controller::start_mtls_with_health(&emulator, &toml, "500ms", "400ms").await;
    let two = wait_in_service(&cloud, "echo-mtls", 2, Duration::from_secs(30)).await;
    controller.wait_endpoints("echo", "healthy", &two).await;

    let pki = Pki::get();
    let ca = || PathBuf::from(pki.ca_cert());
    let issued = |id: &str| {
        let pair = pki.client(id);
        Some(Pair {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        })
    };
    let served = XdsCreds::Tls {
        ca: ca(),
        client: issued("grpc-mtls"),
    };
    let client = GrpcClient::start("grpc-mtls", xds_port, 20, &served);
    controller.wait_acked_by("grpc-mtls").await;
    client.wait_answered_by(&two).await;
    let record = controller.router_record("grpc-mtls").await.unwrap();
    assert_eq!(record["kind"], "grpc", "{record}");
    // The identity its certificate proved, as a signpost router's is shown.
    assert_eq!(record["identity"], "grpc-mtls", "{record}");

    let refusals = |reason: &str| format!("signpost_auth_refusals_total{{reason=\"{reason}\"}}");
    let count = |reason: String| {
        let controller = &controller;
        async move { controller.metric(&reason).await.unwrap_or(0.0) }
    };

    // A certificate for another id than node.id.
    let not_itself = count(refusals("not_itself")).await;
    let liar = XdsCreds::Tls {
        ca: ca(),
        client: issued("grpc-other"),
    };
    let liar = GrpcClient::start("grpc-liar", xds_port, 5, &liar);
    wait_for(
        "the controller to refuse grpc-liar's stream (not_itself)",
        Duration::from_secs(20),
        || async { (count(refusals("not_itself")).await > not_itself).then_some(()) },
    )
    .await;
    let failure = liar.wait_failed(5).await;
    eprintln!("grpc-liar (certificate for grpc-other) sees: {failure}");
    assert!(
        failure.contains("PERMISSION_DENIED")
            && failure.contains("\"grpc-liar\"")
            && failure.contains("\"grpc-other\""),
        "{failure}"
    );

    // TLS without a client certificate (and no token).
    let no_credentials = count(refusals("no_credentials")).await;
    let anonymous = XdsCreds::Tls {
        ca: ca(),
        client: None,
    };
    let anonymous = GrpcClient::start("grpc-anonymous", xds_port, 5, &anonymous);
    wait_for(
        "the controller to refuse grpc-anonymous's stream (no_credentials)",
        Duration::from_secs(20),
        || async { (count(refusals("no_credentials")).await > no_credentials).then_some(()) },
    )
    .await;
    let failure = anonymous.wait_failed(5).await;
    eprintln!("grpc-anonymous (no client certificate) sees: {failure}");
    assert!(failure.contains("UNAUTHENTICATED"), "{failure}");

    // A client certificate from another CA, naming node.id: the handshake
    // fails, before any stream.
    let elsewhere = Ca::new(&pki.ca().dir.join("elsewhere"), "elsewhere");
    let stranger = XdsCreds::Tls {
        ca: ca(),
        client: Some(elsewhere.client("grpc-stranger", Name::Cn("grpc-stranger"))),
    };
    let stranger = GrpcClient::start("grpc-stranger", xds_port, 5, &stranger);
    let failure = stranger.wait_failed(5).await;
    eprintln!("grpc-stranger (certificate of another CA) sees: {failure}");
    // With TLS 1.3 the client's side of the handshake is done before the
    // controller checks its certificate: it sees the alert as a failed
    // connection, never a stream.
    assert!(
        failure.contains("UNAVAILABLE") && failure.contains("failed to connect to all addresses"),
        "{failure}"
    );

    // A client that trusts another CA: it refuses the controller.
    let doubter = XdsCreds::Tls {
        ca: elsewhere.cert.clone(),
        client: issued("grpc-doubter"),
    };
    let doubter = GrpcClient::start("grpc-doubter", xds_port, 5, &doubter);
    let failure = doubter.wait_failed(5).await;
    eprintln!("grpc-doubter (trusts another CA) sees: {failure}");
    assert!(failure.contains("CERTIFICATE_VERIFY_FAILED"), "{failure}");

    // None was ever answered or listed, so none could hold or release a
    // hook; the served client was answered throughout.
    for refused in [&liar, &anonymous, &stranger, &doubter] {
        refused.assert_never_answered();
        assert!(
            controller.router_record(&refused.id).await.is_none(),
            "{} was listed",
            refused.id
        );
    }
    client.wait_answered_by(&two).await;
    let (sent, failures) = client.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}
