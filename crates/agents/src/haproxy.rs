//! `signpost haproxy`: drives HAProxy through its runtime API (the admin
//! socket), with no reload for endpoint or route changes.
//!
//! - A service's endpoints are the servers of backend `signpost_<service>`
//!   (or the name given with `--backend service=name`); server names are
//!   instance ids. A new endpoint is `add server` (created in maintenance),
//!   made `ready` once the registry says healthy; a leaving one is set to
//!   `drain`, and when its sessions (`show stat` scur) reach zero, `maint`
//!   and `del server`. Until then its sessions are reported in flight.
//! - Routes are a map file the frontend reads with `map_beg` on the path
//!   with a `/` appended; its keys end in `/`, so a prefix matches whole
//!   segments, and they are kept longest first (map_beg takes the first
//!   match), replaced atomically with `prepare map` / `commit map`.
//! - Runtime servers do not survive a reload, so the agent also writes the
//!   backends with their servers to a config file HAProxy loads (`-f`), and
//!   the map file: a reloaded or restarted HAProxy comes back with both. A
//!   backend HAProxy does not have yet (a new service) needs that reload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tracing::{debug, info};

use crate::agent::{InFlight, Proxy};
use signpost_protocol::Mirror;

#[derive(Debug, Error)]
pub enum HaproxyError {
    #[error("HAProxy's admin socket {path}: {source} (is HAProxy running, with `stats socket {path} level admin`?)")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy's admin socket {path} did not answer {command:?} within {limit:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        limit: Duration,
    },
    #[error("HAProxy refused {command:?}: {answer}")]
    Refused { command: String, answer: String },
    #[error("HAProxy has no backend {backend:?} for service {service:?}: it is in {fragment}; reload HAProxy to create it")]
    NoBackend {
        service: String,
        backend: String,
        fragment: PathBuf,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read `show stat`: {0}")]
    Stat(String),
}

/// How the agent finds and names things in HAProxy.
pub struct Haproxy {
    /// The admin socket (`stats socket ... level admin`).
    pub socket: PathBuf,
    /// The map file the frontend's `map_beg` reads.
    pub map: PathBuf,
    /// The backends file HAProxy loads with `-f`.
    pub backends: PathBuf,
    /// Backend names that do not follow `signpost_<service>`.
    pub names: BTreeMap<String, String>,
    /// What the files hold now, so that they are written only on change.
    written: BTreeMap<PathBuf, String>,
}

const PREFIX: &str = "signpost_";

/// How long a server stays in maintenance, idle, before `del server`.
/// HAProxy 2.6 frees a deleted server that a stream still points at (one
/// retrying a failed connection, say) and crashes (haproxy/haproxy#2323,
/// fixed in 2.9 by refusing the delete); a stream does not outlive its
/// connect retries, far shorter than this.
const DELETE_AFTER_S: u64 = 30;
const TIMEOUT: Duration = Duration::from_secs(2);

impl Haproxy {
    pub fn new(
        socket: PathBuf,
        map: PathBuf,
        backends: PathBuf,
        names: BTreeMap<String, String>,
    ) -> Haproxy {
        Haproxy {
            socket,
            map,
            backends,
            names,
            written: BTreeMap::new(),
        }
    }

    fn backend(&self, service: &str) -> String {
        match self.names.get(service) {
            Some(name) => name.clone(),
            None => format!("{PREFIX}{service}"),
        }
    }

    /// The service a backend serves, if it is one of ours.
    fn service_of(&self, backend: &str) -> Option<String> {
        if let Some((service, _)) = self.names.iter().find(|(_, b)| *b == backend) {
            return Some(service.clone());
        }
        let service = backend.strip_prefix(PREFIX)?;
        (!self.names.contains_key(service)).then(|| service.to_owned())
    }

    /// One command on its own connection (HAProxy's non-interactive mode).
    async fn command(&self, command: &str) -> Result<String, HaproxyError> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            stream.write_all(format!("{command}\n").as_bytes()).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Err(_) => Err(HaproxyError::Timeout {
                path: self.socket.clone(),
                command: command.to_owned(),
                limit: TIMEOUT,
            }),
            Ok(Err(source)) => Err(HaproxyError::Socket {
                path: self.socket.clone(),
                source,
            }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }

    /// Runs `command`; an answer that does not start with `ok` (empty for
    /// commands that say nothing on success) is a refusal.
    async fn expect(&self, command: &str, ok: &str) -> Result<String, HaproxyError> {
        let answer = self.command(command).await?;
        let trimmed = answer.trim();
        let fine = if ok.is_empty() {
            trimmed.is_empty()
        } else {
            trimmed.starts_with(ok)
        };
        if fine {
            Ok(answer)
        } else {
            Err(HaproxyError::Refused {
                command: command.to_owned(),
                answer: trimmed.to_owned(),
            })
        }
    }

    async fn servers(&self) -> Result<Observed, HaproxyError> {
        let stat = self.command("show stat").await?;
        parse_stat(&stat).map_err(HaproxyError::Stat)
    }

    async fn map_entries(&self) -> Result<Vec<(String, String)>, HaproxyError> {
        let path = self.map.display().to_string();
        let answer = self.command(&format!("show map {path}")).await?;
        if answer.trim_start().starts_with("Unknown map") {
            return Err(HaproxyError::Refused {
                command: format!("show map {path}"),
                answer: answer.trim().to_owned(),
            });
        }
        Ok(answer
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let _id = words.next()?;
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect())
    }

    /// Replaces the map in one step: a new version filled longest first,
    /// then committed.
    async fn replace_map(&self, entries: &[(String, String)]) -> Result<(), HaproxyError> {
        let path = self.map.display().to_string();
        let answer = self
            .expect(&format!("prepare map {path}"), "New version created:")
            .await?;
        let version = answer.trim().rsplit(' ').next().unwrap_or_default();
        for (key, backend) in entries {
            self.expect(&format!("add map @{version} {path} {key} {backend}"), "")
                .await?;
        }
        self.expect(&format!("commit map @{version} {path}"), "")
            .await?;
        Ok(())
    }

    /// Writes `contents` to `path` (atomically) unless it already holds it.
    async fn write(&mut self, path: &Path, contents: String) -> Result<(), HaproxyError> {
        if self.written.get(path) == Some(&contents) {
            return Ok(());
        }
        let file = |source| HaproxyError::File {
            path: path.to_owned(),
            source,
        };
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        tokio::fs::write(&temp, &contents).await.map_err(file)?;
        tokio::fs::rename(&temp, path).await.map_err(file)?;
        self.written.insert(path.to_owned(), contents);
        Ok(())
    }
}

/// A server as `show stat` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub addr: String,
    pub admin: Admin,
    /// Sessions on it now: requests in flight.
    pub sessions: u64,
    /// Seconds since its state last changed (`lastchg`).
    pub unchanged_for: u64,
}

/// The part of a server's state the agent sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    /// Takes new requests.
    Ready,
    /// Finishes what it has, takes nothing new.
    Drain,
    /// Out: takes nothing.
    Maint,
}

/// Backends (by name) and their servers (by name), as HAProxy has them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub backends: BTreeMap<String, BTreeMap<String, Server>>,
}

/// Parses `show stat` CSV by its header, so that columns added by later
/// HAProxy versions do not matter.
pub fn parse_stat(csv: &str) -> Result<Observed, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| format!("no header in {:?}", csv.lines().next().unwrap_or("")))?;
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("no column {name:?}"))
    };
    let (px, sv, scur, status, addr, lastchg) = (
        column("pxname")?,
        column("svname")?,
        column("scur")?,
        column("status")?,
        column("addr")?,
        column("lastchg")?,
    );
    let mut observed = Observed::default();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let field = |i: usize| f.get(i).copied().unwrap_or("");
        let name = field(sv);
        if name == "FRONTEND" {
            continue;
        }
        let servers = observed.backends.entry(field(px).to_owned()).or_default();
        if name == "BACKEND" {
            continue;
        }
        let status = field(status);
        let admin = if status.starts_with("MAINT") {
            Admin::Maint
        } else if status.starts_with("DRAIN") {
            Admin::Drain
        } else {
            Admin::Ready
        };
        let server = Server {
            addr: field(addr).to_owned(),
            admin,
            sessions: field(scur).parse().unwrap_or(0),
            unchanged_for: field(lastchg).parse().unwrap_or(0),
        };
        servers.insert(name.to_owned(), server);
    }
    Ok(observed)
}

/// One runtime API change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Add {
        backend: String,
        server: String,
        addr: String,
    },
    Address {
        backend: String,
        server: String,
        ip: String,
        port: u16,
    },
    State {
        backend: String,
        server: String,
        admin: Admin,
    },
    /// Removes a server that is out and idle; refused while HAProxy still
    /// holds connections to it, and then tried again on the next poll.
    Delete { backend: String, server: String },
}

impl Step {
    fn command(&self) -> (String, &'static str) {
        match self {
            Step::Add {
                backend,
                server,
                addr,
            } => (
                format!("add server {backend}/{server} {addr}"),
                "New server registered",
            ),
            Step::Address {
                backend,
                server,
                ip,
                port,
            } => (
                format!("set server {backend}/{server} addr {ip} port {port}"),
                "",
            ),
            Step::State {
                backend,
                server,
                admin,
            } => {
                let state = match admin {
                    Admin::Ready => "ready",
                    Admin::Drain => "drain",
                    Admin::Maint => "maint",
                };
                (format!("set server {backend}/{server} state {state}"), "")
            }
            Step::Delete { backend, server } => {
                (format!("del server {backend}/{server}"), "Server deleted")
            }
        }
    }
}

/// What to change so that HAProxy routes as `desired` says: new servers
/// first, then the states, then the leaving servers, so that a service is
/// never left with fewer ready servers than either snapshot gives it.
/// Backends HAProxy lacks are returned apart. Pure: HAProxy's state in,
/// steps out.
pub fn plan(
    desired: &Mirror,
    observed: &Observed,
    backend_of: impl Fn(&str) -> String,
    service_of: impl Fn(&str) -> Option<String>,
) -> (Vec<Step>, Vec<(String, String)>) {
    let mut adds = Vec::new();
    let mut states = Vec::new();
    let mut leaving = Vec::new();
    let mut missing = Vec::new();
    let empty = BTreeMap::new();
    for (service, s) in &desired.services {
        let backend = backend_of(service);
        let Some(servers) = observed.backends.get(&backend) else {
            missing.push((service.clone(), backend));
            continue;
        };
        for (instance, e) in &s.endpoints {
            let addr = format!("{}:{}", e.address, e.port);
            let want = if e.state.is_routable() {
                Admin::Ready
            } else {
                Admin::Drain
            };
            let server = instance.clone();
            match servers.get(instance) {
                None => {
                    adds.push(Step::Add {
                        backend: backend.clone(),
                        server: server.clone(),
                        addr,
                    });
                    if want == Admin::Ready {
                        states.push(Step::State {
                            backend: backend.clone(),
                            server,
                            admin: want,
                        });
                    }
                }
                Some(have) => {
                    if have.addr != addr {
                        states.push(Step::Address {
                            backend: backend.clone(),
                            server: server.clone(),
                            ip: e.address.to_string(),
                            port: e.port,
                        });
                    }
                    // Not routable: drained or out, either takes nothing new.
                    let wrong = match want {
                        Admin::Ready => have.admin != Admin::Ready,
                        _ => have.admin == Admin::Ready,
                    };
                    if wrong {
                        states.push(Step::State {
                            backend: backend.clone(),
                            server,
                            admin: want,
                        });
                    }
                }
            }
        }
    }
    for (backend, servers) in &observed.backends {
        let Some(service) = service_of(backend) else {
            continue;
        };
        let wanted = desired
            .services
            .get(&service)
            .map_or(&empty, |s| &s.endpoints);
        for (server, have) in servers.iter().filter(|(n, _)| !wanted.contains_key(*n)) {
            let (backend, server) = (backend.clone(), server.clone());
            match (have.admin, have.sessions) {
                (Admin::Ready, _) => leaving.push(Step::State {
                    backend,
                    server,
                    admin: Admin::Drain,
                }),
                (Admin::Drain, 0) => leaving.push(Step::State {
                    backend,
                    server,
                    admin: Admin::Maint,
                }),
                (Admin::Maint, 0) if have.unchanged_for >= DELETE_AFTER_S => {
                    leaving.push(Step::Delete { backend, server })
                }
                _ => {}
            }
        }
    }
    adds.extend(states);
    adds.extend(leaving);
    (adds, missing)
}

/// The map's entries: a key per route ending in `/` (the frontend appends
/// one to the path), longest first.
pub fn map_entries(desired: &Mirror, backend_of: impl Fn(&str) -> String) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = desired
        .services
        .iter()
        .map(|(service, s)| {
            let key = if s.route.ends_with('/') {
                s.route.clone()
            } else {
                format!("{}/", s.route)
            };
            (key, backend_of(service))
        })
        .collect();
    entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    entries
}

/// The backends file: every service's backend with the servers it should
/// have, so that a reloaded HAProxy starts as the agent left it.
/// Not-routable servers are `disabled` (maintenance): after a reload
/// nothing is in flight to them in the new process.
pub fn render_backends(desired: &Mirror, backend_of: impl Fn(&str) -> String) -> String {
    let mut out = String::from(
        "# Written by `signpost haproxy`: the servers it set through the runtime API,\n\
         # so that HAProxy reloads with them. Do not edit; it is rewritten on every change.\n",
    );
    for (service, s) in &desired.services {
        out.push_str(&format!("\nbackend {}\n", backend_of(service)));
        for (instance, e) in &s.endpoints {
            let disabled = if e.state.is_routable() {
                ""
            } else {
                " disabled"
            };
            out.push_str(&format!(
                "    server {instance} {}:{}{disabled}\n",
                e.address, e.port
            ));
        }
    }
    out
}

impl Proxy for Haproxy {
    const KIND: &'static str = "haproxy";
    type Error = HaproxyError;

    async fn apply(&mut self, desired: &Mirror) -> Result<(), HaproxyError> {
        let backend_of = |s: &str| self.backend(s);
        let backends = render_backends(desired, backend_of);
        let entries = map_entries(desired, backend_of);
        let map: String = entries.iter().map(|(k, b)| format!("{k} {b}\n")).collect();
        let (backends_path, map_path) = (self.backends.clone(), self.map.clone());
        self.write(&backends_path, backends).await?;
        self.write(&map_path, map).await?;

        let observed = self.servers().await?;
        let (steps, missing) = plan(
            desired,
            &observed,
            |s| self.backend(s),
            |b| self.service_of(b),
        );
        for step in steps {
            let (command, ok) = step.command();
            match (&step, self.expect(&command, ok).await) {
                (_, Ok(_)) => info!(%command, "applied"),
                // Cleanup: HAProxy refuses while it holds connections; the
                // next poll tries again.
                (Step::Delete { .. }, Err(e)) => debug!(error = %e, "server not deleted yet"),
                (_, Err(e)) => return Err(e),
            }
        }
        if self.map_entries().await? != entries {
            self.replace_map(&entries).await?;
            info!(routes = entries.len(), "map replaced");
        }
        match missing.into_iter().next() {
            Some((service, backend)) => Err(HaproxyError::NoBackend {
                service,
                backend,
                fragment: self.backends.clone(),
            }),
            None => Ok(()),
        }
    }

    async fn in_flight(&mut self, desired: &Mirror) -> Result<InFlight, HaproxyError> {
        let observed = self.servers().await?;
        let mut in_flight = InFlight::new();
        for (backend, servers) in &observed.backends {
            let Some(service) = self.service_of(backend) else {
                continue;
            };
            let wanted = desired.services.get(&service);
            for (name, server) in servers {
                let routable = wanted
                    .and_then(|s| s.endpoints.get(name))
                    .is_some_and(|e| e.state.is_routable());
                if !routable && server.sessions > 0 {
                    in_flight
                        .entry(service.clone())
                        .or_default()
                        .insert(name.clone(), server.sessions);
                }
            }
        }
        Ok(in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_protocol::{Message, PROTOCOL};

    fn mirror(endpoints: &[(&str, &str, &str)]) -> Mirror {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|(id, ip, state)| {
                format!(r#"{{"instance":"{id}","address":"{ip}","port":80,"zone":"a","state":"{state}"}}"#)
            })
            .collect();
        let line = format!(
            r#"{{"type":"snapshot","protocol":{PROTOCOL},"epoch":1,"revision":7,"services":[{{"name":"web","route":"/","endpoints":[{}]}},{{"name":"users","route":"/users","endpoints":[]}}]}}"#,
            endpoints.join(",")
        );
        let mut m = Mirror::default();
        m.apply(Message::from_line(line.as_bytes()).unwrap())
            .unwrap();
        m
    }

    fn server(addr: &str, admin: Admin, sessions: u64, unchanged_for: u64) -> Server {
        Server {
            addr: addr.into(),
            admin,
            sessions,
            unchanged_for,
        }
    }

    fn observed(servers: &[(&str, Server)]) -> Observed {
        let web = servers
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect();
        Observed {
            backends: BTreeMap::from([
                ("signpost_web".to_owned(), web),
                ("signpost_users".to_owned(), BTreeMap::new()),
                ("other".to_owned(), BTreeMap::new()),
            ]),
        }
    }

    fn plan_for(desired: &Mirror, observed: &Observed) -> Vec<String> {
        let (steps, missing) = plan(
            desired,
            observed,
            |s| format!("{PREFIX}{s}"),
            |b| b.strip_prefix(PREFIX).map(String::from),
        );
        assert!(missing.is_empty(), "{missing:?}");
        steps.iter().map(|s| s.command().0).collect()
    }

    #[test]
    fn stat_is_read_by_its_header() {
        let csv = "# pxname,svname,qcur,scur,status,lastchg,addr\n\
                   signpost,FRONTEND,,3,OPEN,,\n\
                   signpost_web,i-1,0,2,no check,12,127.0.0.1:80\n\
                   signpost_web,i-2,0,0,MAINT,40,127.0.0.2:80\n\
                   signpost_web,i-3,0,1,DRAIN,3,127.0.0.3:80\n\
                   signpost_web,BACKEND,0,3,UP,12,\n\
                   signpost_users,BACKEND,0,0,DOWN,1,\n";
        let o = parse_stat(csv).unwrap();
        let web = &o.backends["signpost_web"];
        assert_eq!(web["i-1"], server("127.0.0.1:80", Admin::Ready, 2, 12));
        assert_eq!(web["i-2"].admin, Admin::Maint);
        assert_eq!(web["i-3"].admin, Admin::Drain);
        assert!(o.backends["signpost_users"].is_empty());
        assert!(!o.backends.contains_key("signpost"));
        assert!(parse_stat("garbage").is_err());
    }

    #[test]
    fn a_new_endpoint_is_added_then_made_ready_and_a_draining_one_drained() {
        let desired = mirror(&[
            ("i-1", "127.0.0.1", "healthy"),
            ("i-2", "127.0.0.2", "draining"),
            ("i-3", "127.0.0.3", "starting"),
        ]);
        let have = observed(&[("i-2", server("127.0.0.2:80", Admin::Ready, 1, 0))]);
        assert_eq!(
            plan_for(&desired, &have),
            [
                "add server signpost_web/i-1 127.0.0.1:80",
                "add server signpost_web/i-3 127.0.0.3:80",
                "set server signpost_web/i-1 state ready",
                "set server signpost_web/i-2 state drain",
            ]
        );
    }

    #[test]
    fn a_gone_server_is_drained_then_put_out_then_deleted_once_idle() {
        let desired = mirror(&[("i-1", "127.0.0.1", "healthy")]);
        let ready = server("127.0.0.1:80", Admin::Ready, 0, 0);
        let step = |gone: Server| {
            plan_for(
                &desired,
                &observed(&[("i-1", ready.clone()), ("i-9", gone)]),
            )
        };
        let addr = "127.0.0.9:80";
        assert_eq!(
            step(server(addr, Admin::Ready, 3, 0)),
            ["set server signpost_web/i-9 state drain"]
        );
        assert!(
            step(server(addr, Admin::Drain, 3, 0)).is_empty(),
            "busy: kept"
        );
        assert_eq!(
            step(server(addr, Admin::Drain, 0, 0)),
            ["set server signpost_web/i-9 state maint"]
        );
        assert!(
            step(server(addr, Admin::Maint, 0, 5)).is_empty(),
            "not idle long enough"
        );
        assert_eq!(
            step(server(addr, Admin::Maint, 0, DELETE_AFTER_S)),
            ["del server signpost_web/i-9"]
        );
        // Backends that are not ours are left alone.
        let mut theirs = observed(&[("i-1", ready.clone())]);
        theirs
            .backends
            .get_mut("other")
            .unwrap()
            .insert("x".into(), ready.clone());
        assert!(plan_for(&desired, &theirs).is_empty());
    }

    #[test]
    fn a_backend_haproxy_lacks_is_reported() {
        let desired = mirror(&[]);
        let (_, missing) = plan(
            &desired,
            &Observed::default(),
            |s| format!("{PREFIX}{s}"),
            |_| None,
        );
        assert_eq!(missing.len(), 2, "{missing:?}");
    }

    #[test]
    fn map_keys_end_in_a_slash_longest_first() {
        let mut desired = mirror(&[]);
        let admin = desired.services["users"].clone();
        desired.services.insert(
            "admin".into(),
            signpost_protocol::MirrorService {
                route: "/users/admin".into(),
                ..admin
            },
        );
        let entries = map_entries(&desired, |s| format!("{PREFIX}{s}"));
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["/users/admin/", "/users/", "/"]);
    }

    #[test]
    fn the_backends_file_keeps_not_routable_servers_disabled() {
        let desired = mirror(&[
            ("i-1", "127.0.0.1", "healthy"),
            ("i-2", "127.0.0.2", "draining"),
        ]);
        let text = render_backends(&desired, |s| format!("{PREFIX}{s}"));
        assert!(text.contains("backend signpost_users\n"), "{text}");
        assert!(text.contains("    server i-1 127.0.0.1:80\n"), "{text}");
        assert!(
            text.contains("    server i-2 127.0.0.2:80 disabled\n"),
            "{text}"
        );
    }
}
