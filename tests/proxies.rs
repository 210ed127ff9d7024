//! Real HAProxy and nginx (Debian's `haproxy` and `nginx-light`, installed
//! by tests/proxies/env.sh), each driven by its signpost agent, against the
//! emulator with real backends at the instances' addresses: routing by
//! prefix, lifecycle hooks that wait for the agents' acks and requests in
//! flight, a proxy reloaded under load, and the agents' errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::{
    completed, free_port, in_state, wait_for, wait_in_service, Controller, FollowedGroup, Load,
    Scene,
};
use tokio::process::{Child, Command};

/// Backend port for this file's tests.
const PORT: u16 = 18580;

const LIFECYCLE: &str =
    "[lifecycle]\nrouter_grace = \"3s\"\nlaunch_timeout = \"30s\"\ndrain_timeout = \"20s\"\n";

/// As in tests/lifecycle.rs: checks a loaded 2-core machine passes.
const HEALTH: (&str, &str) = ("500ms", "400ms");

/// The load tests run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Haproxy,
    Nginx,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }

    /// The proxy's executable: `SIGNPOST_HAPROXY` / `SIGNPOST_NGINX`
    /// (tests/run.sh sets them), or installed by tests/proxies/env.sh.
    fn bin(self) -> PathBuf {
        let var = format!("SIGNPOST_{}", self.name().to_uppercase());
        if let Ok(path) = std::env::var(var) {
            return path.into();
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/proxies/env.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(self.name())
            .output()
            .expect("run tests/proxies/env.sh");
        assert!(
            out.status.success(),
            "tests/proxies/env.sh {} failed: {}",
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().into()
    }
}

/// A proxy and its agent, each a child process with its files in `dir`.
struct Fronted {
    kind: Kind,
    id: String,
    dir: PathBuf,
    /// Where the proxy takes requests.
    port: u16,
    proxy: Option<Child>,
    agent: Child,
    agent_admin: u16,
}

impl Fronted {
    /// Starts the agent first (the proxy's config includes the files it
    /// writes), waits for its files, then the proxy.
    async fn start(kind: Kind, controller: &Controller, id: &str, extra: &[&str]) -> Fronted {
        let mut fronted = Fronted::start_agent(kind, controller, id, extra).await;
        fronted.start_proxy().await;
        fronted
    }

    /// The agent alone, once it has written the proxy's files.
    async fn start_agent(kind: Kind, controller: &Controller, id: &str, extra: &[&str]) -> Fronted {
        let dir = std::env::temp_dir().join(format!("signpost-{id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let agent_admin = free_port();
        let path = |name: &str| dir.join(name).display().to_string();
        let mut args = vec![
            kind.name().to_owned(),
            "--controller".into(),
            controller.url(""),
            "--id".into(),
            id.into(),
            "--admin-listen".into(),
            format!("127.0.0.1:{agent_admin}"),
            "--cache".into(),
            path("cache.json"),
        ];
        args.extend(common::Pki::router_args(&controller.url(""), id));
        let first_file = match kind {
            Kind::Haproxy => {
                std::fs::write(dir.join("haproxy.cfg"), haproxy_cfg(&dir, port)).unwrap();
                args.extend([
                    "--socket".into(),
                    path("admin.sock"),
                    "--map".into(),
                    path("haproxy.map"),
                    "--backends".into(),
                    path("backends.cfg"),
                ]);
                dir.join("backends.cfg")
            }
            Kind::Nginx => {
                std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, port)).unwrap();
                args.extend([
                    "--nginx".into(),
                    kind.bin().display().to_string(),
                    "--conf".into(),
                    path("nginx.conf"),
                    "--pid-file".into(),
                    path("nginx.pid"),
                    "--upstreams".into(),
                    path("upstreams.conf"),
                    "--locations".into(),
                    path("locations.conf"),
                ]);
                dir.join("locations.conf")
            }
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = Command::new(env!("CARGO_BIN_EXE_signpost"))
            .args(&args)
            .env(
                "SIGNPOST_LOG",
                std::env::var("SIGNPOST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start the agent");
        let fronted = Fronted {
            kind,
            id: id.into(),
            dir,
            port,
            proxy: None,
            agent,
            agent_admin,
        };
        wait_for(
            "the agent to write the proxy's files",
            Duration::from_secs(20),
            || async { first_file.exists().then_some(()) },
        )
        .await;
        fronted
    }

    async fn start_proxy(&mut self) {
        let dir = &self.dir;
        let mut command = Command::new(self.kind.bin());
        match self.kind {
            // Master-worker in the foreground: SIGUSR2 reloads.
            Kind::Haproxy => command
                .args(["-W", "-db", "-f"])
                .arg(dir.join("haproxy.cfg"))
                .arg("-f")
                .arg(dir.join("backends.cfg")),
            Kind::Nginx => command.arg("-c").arg(dir.join("nginx.conf")),
        };
        let log = std::fs::File::create(dir.join(format!("{}.log", self.kind.name()))).unwrap();
        self.proxy = Some(
            command
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("start the proxy"),
        );
        let url = self.url("/");
        wait_for("the proxy to listen", Duration::from_secs(10), || async {
            common::http_get(&url).await.ok().map(|_| ())
        })
        .await;
    }

    /// HAProxy: SIGUSR2 to the master, which starts a worker on the config
    /// files as they are now; the old one finishes its connections.
    fn reload_haproxy(&self) {
        assert_eq!(self.kind, Kind::Haproxy);
        let pid = self.proxy.as_ref().unwrap().id().unwrap();
        let ok = std::process::Command::new("kill")
            .args(["-USR2", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Stops the proxy at once (SIGKILL to the master, and so its workers'
    /// listeners close with it), as a crash would.
    async fn stop_proxy(&mut self) {
        let mut proxy = self.proxy.take().expect("proxy running");
        kill_tree(&proxy);
        let _ = proxy.wait().await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let (status, body) = common::http_get(&self.url(path))
            .await
            .unwrap_or_else(|e| panic!("GET {path} through {:?}: {e}", self.kind));
        (status, String::from_utf8_lossy(&body).trim().to_owned())
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let url = format!("http://127.0.0.1:{}/readyz", self.agent_admin);
        let (status, body) = common::http_get(&url).await.expect("agent admin answers");
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn wait_ready(&self) -> serde_json::Value {
        wait_for(
            &format!("agent {} to be ready", self.id),
            Duration::from_secs(20),
            || async {
                let (status, body) = self.readyz().await;
                (status == 200).then_some(body)
            },
        )
        .await
    }

    fn log(&self) -> String {
        let agent = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let proxy = std::fs::read_to_string(self.dir.join(format!("{}.log", self.kind.name())))
            .unwrap_or_default();
        format!("agent:\n{agent}\nproxy:\n{proxy}")
    }
}

impl Drop for Fronted {
    fn drop(&mut self) {
        if let Some(proxy) = &self.proxy {
            kill_tree(proxy);
        }
        let _ = self.agent.start_kill();
    }
}

/// SIGKILL to a proxy's master and then to its workers, which outlive it
/// (and which it would restart were they killed first).
fn kill_tree(master: &Child) {
    let Some(pid) = master.id() else { return };
    let workers = std::process::Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in std::iter::once(pid.to_string()).chain(workers.split_whitespace().map(String::from))
    {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
    }
}

/// The HAProxy config README shows, on test paths: the agent's map picks
/// the backend, the agent's backends file (`-f`) holds the servers.
fn haproxy_cfg(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "global
    stats socket {dir}/admin.sock mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    balance leastconn
    # On a reload, the old process answers one more request on each idle
    # client connection (with Connection: close) instead of closing it
    # under a request that is on its way.
    option idle-close-on-response

frontend signpost
    bind 127.0.0.1:{port}
    use_backend %[path,concat(/),map_beg({dir}/haproxy.map)]
"
    )
}

/// The nginx config README shows, on test paths.
fn nginx_conf(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_shutdown_timeout 30s;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    # No retry on another endpoint: a request sent to a dead one fails, so
    # the tests see every mistake of the agent's.
    proxy_next_upstream off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    # The operator's own includes (a test breaks one).
    include {dir}/operator*.conf;
    include {dir}/upstreams.conf;

    server {{
        listen 127.0.0.1:{port};
        # A reload closes old workers' idle client connections; a request
        # racing that close fails unless its client retries (README).
        keepalive_timeout 0;
        include {dir}/locations.conf;
    }}
}}
"
    )
}

fn tags<'a>(service: &'a str, route: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("signpost:service", service),
        ("signpost:port", "18580"),
        ("signpost:route", route),
    ]
}

/// A scale-in holds the terminate hook while a request is in flight
/// through the proxy, and CONTINUEs only after it was answered; nothing
/// reaches the instance after the agent's ack.
async fn scale_in_waits_for_the_request_in_flight(kind: Kind) {
    let group = format!("{}-drain", kind.name());
    let scene =
        Scene::start_with_health(PORT, &group, &tags("web", "/"), 1, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        instances,
    } = scene;
    cloud
        .put_hook(&group, "signpost-terminate", "terminating", 300, "CONTINUE")
        .await;
    let fronted = Fronted::start(kind, &controller, &format!("{}-drain", kind.name()), &[]).await;
    fronted.wait_ready().await;
    controller.wait_acked_by(&fronted.id).await;
    let (id, ip) = instances[0].clone();
    let followed = FollowedGroup::start(&cloud, &group, backends);

    let slow = tokio::spawn({
        let url = fronted.url("/slow/4000");
        async move {
            let answer = common::http_get(&url).await;
            (answer, SystemTime::now())
        }
    });
    // Only leaving endpoints' requests are reported: let the request reach
    // the backend, then scale in.
    wait_for(
        "the request to reach the backend",
        Duration::from_secs(5),
        || async { (followed.backends.lock().await.hits(ip) > 0).then_some(()) },
    )
    .await;
    cloud.set_desired(&group, 0).await;
    controller
        .wait_endpoints("web", "draining", std::slice::from_ref(&id))
        .await;
    controller.wait_acked_by(&fronted.id).await;
    let hits_at_ack = followed.backends.lock().await.hits(ip);
    let record = controller.router_record(&fronted.id).await.unwrap();
    assert_eq!(record["kind"], kind.name(), "{record}");
    assert_eq!(
        record["in_flight"]["web"][&id].as_u64(),
        Some(1),
        "the agent reports the request in flight: {record}\n{}",
        fronted.log()
    );
    assert_eq!(
        in_state(&cloud, &group, "Terminating:Wait").await,
        vec![id.clone()],
        "held while its request is in flight through {kind:?}"
    );
    let (status, body) = fronted.get("/").await;
    assert!(
        status == 503 || status == 502,
        "a draining endpoint gets no new request: {status} {body}"
    );

    let (answer, answered_at) = slow.await.unwrap();
    let (status, body) = answer.expect("the slow request is answered");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).trim()),
        (200, format!("instance={id}").as_str())
    );
    let record = wait_for(
        "the terminate action to complete",
        Duration::from_secs(30),
        || completed(&controller, &id),
    )
    .await;
    assert_eq!(record["result"], "continue", "{record}");
    assert!(record["note"].is_null(), "no timeout: {record}");
    let since = humantime::parse_rfc3339(record["since"].as_str().unwrap()).unwrap();
    let completed_at = since + Duration::from_millis(record["completed_ms"].as_u64().unwrap());
    assert!(
        completed_at >= answered_at,
        "CONTINUE only after the request in flight through {kind:?} was answered"
    );
    wait_in_service(&cloud, &group, 0, Duration::from_secs(10)).await;
    assert_eq!(
        followed.backends.lock().await.hits(ip),
        hits_at_ack,
        "no request after the ack"
    );
}

/// Cycles the group 2 → 6 → 2 `cycles` times under load through the proxy
/// and returns (requests sent, failures).
async fn cycle_under_load(kind: Kind, cycles: usize) -> (usize, Vec<String>) {
    let _alone = HEAVY.lock().await;
    let group = format!("{}-cycle", kind.name());
    let scene =
        Scene::start_with_health(PORT, &group, &tags("web", "/"), 2, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    common::hold_launches_and_terminations(&cloud, &group).await;
    let fronted = Fronted::start(kind, &controller, &group, &[]).await;
    fronted.wait_ready().await;
    controller.wait_acked_by(&fronted.id).await;
    let _followed = FollowedGroup::start(&cloud, &group, backends);
    let load = Load::start(fronted.url("/"), 100);
    let started = std::time::Instant::now();
    common::cycle_2_6_2(&cloud, &controller, &group, "web", cycles).await;
    let (sent, failures) = load.finish().await;
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{group}: {sent} requests through {kind:?} at {rate:.0}/s, {} failed",
        failures.len()
    );
    assert!(rate >= 50.0, "at least 50 requests/s: {rate:.0}/s");
    common::lifecycle_settled(&controller, &group).await;
    if !failures.is_empty() {
        eprintln!("{}", fronted.log());
    }
    (sent, failures)
}

async fn zero_failed(kind: Kind, cycles: usize) {
    let (sent, failures) = cycle_under_load(kind, cycles).await;
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_through_haproxy_while_the_group_cycles_2_6_2_five_times() {
    zero_failed(Kind::Haproxy, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_through_haproxy_waits_for_the_request_in_flight() {
    scale_in_waits_for_the_request_in_flight(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_failed_requests_through_nginx_while_the_group_cycles_2_6_2_five_times() {
    zero_failed(Kind::Nginx, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_through_nginx_waits_for_the_request_in_flight() {
    scale_in_waits_for_the_request_in_flight(Kind::Nginx).await;
}

/// Sets the `signpost:route` tag of `group`.
async fn set_route(cloud: &common::Cloud, group: &str, route: &str) {
    let tag = aws_sdk_autoscaling::types::Tag::builder()
        .resource_id(group)
        .resource_type("auto-scaling-group")
        .key("signpost:route")
        .value(route)
        .propagate_at_launch(false)
        .build();
    cloud
        .autoscaling
        .create_or_update_tags()
        .tags(tag)
        .send()
        .await
        .unwrap();
}

/// A group of one instance for `service` at `route`, its backend started;
/// returns what the instance answers.
async fn one_more_service(
    cloud: &common::Cloud,
    controller: &Controller,
    backends: &mut common::Backends,
    group: &str,
    service: &str,
    route: &str,
) -> String {
    cloud.create_group(group, &tags(service, route), 1).await;
    let instances = cloud.instances(group).await;
    backends
        .follow(&[backends.serving(), instances.clone()].concat())
        .await;
    controller
        .wait_endpoints(service, "healthy", &common::ids(&instances))
        .await;
    format!("instance={}", instances[0].0)
}

/// Two services by prefix (whole segments, longest prefix wins), a third
/// added at run time under the first's prefix, then its route moved.
async fn routes_by_whole_segment_prefix(kind: Kind) {
    let name = kind.name();
    let users_group = format!("{name}-users");
    let scene = Scene::start_with_health(
        PORT,
        &users_group,
        &tags("users", "/users"),
        1,
        "resync_interval = \"1s\"\n",
        HEALTH,
    )
    .await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends: _users_backends,
        controller,
        instances: users,
    } = scene;
    let mut more = common::Backends::new(PORT);
    let web = one_more_service(
        &cloud,
        &controller,
        &mut more,
        &format!("{name}-web"),
        "web",
        "/",
    )
    .await;
    let fronted = Fronted::start(kind, &controller, &format!("{name}-routes"), &[]).await;
    fronted.wait_ready().await;
    controller.wait_acked_by(&fronted.id).await;
    let users = format!("instance={}", users[0].0);
    for (path, want) in [
        ("/users", &users),
        ("/users/42", &users),
        ("/usersx", &web),
        ("/", &web),
        ("/other/users", &web),
    ] {
        assert_eq!(&fronted.get(path).await, &(200, want.clone()), "{path}");
    }

    let admin_group = format!("{name}-admin");
    let admin = one_more_service(
        &cloud,
        &controller,
        &mut more,
        &admin_group,
        "admin",
        "/users/admin",
    )
    .await;
    if kind == Kind::Haproxy {
        // A new service is a new backend, which HAProxy takes only from
        // its config: the agent says so until HAProxy is reloaded.
        let error = wait_for(
            "the agent to say HAProxy lacks the new backend",
            Duration::from_secs(20),
            || async {
                let (status, body) = fronted.readyz().await;
                (status == 503).then(|| body["error"].as_str().map(String::from))?
            },
        )
        .await;
        assert!(
            error.contains("signpost_admin") && error.contains("reload HAProxy"),
            "{error}"
        );
        fronted.reload_haproxy();
    }
    fronted.wait_ready().await;
    controller.wait_acked_by(&fronted.id).await;
    for (path, want) in [
        ("/users/admin", &admin),
        ("/users/admin/1", &admin),
        ("/users/adminx", &users),
        ("/users/1", &users),
    ] {
        assert_eq!(&fronted.get(path).await, &(200, want.clone()), "{path}");
    }

    // The route moves: /users/admin goes, /admin comes; no reload.
    set_route(&cloud, &admin_group, "/admin").await;
    wait_for("/admin to reach admin", Duration::from_secs(20), || async {
        (fronted.get("/admin/1").await == (200, admin.clone())).then_some(())
    })
    .await;
    // One answer from the new configuration is not all of them: an nginx
    // worker of the old one may accept a connection until it has begun to
    // shut down, which is what the agent waits for before it acks.
    controller.wait_acked_by(&fronted.id).await;
    assert_eq!(fronted.get("/users/admin/1").await, (200, users.clone()));
    assert_eq!(fronted.get("/adminx").await, (200, web.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_routes_by_whole_segment_prefix_and_takes_route_changes_without_reload() {
    routes_by_whole_segment_prefix(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_routes_by_whole_segment_prefix_and_takes_route_changes() {
    routes_by_whole_segment_prefix(Kind::Nginx).await;
}

/// Without HAProxy's admin socket the agent says so in /readyz and acks
/// nothing; once HAProxy runs it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_agent_without_the_admin_socket_says_so_and_acks_nothing() {
    let scene =
        Scene::start_with_health(PORT, "haproxy-nosocket", &tags("web", "/"), 1, "", HEALTH).await;
    let mut fronted =
        Fronted::start_agent(Kind::Haproxy, &scene.controller, "haproxy-nosocket", &[]).await;
    let socket = fronted.dir.join("admin.sock").display().to_string();
    let (status, body) = wait_for(
        "the agent to report the socket",
        Duration::from_secs(10),
        || async {
            let (status, body) = fronted.readyz().await;
            body["error"].is_string().then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("admin socket") && error.contains(&socket),
        "{error}"
    );
    assert!(
        body["revision"].is_null() && body["desired_revision"].is_u64(),
        "{body}"
    );
    let record = scene
        .controller
        .router_record("haproxy-nosocket")
        .await
        .unwrap();
    assert_eq!(record["connected"], true, "{record}");
    assert!(
        record["acked_revision"].is_null(),
        "nothing acked: {record}"
    );

    fronted.start_proxy().await;
    fronted.wait_ready().await;
    scene.controller.wait_acked_by("haproxy-nosocket").await;
    let id = &scene.instances[0].0;
    assert_eq!(fronted.get("/").await, (200, format!("instance={id}")));
}

/// An operator's broken include fails `nginx -t`: the agent puts its last
/// good files back, says why in /readyz, acks nothing new, and nginx keeps
/// routing; once the include is fixed the change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_config_test_failing_keeps_the_last_good_files_and_acks_nothing() {
    let scene =
        Scene::start_with_health(PORT, "nginx-broken", &tags("web", "/"), 1, "", HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        mut backends,
        controller,
        instances,
    } = scene;
    let fronted = Fronted::start(Kind::Nginx, &controller, "nginx-broken", &[]).await;
    fronted.wait_ready().await;
    let good = controller.wait_acked_by("nginx-broken").await;
    let files = || {
        ["upstreams.conf", "locations.conf"]
            .map(|f| std::fs::read_to_string(fronted.dir.join(f)).unwrap())
    };
    let before = files();

    let operator = fronted.dir.join("operator.conf");
    std::fs::write(&operator, "this is not nginx;\n").unwrap();
    cloud.set_desired("nginx-broken", 2).await;
    let two = wait_in_service(&cloud, "nginx-broken", 2, Duration::from_secs(30)).await;
    backends
        .follow(&cloud.instances("nginx-broken").await)
        .await;
    controller.wait_endpoints("web", "healthy", &two).await;
    let body = wait_for(
        "the agent to report nginx -t",
        Duration::from_secs(20),
        || async {
            let (status, body) = fronted.readyz().await;
            (status == 503).then_some(body)
        },
    )
    .await;
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("nginx -t") && error.contains("operator.conf"),
        "{error}"
    );
    // Revisions that leave the files as they were (the new instance while
    // it starts) need no reload and are applied; the one that routes to it
    // is not.
    let applied = body["revision"].as_u64().unwrap();
    assert!(applied >= good, "{body}");
    assert!(
        body["desired_revision"].as_u64().unwrap() > applied,
        "{body}"
    );
    assert_eq!(files(), before, "the last good files are back");
    assert_eq!(
        controller.acked("nginx-broken").await,
        Some(applied),
        "the failed revision is not acked"
    );
    let id = &instances[0].0;
    assert_eq!(
        fronted.get("/").await,
        (200, format!("instance={id}")),
        "nginx still routes"
    );

    std::fs::write(&operator, "").unwrap();
    fronted.wait_ready().await;
    controller.wait_acked_by("nginx-broken").await;
    assert_ne!(files(), before);
}

/// The proxy goes away and comes back mid-run (HAProxy reloaded under
/// load; nginx stopped and started) with the servers the agent set, and
/// traffic continues with no failed request.
async fn proxy_comes_back_with_the_agents_state(kind: Kind) {
    let _alone = HEAVY.lock().await;
    let group = format!("{}-restart", kind.name());
    let scene =
        Scene::start_with_health(PORT, &group, &tags("web", "/"), 2, LIFECYCLE, HEALTH).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    common::hold_launches_and_terminations(&cloud, &group).await;
    let mut fronted = Fronted::start(kind, &controller, &group, &[]).await;
    fronted.wait_ready().await;
    let _followed = FollowedGroup::start(&cloud, &group, backends);
    // Other instances than HAProxy started with, all added at run time.
    common::cycle_2_6_2(&cloud, &controller, &group, "web", 1).await;
    controller.wait_acked_by(&fronted.id).await;
    let load = match kind {
        Kind::Haproxy => {
            let load = Load::start(fronted.url("/"), 100);
            tokio::time::sleep(Duration::from_secs(1)).await;
            fronted.reload_haproxy();
            load
        }
        Kind::Nginx => {
            fronted.stop_proxy().await;
            fronted.start_proxy().await;
            Load::start(fronted.url("/"), 100)
        }
    };
    fronted.wait_ready().await;
    common::cycle_2_6_2(&cloud, &controller, &group, "web", 1).await;
    let (sent, failures) = load.finish().await;
    eprintln!("{group}: {sent} requests, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:#?}\n{}",
        failures.len(),
        fronted.log()
    );
    common::lifecycle_settled(&controller, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_reloaded_under_load_comes_back_with_the_agents_servers() {
    proxy_comes_back_with_the_agents_state(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_restarted_comes_back_with_the_agents_files() {
    proxy_comes_back_with_the_agents_state(Kind::Nginx).await;
}
