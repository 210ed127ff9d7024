//! Command line: subcommands, flags and their `SIGNPOST_*` environment
//! variables. Flags beat the environment, which beats the config file.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use signpost_controller::config::{duration, Config};
use signpost_router::balance::Balance;

#[derive(Parser)]
#[command(
    name = "signpost",
    version,
    about = "Service discovery for AWS Auto Scaling groups"
)]
pub struct Cli {
    /// Log filter, as in RUST_LOG (e.g. "info", "signpost=debug").
    #[arg(long, env = "SIGNPOST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch tagged Auto Scaling groups, health-check their instances, serve the registry.
    Controller(ControllerArgs),
    /// Route HTTP requests by path prefix to the controller's healthy endpoints.
    Router(RouterArgs),
    /// Drive HAProxy (runtime API) with the controller's endpoints and routes.
    Haproxy(HaproxyArgs),
    /// Drive nginx (render, nginx -t, reload) with the controller's endpoints and routes.
    Nginx(NginxArgs),
}

/// What every agent takes.
/// How a router or an agent proves itself to the controller.
#[derive(Args)]
struct LinkArgs {
    /// CA that signed the controller's certificate (PEM); required with https://.
    #[arg(long, env = "SIGNPOST_CONTROLLER_CA")]
    controller_ca: Option<PathBuf>,
    /// Client certificate (PEM) naming this router (its CN or URI SAN is the id); re-read on change.
    #[arg(long, env = "SIGNPOST_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key of --client-cert (PEM).
    #[arg(long, env = "SIGNPOST_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// File holding a bearer token for the controller; read again for every request.
    #[arg(long, env = "SIGNPOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl LinkArgs {
    fn credentials(self) -> signpost_router::transport::Credentials {
        signpost_router::transport::Credentials {
            controller_ca: self.controller_ca,
            client_cert: self.client_cert,
            client_key: self.client_key,
            token_file: self.token_file,
        }
    }
}

#[derive(Args)]
struct AgentArgs {
    /// The controller's API base URL, or several replicas' separated by commas.
    #[arg(long, env = "SIGNPOST_AGENT_CONTROLLER", default_value = "http://127.0.0.1:7070", value_parser = controller_url)]
    controller: String,
    #[command(flatten)]
    link: LinkArgs,
    /// Stable id (letters, digits, '.', '_', '-'), e.g. the host name.
    #[arg(long, env = "SIGNPOST_AGENT_ID", value_parser = router_id)]
    id: String,
    /// Admin listen address (/healthz, /readyz).
    #[arg(
        long,
        env = "SIGNPOST_AGENT_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    admin_listen: SocketAddr,
    /// File holding the last snapshot; applied at start when the controller is unreachable.
    #[arg(long, env = "SIGNPOST_AGENT_CACHE")]
    cache: Option<PathBuf>,
    /// Limit on connecting to the controller.
    #[arg(long, env = "SIGNPOST_AGENT_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration::parse)]
    connect_timeout: Duration,
    /// How often the proxy is checked (state, requests in flight) besides on every change.
    #[arg(long, env = "SIGNPOST_AGENT_POLL", default_value = "200ms", value_parser = duration::parse)]
    poll: Duration,
}

impl AgentArgs {
    fn config(self) -> signpost_agents::Config {
        signpost_agents::Config {
            controller: self.controller,
            id: self.id,
            admin_listen: self.admin_listen,
            cache: self.cache,
            connect_timeout: self.connect_timeout,
            poll: self.poll,
            credentials: self.link.credentials(),
        }
    }
}

#[derive(Args)]
struct HaproxyArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// HAProxy's admin socket (`stats socket PATH level admin`).
    #[arg(
        long,
        env = "SIGNPOST_HAPROXY_SOCKET",
        default_value = "/run/haproxy/admin.sock"
    )]
    socket: PathBuf,
    /// The map file the frontend reads with map_beg (written by the agent).
    #[arg(
        long,
        env = "SIGNPOST_HAPROXY_MAP",
        default_value = "/var/lib/signpost/haproxy.map"
    )]
    map: PathBuf,
    /// The backends file HAProxy loads with -f (written by the agent).
    #[arg(
        long,
        env = "SIGNPOST_HAPROXY_BACKENDS",
        default_value = "/var/lib/signpost/haproxy-backends.cfg"
    )]
    backends: PathBuf,
    /// SERVICE=BACKEND for a backend not named signpost_SERVICE; repeatable.
    #[arg(long = "backend", value_parser = service_backend)]
    names: Vec<(String, String)>,
}

fn service_backend(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((service, backend)) if !service.is_empty() && !backend.is_empty() => {
            Ok((service.to_owned(), backend.to_owned()))
        }
        _ => Err(format!("{s:?}: expected SERVICE=BACKEND")),
    }
}

#[derive(Args)]
struct NginxArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// The nginx executable.
    #[arg(long, env = "SIGNPOST_NGINX_BIN", default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// nginx's main config file (passed to nginx -t and -s reload with -c).
    #[arg(
        long,
        env = "SIGNPOST_NGINX_CONF",
        default_value = "/etc/nginx/nginx.conf"
    )]
    conf: PathBuf,
    /// nginx's pid file (the `pid` directive): how the agent finds the master.
    #[arg(
        long,
        env = "SIGNPOST_NGINX_PID_FILE",
        default_value = "/run/nginx.pid"
    )]
    pid_file: PathBuf,
    /// The upstreams file the http block includes (written by the agent).
    #[arg(
        long,
        env = "SIGNPOST_NGINX_UPSTREAMS",
        default_value = "/etc/nginx/signpost/upstreams.conf"
    )]
    upstreams: PathBuf,
    /// The locations file the server block includes (written by the agent).
    #[arg(
        long,
        env = "SIGNPOST_NGINX_LOCATIONS",
        default_value = "/etc/nginx/signpost/locations.conf"
    )]
    locations: PathBuf,
    /// Least time between two reloads: changes within it share one reload.
    #[arg(long, env = "SIGNPOST_NGINX_RELOAD_INTERVAL", default_value = "200ms", value_parser = duration::parse)]
    reload_interval: Duration,
}

#[derive(Args)]
struct RouterArgs {
    /// The controller's API base URL, or several replicas' separated by commas.
    #[arg(long, env = "SIGNPOST_ROUTER_CONTROLLER", default_value = "http://127.0.0.1:7070", value_parser = controller_url)]
    controller: String,
    /// Proxy listen address.
    #[arg(long, env = "SIGNPOST_ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Admin listen address (/healthz, /readyz), apart from the proxy port.
    #[arg(
        long,
        env = "SIGNPOST_ROUTER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: SocketAddr,
    /// File holding the last applied snapshot; read at start when the controller is unreachable.
    #[arg(long, env = "SIGNPOST_ROUTER_CACHE")]
    cache: Option<PathBuf>,
    #[command(flatten)]
    link: LinkArgs,
    /// Stable router id (letters, digits, '.', '_', '-'), e.g. the host name.
    #[arg(long, env = "SIGNPOST_ROUTER_ID", value_parser = router_id)]
    id: String,
    /// Load balancing: p2c (power of two choices on in-flight requests) or round-robin.
    #[arg(long, env = "SIGNPOST_ROUTER_BALANCE", default_value = "p2c")]
    balance: Balance,
    /// Limit on connecting to an endpoint.
    #[arg(long, env = "SIGNPOST_ROUTER_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration::parse)]
    connect_timeout: Duration,
    /// Limit on an endpoint's response head arriving after the request, and on each
    /// wait for more of its body.
    #[arg(long, env = "SIGNPOST_ROUTER_RESPONSE_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    response_timeout: Duration,
    /// Proxy threads, each with its own event loop; default: one per CPU.
    #[arg(long, env = "SIGNPOST_ROUTER_THREADS")]
    threads: Option<NonZeroUsize>,
}

fn controller_url(list: &str) -> Result<String, String> {
    let mut urls = Vec::new();
    for s in list.split(',').map(str::trim) {
        let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(format!(
                "{s:?}: expected http://HOST:PORT or https://HOST:PORT"
            ));
        }
        urls.push(s.trim_end_matches('/'));
    }
    Ok(urls.join(","))
}

fn router_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: 1 to 253 letters, digits, '.', '_' or '-'"))
    }
}

#[derive(Args)]
struct ControllerArgs {
    /// TOML config file; every key has a default.
    #[arg(long, env = "SIGNPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Parse and validate the config, print the effective config, exit.
    #[arg(long)]
    check_config: bool,
    /// API listen address (config key `listen`).
    #[arg(long, env = "SIGNPOST_LISTEN")]
    listen: Option<SocketAddr>,
    /// Full resync period, e.g. "30s" (config key `resync_interval`).
    #[arg(long, env = "SIGNPOST_RESYNC_INTERVAL", value_parser = duration::parse)]
    resync_interval: Option<Duration>,
    /// Port for groups without a signpost:port tag (config key `default_port`).
    #[arg(long, env = "SIGNPOST_DEFAULT_PORT")]
    default_port: Option<u16>,
    /// Health-check interval (config key `health.interval`).
    #[arg(long, env = "SIGNPOST_HEALTH_INTERVAL", value_parser = duration::parse)]
    health_interval: Option<Duration>,
    /// Health-check timeout (config key `health.timeout`).
    #[arg(long, env = "SIGNPOST_HEALTH_TIMEOUT", value_parser = duration::parse)]
    health_timeout: Option<Duration>,
    /// AWS region (config key `aws.region`; default: the AWS chain, AWS_REGION).
    #[arg(long, env = "SIGNPOST_AWS_REGION")]
    region: Option<String>,
    /// AWS endpoint (config key `aws.endpoint_url`; default: the AWS chain, AWS_ENDPOINT_URL).
    #[arg(long, env = "SIGNPOST_AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// This replica's name in the HA lease (config key `ha.replica_id`), e.g. the pod name.
    #[arg(long, env = "SIGNPOST_HA_REPLICA_ID")]
    ha_replica_id: Option<String>,
    /// The URL routers reach this replica at (config key `ha.advertise`), e.g. from the pod IP.
    #[arg(long, env = "SIGNPOST_HA_ADVERTISE")]
    ha_advertise: Option<String>,
}

impl ControllerArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.resync_interval {
            c.resync_interval = v;
        }
        if let Some(v) = self.default_port {
            c.default_port = Some(v);
        }
        if let Some(v) = self.health_interval {
            c.health.interval = v;
        }
        if let Some(v) = self.health_timeout {
            c.health.timeout = v;
        }
        if let Some(v) = &self.region {
            c.aws.region = Some(v.clone());
        }
        if let Some(v) = &self.endpoint_url {
            c.aws.endpoint_url = Some(v.clone());
        }
        if let Some(v) = &self.ha_replica_id {
            c.ha.replica_id = Some(v.clone());
        }
        if let Some(v) = &self.ha_advertise {
            c.ha.advertise = Some(v.clone());
        }
        c.validate()?;
        Ok(c)
    }
}

impl Cli {
    /// Parses the command line and runs the chosen subcommand.
    pub fn parse_and_run() -> anyhow::Result<()> {
        let cli = Cli::parse();
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_new(&cli.log).context("bad --log filter")?)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
        match cli.command {
            Command::Controller(args) => {
                let config = args.config()?;
                if args.check_config {
                    print!("{}", config.to_toml());
                    return Ok(());
                }
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?
                    .block_on(signpost_controller::run(config, shutdown_signal()))
            }
            // The proxy threads run their own runtimes; this one only
            // accepts connections and talks to the controller.
            Command::Router(args) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(signpost_router::run(
                    signpost_router::Config {
                        controller: args.controller,
                        listen: args.listen,
                        admin_listen: args.admin_listen,
                        cache: args.cache,
                        id: args.id,
                        credentials: args.link.credentials(),
                        balance: args.balance,
                        connect_timeout: args.connect_timeout,
                        response_timeout: args.response_timeout,
                        threads: args
                            .threads
                            .or_else(|| std::thread::available_parallelism().ok())
                            .map_or(1, NonZeroUsize::get),
                    },
                    shutdown_signal(),
                )),
            Command::Haproxy(args) => {
                let proxy = signpost_agents::haproxy::Haproxy::new(
                    args.socket,
                    args.map,
                    args.backends,
                    args.names.into_iter().collect(),
                );
                agent_runtime()?.block_on(signpost_agents::run(
                    args.agent.config(),
                    proxy,
                    shutdown_signal(),
                ))
            }
            Command::Nginx(args) => {
                let proxy = signpost_agents::nginx::Nginx::new(signpost_agents::nginx::Files {
                    nginx: args.nginx,
                    conf: args.conf,
                    pid_file: args.pid_file,
                    upstreams: args.upstreams,
                    locations: args.locations,
                    reload_interval: args.reload_interval,
                });
                agent_runtime()?.block_on(signpost_agents::run(
                    args.agent.config(),
                    proxy,
                    shutdown_signal(),
                ))
            }
        }
    }
}

/// An agent's work is a few requests a second: one thread.
fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// SIGTERM or SIGINT: the one place signals are handled. Components take a
/// shutdown future instead, so that tests start them in-process.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
