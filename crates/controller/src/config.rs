//! Typed, validated configuration. Sources, lowest to highest precedence:
//! built-in defaults, the TOML file (`--config`), `SIGNPOST_*` environment
//! variables, command-line flags. Every key has a default; an unknown or bad
//! key is an error that names it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::guard::GuardConfig;
use crate::model::HookResult;
use crate::routers::ExpectedRouters;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The controller's configuration.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Allows a `listen` off loopback without TLS or without authentication
    /// (warned at every start). Anyone reaching the port could then read the
    /// topology, subscribe as any router and ack in its name.
    pub insecure_plaintext: bool,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// How often the whole fleet is listed again (the safety net behind events).
    #[serde(with = "duration")]
    pub resync_interval: Duration,
    /// Port used for groups without a `signpost:port` tag. Unset: the tag is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_port: Option<u16>,
    pub aws: AwsConfig,
    pub health: HealthConfig,
    pub events: EventsConfig,
    pub lifecycle: LifecycleConfig,
    pub removal_guard: GuardConfig,
    /// `[routers]`: routers that must be there (see `routers`).
    pub routers: ExpectedRouters,
    pub xds: XdsConfig,
    pub ha: HaConfig,
}

/// Several replicas, one leader, by a lease in DynamoDB (see `lease`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// The DynamoDB table (partition key `name`, a string) that holds the
    /// lease. Unset (the default): a single controller, always leading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The lease item's key: replicas with the same table and name elect one
    /// leader among them.
    pub lease_name: String,
    /// How long a lease lasts without renewal. The leader renews every third
    /// of it and stops acting two thirds into it without a renewal.
    #[serde(with = "duration")]
    pub lease_duration: Duration,
    /// This replica's name in the lease. Unset: the host name and process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// The URL at which routers reach this replica's API, written into the
    /// lease so that followers can send routers to the leader. Unset: taken
    /// from `listen` when it is a specific address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            table: None,
            lease_name: "signpost-controller".into(),
            lease_duration: Duration::from_secs(15),
            replica_id: None,
            advertise: None,
        }
    }
}

/// TLS on the API listener: PEM files, re-read every `reload_interval`
/// when they change (a cert-manager rotation needs no restart).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The controller's certificate chain. Unset: plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA of client certificates. Set: a client certificate signed by it
    /// authenticates its holder (required unless `auth.tokens_file` is set
    /// too, in which case a token will do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Where a client certificate's identity comes from.
    pub identity: IdentitySource,
    /// With `identity = "uri_san"`: the URI SAN that starts with this, less
    /// this prefix, is the identity (`spiffe://signpost/router/edge-1` →
    /// `edge-1`).
    pub uri_prefix: String,
    #[serde(with = "duration")]
    pub reload_interval: Duration,
}

/// Which part of a client certificate names its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's common name.
    Cn,
    /// A SPIFFE-style URI subject alternative name, after `tls.uri_prefix`.
    UriSan,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            client_ca: None,
            identity: IdentitySource::Cn,
            uri_prefix: "spiffe://signpost/router/".into(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Who may do what on the API (see `auth`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// TOML file of `[[token]]` entries (`sha256`, `identity`, `role`),
    /// re-read when it changes. Only hashes are stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// Roles of client-certificate identities that are not routers
    /// (`reader`, `admin`); any other identity with a valid certificate is
    /// a `router`.
    pub roles: BTreeMap<String, Role>,
}

impl AuthConfig {
    /// Whether callers must authenticate (as soon as a way to is set).
    pub fn required(&self, tls: &TlsConfig) -> bool {
        self.tokens_file.is_some() || tls.client_ca.is_some()
    }
}

/// Limits on what one caller can cost the controller.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body in bytes (acks carry in-flight counts per
    /// endpoint: 1 MiB holds tens of thousands).
    pub max_body: usize,
    /// Open `/v1/watch` streams per identity (a reconnecting router briefly
    /// holds two).
    pub subscriptions_per_identity: usize,
    /// Requests per second per authenticated identity, with a burst of one
    /// second's worth (a router acks every revision and, while requests
    /// are in flight, every second).
    pub requests_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body: 1 << 20,
            subscriptions_per_identity: 4,
            requests_per_second: 100,
        }
    }
}

/// What an API caller may do (see `auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Subscribe (`/v1/watch`) and ack, as its own id only.
    Router,
    /// Read the registry, the routers, the lifecycle actions and metrics.
    Reader,
    /// Read everything; subscribe and ack as itself (never as another: no
    /// role may speak for a router).
    Admin,
}

/// The xDS management server for Envoy and proxyless gRPC (see `xds`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct XdsConfig {
    /// gRPC address of ADS and LRS. Unset (the default): no xDS server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The address Envoy's listener (LDS `signpost`) takes requests on.
    pub envoy_listener: SocketAddr,
    /// Allows a non-loopback `listen` without TLS (`tls.cert`) or client
    /// authentication (`tls.client_ca`, `auth.tokens_file`), which the xDS
    /// server shares with the API. Without them any client that reaches
    /// the port can subscribe under any node id and hold lifecycle hooks
    /// until their timeouts: only set this on a network where that is
    /// acceptable.
    pub insecure_plaintext: bool,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            listen: None,
            envoy_listener: SocketAddr::from(([0, 0, 0, 0], 10000)),
            insecure_plaintext: false,
        }
    }
}

/// Lifecycle hooks that signpost completes (see `lifecycle`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Hooks whose name starts with this are signpost's to complete; a
    /// group's other hooks belong to other tools and are left alone.
    pub hook_prefix: String,
    /// How long a launching instance may take to pass its health check.
    #[serde(with = "duration")]
    pub launch_timeout: Duration,
    /// The result when it does not: `abandon` (the group terminates and
    /// replaces it) or `continue`.
    pub launch_timeout_result: HookResult,
    /// Longest wait for routers to let go of a terminating instance.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// After a start, how long completions wait for the routers of the
    /// previous controller to reconnect (their reconnect back-off is at most 5s).
    #[serde(with = "duration")]
    pub router_grace: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            hook_prefix: "signpost".into(),
            launch_timeout: Duration::from_secs(300),
            launch_timeout_result: HookResult::Abandon,
            drain_timeout: Duration::from_secs(30),
            router_grace: Duration::from_secs(10),
        }
    }
}

/// The SQS queue that EventBridge rules and lifecycle hooks feed.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Unset: no events, resync alone (still correct, slower to react).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<String>,
    /// How long one ReceiveMessage long-polls (SQS allows up to 20s).
    #[serde(with = "duration")]
    pub wait_time: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            queue_url: None,
            wait_time: Duration::from_secs(20),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region; unset means the standard chain (`AWS_REGION`, profile, IMDS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint for every service; unset means the standard chain
    /// (`AWS_ENDPOINT_URL`). A service-specific endpoint, ours or the SDK's
    /// (`AWS_ENDPOINT_URL_SQS`, ...), beats it: see `endpoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Endpoints of single services, e.g. SQS on one emulator and Auto
    /// Scaling on another, or one VPC endpoint per service.
    pub endpoints: ServiceEndpoints,
    /// Attempts per call, by the SDK's standard retry mode (jittered backoff).
    pub max_attempts: u32,
    /// Limit on one attempt of one call.
    #[serde(with = "duration")]
    pub attempt_timeout: Duration,
    /// Limit on one call including its retries.
    #[serde(with = "duration")]
    pub operation_timeout: Duration,
    /// Budget of AWS calls per second across the controller, so that a large
    /// fleet does not use up the account's API rate shared with other tools.
    pub calls_per_second: f64,
}

/// `[aws.endpoints]`: one optional endpoint per AWS service signpost calls.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceEndpoints {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ec2: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamodb: Option<String>,
}

impl ServiceEndpoints {
    /// Each endpoint with its config key.
    fn keyed(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("aws.endpoints.autoscaling", self.autoscaling.as_deref()),
            ("aws.endpoints.ec2", self.ec2.as_deref()),
            ("aws.endpoints.sqs", self.sqs.as_deref()),
            ("aws.endpoints.dynamodb", self.dynamodb.as_deref()),
        ]
    }
}

/// Health-check defaults, and per-service overrides under `[health.services.NAME]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    #[serde(with = "duration")]
    pub interval: Duration,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Consecutive passes that make an endpoint healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// At most this many probes in flight at once.
    pub max_concurrent_probes: usize,
    pub services: BTreeMap<String, HealthOverride>,
}

/// The health-check settings in force for one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthOverride {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            insecure_plaintext: false,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            resync_interval: Duration::from_secs(30),
            default_port: None,
            aws: AwsConfig::default(),
            health: HealthConfig::default(),
            events: EventsConfig::default(),
            lifecycle: LifecycleConfig::default(),
            removal_guard: GuardConfig::default(),
            routers: ExpectedRouters::default(),
            xds: XdsConfig::default(),
            ha: HaConfig::default(),
        }
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            endpoints: ServiceEndpoints::default(),
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(20),
            calls_per_second: 20.0,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            max_concurrent_probes: 256,
            services: BTreeMap::new(),
        }
    }
}

impl HealthConfig {
    /// The settings in force for one service.
    pub fn defaults(&self) -> HealthSettings {
        HealthSettings {
            interval: self.interval,
            timeout: self.timeout,
            healthy_threshold: self.healthy_threshold,
            unhealthy_threshold: self.unhealthy_threshold,
        }
    }

    pub fn for_service(&self, service: &str) -> HealthSettings {
        let d = self.defaults();
        match self.services.get(service) {
            None => d,
            Some(o) => HealthSettings {
                interval: o.interval.unwrap_or(d.interval),
                timeout: o.timeout.unwrap_or(d.timeout),
                healthy_threshold: o.healthy_threshold.unwrap_or(d.healthy_threshold),
                unhealthy_threshold: o.unhealthy_threshold.unwrap_or(d.unhealthy_threshold),
            },
        }
    }
}

impl Config {
    /// Reads a TOML file; a missing `path` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        Ok(config)
    }

    /// Checks what types alone cannot. Call after all sources are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.resync_interval < Duration::from_secs(1) {
            return Err(invalid("resync_interval", "must be at least 1s"));
        }
        if self.default_port == Some(0) {
            return Err(invalid("default_port", "must be 1-65535"));
        }
        let aws = &self.aws;
        if aws.max_attempts == 0 {
            return Err(invalid("aws.max_attempts", "must be at least 1"));
        }
        if aws.attempt_timeout.is_zero() || aws.operation_timeout < aws.attempt_timeout {
            return Err(invalid(
                "aws.operation_timeout",
                "must be at least aws.attempt_timeout, which must be above 0",
            ));
        }
        if let Some(url) = &aws.endpoint_url {
            validate_endpoint("aws.endpoint_url", url)?;
        }
        for (key, url) in aws.endpoints.keyed() {
            if let Some(url) = url {
                validate_endpoint(key, url)?;
            }
        }
        if !(aws.calls_per_second.is_finite() && aws.calls_per_second > 0.0) {
            return Err(invalid("aws.calls_per_second", "must be a number above 0"));
        }
        if self.events.wait_time > Duration::from_secs(20)
            || self.events.wait_time.subsec_nanos() != 0
        {
            return Err(invalid(
                "events.wait_time",
                "must be whole seconds from 0s to 20s (the SQS limit)",
            ));
        }
        let guard = &self.removal_guard;
        if !(guard.max_share >= 0.0 && guard.max_share < 1.0) {
            return Err(invalid(
                "removal_guard.max_share",
                "must be a share from 0 to below 1 (0.5: more than half)",
            ));
        }
        if guard.min_endpoints == 0 {
            return Err(invalid("removal_guard.min_endpoints", "must be at least 1"));
        }
        if guard.listings == 0 {
            return Err(invalid("removal_guard.listings", "must be at least 1"));
        }
        if self.events.queue_url.as_deref() == Some("") {
            return Err(invalid(
                "events.queue_url",
                "is empty; leave it out to disable events",
            ));
        }
        if self.lifecycle.hook_prefix.is_empty() {
            return Err(invalid(
                "lifecycle.hook_prefix",
                "is empty, which would complete every hook of a group, other tools' too",
            ));
        }
        if self.lifecycle.launch_timeout < Duration::from_secs(1) {
            return Err(invalid("lifecycle.launch_timeout", "must be at least 1s"));
        }
        if self.health.max_concurrent_probes == 0 {
            return Err(invalid(
                "health.max_concurrent_probes",
                "must be at least 1",
            ));
        }
        self.validate_security()?;
        if let Some(listen) = self.xds.listen {
            if !listen.ip().is_loopback() && !self.xds.insecure_plaintext {
                if self.tls.cert.is_none() {
                    return Err(invalid(
                        "xds.listen",
                        format!("{listen} is not loopback and no TLS is configured (tls.cert, tls.key): anyone on the network could subscribe in an Envoy's name and hold lifecycle hooks; configure TLS or set xds.insecure_plaintext = true to accept that"),
                    ));
                }
                if !self.auth.required(&self.tls) {
                    return Err(invalid(
                        "xds.listen",
                        format!("{listen} is not loopback and no authentication is configured (tls.client_ca or auth.tokens_file): anyone on the network could subscribe in an Envoy's name and hold lifecycle hooks; configure one or set xds.insecure_plaintext = true to accept that"),
                    ));
                }
            }
        }
        self.validate_ha()?;
        self.routers
            .check()
            .map_err(|(key, reason)| invalid(key, reason))?;
        validate_health("health", &self.health.defaults())?;
        for name in self.health.services.keys() {
            let key = format!("health.services.{}", key_part(name));
            validate_health(&key, &self.health.for_service(name))?;
        }
        Ok(())
    }

    fn validate_ha(&self) -> Result<(), ConfigError> {
        let ha = &self.ha;
        if ha.table.as_deref() == Some("") {
            return Err(invalid(
                "ha.table",
                "is empty; leave it out for a single controller",
            ));
        }
        if ha.lease_duration < Duration::from_secs(3) {
            return Err(invalid("ha.lease_duration", "must be at least 3s"));
        }
        if ha.lease_name.is_empty() {
            return Err(invalid("ha.lease_name", "must not be empty"));
        }
        if ha.replica_id.as_deref() == Some("") {
            return Err(invalid(
                "ha.replica_id",
                "must not be empty; leave it out for host name and process id",
            ));
        }
        if let Some(url) = &ha.advertise {
            validate_endpoint("ha.advertise", url)?;
        } else if ha.table.is_some() && self.listen.ip().is_unspecified() {
            return Err(invalid(
                "ha.advertise",
                format!("is needed when listen ({}) is not a specific address: followers send routers to the leader at this URL", self.listen),
            ));
        }
        Ok(())
    }

    /// TLS files come in pairs, and off loopback the API needs TLS and a
    /// way to authenticate unless `insecure_plaintext` says otherwise.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key",
                    "is unset but tls.cert is set; set both or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert",
                    "is unset but tls.key is set; set both or neither",
                ))
            }
            _ => {}
        }
        if tls.client_ca.is_some() && tls.cert.is_none() {
            return Err(invalid(
                "tls.client_ca",
                "needs tls.cert and tls.key: client certificates are only asked for over TLS",
            ));
        }
        if tls.identity == IdentitySource::UriSan && tls.uri_prefix.is_empty() {
            return Err(invalid("tls.uri_prefix", "is empty; give the URI SAN prefix before the identity, e.g. \"spiffe://signpost/router/\""));
        }
        if self.limits.max_body < 1024 {
            return Err(invalid("limits.max_body", "must be at least 1024 (bytes)"));
        }
        if self.limits.subscriptions_per_identity == 0 {
            return Err(invalid(
                "limits.subscriptions_per_identity",
                "must be at least 1",
            ));
        }
        if self.limits.requests_per_second == 0 {
            return Err(invalid("limits.requests_per_second", "must be at least 1"));
        }
        if tls.reload_interval < Duration::from_millis(100) {
            return Err(invalid("tls.reload_interval", "must be at least 100ms"));
        }
        if !self.listen.ip().is_loopback() && !self.insecure_plaintext {
            if tls.cert.is_none() {
                return Err(invalid(
                    "listen",
                    format!("{} is not loopback and no TLS is configured (tls.cert, tls.key): anyone on the network could read the topology and ack in a router's name; configure TLS or set insecure_plaintext = true to accept that", self.listen),
                ));
            }
            if !self.auth.required(tls) {
                return Err(invalid(
                    "listen",
                    format!("{} is not loopback and no authentication is configured (tls.client_ca or auth.tokens_file): anyone on the network could ack in a router's name; configure one or set insecure_plaintext = true to accept that", self.listen),
                ));
            }
        }
        Ok(())
    }

    /// The URL written into the lease for routers to reach this replica.
    pub fn advertised(&self) -> String {
        self.ha
            .advertise
            .clone()
            .unwrap_or_else(|| {
                let scheme = if self.tls.cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", self.listen)
            })
            .trim_end_matches('/')
            .to_owned()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }
}

/// An endpoint the SDK can call: http or https, a host, nothing after the
/// path. Caught here rather than as a failed call at every resync.
fn validate_endpoint(key: &str, url: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| {
        invalid(
            key,
            format!("{url:?} is not an endpoint URL like \"https://sqs.eu-west-1.amazonaws.com\" ({why})"),
        )
    };
    let uri: hyper::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(bad(&format!("scheme {other}, not http or https"))),
        None => return Err(bad("no http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.query().is_some() {
        return Err(bad("a query string"));
    }
    Ok(())
}

/// `name` as one part of a dotted key, as the file would spell it: bare when
/// TOML allows, else a one-line basic string (`health.services."api.v2"`),
/// so that an error names a key that exists. Found by the fuzzer: a service
/// `"u<sers"` was named as `health.services.u<sers`, no TOML key; and a
/// name with a newline, quoted as a value would be, came out as a
/// multi-line string, which a key cannot be.
fn key_part(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        return name.to_owned();
    }
    let mut quoted = String::from('"');
    for c in name.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn validate_health(prefix: &str, h: &HealthSettings) -> Result<(), ConfigError> {
    if h.interval < Duration::from_millis(100) {
        return Err(invalid(
            format!("{prefix}.interval"),
            "must be at least 100ms",
        ));
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        return Err(invalid(
            format!("{prefix}.timeout"),
            "must be above 0 and not longer than the interval",
        ));
    }
    if h.healthy_threshold == 0 {
        return Err(invalid(
            format!("{prefix}.healthy_threshold"),
            "must be at least 1",
        ));
    }
    if h.unhealthy_threshold == 0 {
        return Err(invalid(
            format!("{prefix}.unhealthy_threshold"),
            "must be at least 1",
        ));
    }
    Ok(())
}

/// Durations are written as humans do: "30s", "500ms", "2m".
pub mod duration {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("{text:?} is not a duration like \"30s\" or \"500ms\" ({e})"))
    }
}

mod opt_duration {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::from_toml(text).and_then(|c| c.validate().map(|_| c)) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.resync_interval, Duration::from_secs(30));
        assert_eq!(c.health.healthy_threshold, 2);
    }

    #[test]
    fn full_file_is_read() {
        let c = Config::from_toml(
            r#"
            listen = "0.0.0.0:8080"
            insecure_plaintext = true
            resync_interval = "10s"
            default_port = 80
            [aws]
            region = "eu-west-1"
            calls_per_second = 5.5
            endpoint_url = "http://127.0.0.1:5000"
            [aws.endpoints]
            sqs = "http://127.0.0.1:4566"
            autoscaling = "https://autoscaling.eu-west-1.amazonaws.com"
            [health]
            interval = "1s"
            timeout = "500ms"
            [health.services.users]
            unhealthy_threshold = 5
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.default_port, Some(80));
        assert_eq!(c.aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            c.aws.endpoints,
            ServiceEndpoints {
                autoscaling: Some("https://autoscaling.eu-west-1.amazonaws.com".into()),
                ec2: None,
                sqs: Some("http://127.0.0.1:4566".into()),
                dynamodb: None,
            }
        );
        let users = c.health.for_service("users");
        assert_eq!(
            (users.interval, users.unhealthy_threshold),
            (Duration::from_secs(1), 5)
        );
        assert_eq!(c.health.for_service("other").unhealthy_threshold, 3);
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let mut c = Config::default();
        c.aws.endpoints.sqs = Some("http://127.0.0.1:4566".into());
        c.health.services.insert(
            "users".into(),
            HealthOverride {
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        );
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("resync = \"5s\"").contains("unknown field `resync`"));
        assert!(err("resync_interval = \"soon\"").contains("\"soon\" is not a duration"));
        assert!(err("resync_interval = \"10ms\"").contains("config key resync_interval"));
        assert!(err("listen = \"nowhere\"").contains("listen"));
        assert!(err("default_port = 70000").contains("default_port"));
        assert!(err("[aws]\nmax_attempts = 0").contains("aws.max_attempts"));
        assert!(err("[events]\nwait_time = \"30s\"").contains("events.wait_time"));
        assert!(err("[health]\ntimeout = \"10s\"").contains("health.timeout"));
        assert!(err("[aws]\nendpoint_url = \"localhost:4566\"")
            .contains("config key aws.endpoint_url: \"localhost:4566\" is not an endpoint URL"));
        assert!(err("[aws.endpoints]\nsqs = \"ftp://127.0.0.1:4566\"")
            .contains("config key aws.endpoints.sqs: \"ftp://127.0.0.1:4566\" is not an endpoint URL like \"https://sqs.eu-west-1.amazonaws.com\" (scheme ftp, not http or https)"));
        assert!(
            err("[aws.endpoints]\nautoscaling = \"http://\"").contains("aws.endpoints.autoscaling")
        );
        assert!(err("[aws.endpoints]\nlambda = \"http://127.0.0.1:1\"")
            .contains("unknown field `lambda`"));
        assert!(err("[health.services.users]\nhealthy_threshold = 0")
            .contains("health.services.users.healthy_threshold"));
    }

    #[test]
    fn a_bad_service_override_is_named_by_its_key_as_the_file_spells_it() {
        // Found by the fuzzer: the name went into the key unquoted.
        let e = err("[health.services.\"api.v2\"]\nhealthy_threshold = 0\n");
        assert!(
            e.contains("config key health.services.\"api.v2\".healthy_threshold:"),
            "{e}"
        );
        let e = err("[health.services.\"u<sers\"]\ninterval = \"1s\"\ntimeout = \"2s\"\n");
        assert!(
            e.contains("config key health.services.\"u<sers\".timeout:"),
            "{e}"
        );
        let e = err("[health.services.\"a\\nb\\\"c\\\\d\"]\nhealthy_threshold = 0\n");
        assert!(
            e.contains(r#"config key health.services."a\u000Ab\"c\\d".healthy_threshold:"#),
            "{e}"
        );
        let e = err("[health.services.users-2]\nhealthy_threshold = 0\n");
        assert!(
            e.contains("config key health.services.users-2.healthy_threshold:"),
            "{e}"
        );
    }

    #[test]
    fn ha_is_off_by_default_and_needs_an_address_routers_can_reach() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.ha.table, None);
        assert_eq!(c.ha.lease_duration, Duration::from_secs(15));
        let ha = Config::from_toml("[ha]\ntable = \"lease\"\nlease_duration = \"6s\"").unwrap();
        ha.validate().unwrap();
        assert_eq!(ha.advertised(), "http://127.0.0.1:7070");
        assert!(err(
            "listen = \"0.0.0.0:7070\"\ninsecure_plaintext = true\n[ha]\ntable = \"lease\""
        )
        .contains("config key ha.advertise"));
        assert!(err("[ha]\nlease_duration = \"1s\"").contains("ha.lease_duration"));
        assert!(err("[ha]\ntable = \"\"").contains("ha.table"));
        assert!(err("[ha]\nadvertise = \"10.0.0.1\"").contains("ha.advertise"));
    }

    #[test]
    fn off_loopback_the_api_needs_tls_and_authentication_unless_told_otherwise() {
        let e = err("listen = \"0.0.0.0:7070\"\n");
        assert!(
            e.contains("config key listen") && e.contains("no TLS"),
            "{e}"
        );
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let e = err(&format!("listen = \"0.0.0.0:7070\"\n{tls}"));
        assert!(e.contains("no authentication"), "{e}");
        let ok = |text: &str| Config::from_toml(text).unwrap().validate().unwrap();
        ok(&format!(
            "listen = \"0.0.0.0:7070\"\n{tls}client_ca = \"ca.pem\"\n"
        ));
        ok(&format!(
            "listen = \"0.0.0.0:7070\"\n{tls}[auth]\ntokens_file = \"t.toml\"\n"
        ));
        ok("listen = \"0.0.0.0:7070\"\ninsecure_plaintext = true\n");
        assert!(err("[tls]\ncert = \"c.pem\"\n").contains("config key tls.key"));
        assert!(err("[tls]\nclient_ca = \"ca.pem\"\n").contains("config key tls.client_ca"));
        let e = err("[auth.roles]\nops = \"root\"\n");
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn xds_is_off_by_default_and_off_loopback_needs_tls_and_authentication() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.xds.listen, None);
        let loopback = Config::from_toml("[xds]\nlisten = \"127.0.0.1:18000\"").unwrap();
        assert!(loopback.validate().is_ok());
        let xds = "[xds]\nlisten = \"0.0.0.0:18000\"\n";
        let e = err(xds);
        assert!(
            e.contains("config key xds.listen") && e.contains("no TLS"),
            "{e}"
        );
        assert!(e.contains("xds.insecure_plaintext"), "{e}");
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let e = err(&format!("{tls}{xds}"));
        assert!(
            e.contains("config key xds.listen") && e.contains("no authentication"),
            "{e}"
        );
        let ok = |text: &str| Config::from_toml(text).unwrap().validate().unwrap();
        ok(&format!("{tls}client_ca = \"ca.pem\"\n{xds}"));
        ok(&format!("{tls}[auth]\ntokens_file = \"t.toml\"\n{xds}"));
        ok(&format!("{xds}insecure_plaintext = true"));
    }
}
