//! `signpost nginx`: drives open-source nginx, which has no API for its
//! upstreams: render, test, reload, confirm.
//!
//! - Each service is `upstream signpost_<service>` (keep-alive, least
//!   connections) with its routable endpoints, in an include file for the
//!   `http` block; each route is a pair of prefix `location`s (`= /users`
//!   and `/users/`: whole segments, and nginx takes the longest prefix) in
//!   an include file for the `server` block.
//! - `nginx -t` before every reload; when it fails the last good files are
//!   put back, the error is reported and nothing is acked.
//! - Reloads are at least `reload_interval` apart; the snapshots that
//!   arrive meanwhile are rendered together into the next one.
//! - A revision is applied once new workers serve: the master has started
//!   workers that were not there before the reload, and told the old ones
//!   to quit. Old workers finish their requests; until the TCP connections
//!   nginx's processes hold to a removed endpoint are gone, they are
//!   reported in flight, so that its terminate hook waits. nginx's
//!   `worker_shutdown_timeout` bounds how long that is.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::process::Command;
use tokio::time::Instant;
use tracing::info;

use crate::agent::{InFlight, Proxy};
use signpost_protocol::Mirror;

#[derive(Debug, Error)]
pub enum NginxError {
    #[error("nginx is not running: {reason} (pid file {pid_file})")]
    NotRunning { pid_file: PathBuf, reason: String },
    #[error("nginx -t -c {conf} failed; kept the last good files: {output}")]
    ConfigTest { conf: PathBuf, output: String },
    #[error("nginx -s reload failed: {output}")]
    Reload { output: String },
    #[error("nginx did not start new workers within {0:?} of the reload")]
    ReloadNotSeen(Duration),
    #[error("cannot run {path}: {source}")]
    Run {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where nginx and the agent's files are.
pub struct Files {
    pub nginx: PathBuf,
    pub conf: PathBuf,
    pub pid_file: PathBuf,
    pub upstreams: PathBuf,
    pub locations: PathBuf,
    pub reload_interval: Duration,
}

/// How long a reload may take to show new workers.
const RELOAD_LIMIT: Duration = Duration::from_secs(10);

pub struct Nginx {
    files: Files,
    /// The files nginx runs with (the last good ones), once the agent has
    /// reloaded it.
    live: Option<Rendered>,
    last_reload: Option<Instant>,
    /// Endpoints out of the live files that nginx's processes may still
    /// have requests to, until their connections are gone.
    leaving: BTreeMap<(String, String), SocketAddr>,
}

/// The two include files, and the endpoints they route to.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub upstreams: String,
    pub locations: String,
    pub endpoints: BTreeMap<(String, String), SocketAddr>,
}

impl Nginx {
    pub fn new(files: Files) -> Nginx {
        Nginx {
            files,
            live: None,
            last_reload: None,
            leaving: BTreeMap::new(),
        }
    }

    fn master(&self) -> Result<u32, NginxError> {
        let not_running = |reason: String| NginxError::NotRunning {
            pid_file: self.files.pid_file.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&self.files.pid_file)
            .map_err(|e| not_running(format!("cannot read the pid file: {e}")))?;
        let pid: u32 = text
            .trim()
            .parse()
            .map_err(|_| not_running(format!("pid file holds {:?}", text.trim())))?;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(not_running(format!("no process {pid}")));
        }
        Ok(pid)
    }

    async fn nginx(&self, args: &[&str]) -> Result<(bool, String), NginxError> {
        let out = Command::new(&self.files.nginx)
            .args(args)
            .arg("-c")
            .arg(&self.files.conf)
            .args(["-e", "stderr"])
            .output()
            .await
            .map_err(|source| NginxError::Run {
                path: self.files.nginx.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        Ok((out.status.success(), text))
    }

    async fn write(&self, rendered: &Rendered) -> Result<(), NginxError> {
        write(&self.files.upstreams, &rendered.upstreams).await?;
        write(&self.files.locations, &rendered.locations).await
    }
}

async fn write(path: &Path, contents: &str) -> Result<(), NginxError> {
    let file = |source| NginxError::File {
        path: path.to_owned(),
        source,
    };
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    tokio::fs::write(&temp, contents).await.map_err(file)?;
    tokio::fs::rename(&temp, path).await.map_err(file)
}

fn upstream(service: &str) -> String {
    format!("signpost_{service}")
}

/// The include files for `desired`. Pure.
pub fn render(desired: &Mirror) -> Rendered {
    let mut upstreams = String::from(
        "# Written by `signpost nginx` for the http block; rewritten on every change.\n",
    );
    let mut locations = String::from(
        "# Written by `signpost nginx` for the server block; rewritten on every change.\n",
    );
    let mut endpoints = BTreeMap::new();
    for (service, s) in &desired.services {
        let name = upstream(service);
        upstreams.push_str(&format!("\nupstream {name} {{\n    least_conn;\n"));
        let mut any = false;
        for (instance, e) in s.endpoints.iter().filter(|(_, e)| e.state.is_routable()) {
            let addr = SocketAddr::new(e.address, e.port);
            upstreams.push_str(&format!("    server {addr} max_fails=0;\n"));
            endpoints.insert((service.clone(), instance.clone()), addr);
            any = true;
        }
        if !any {
            // nginx refuses an empty upstream; this one answers 502.
            upstreams.push_str("    server 127.0.0.1:1 down;\n");
        }
        upstreams.push_str("    keepalive 32;\n}\n");
        let route = s.route.trim_end_matches('/');
        let block = format!(
            " {{\n    proxy_pass http://{name};\n    proxy_http_version 1.1;\n    proxy_set_header Connection \"\";\n}}\n"
        );
        if route.is_empty() {
            locations.push_str(&format!("\nlocation /{block}"));
        } else {
            locations.push_str(&format!("\nlocation = {route}{block}"));
            locations.push_str(&format!("location {route}/{block}"));
        }
    }
    Rendered {
        upstreams,
        locations,
        endpoints,
    }
}

/// The pids whose parent is `parent`.
fn children(parent: u32) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // The command name may hold spaces: fields follow its ')'.
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn shutting_down(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("shutting down"))
        .unwrap_or(true)
}

/// Connections (established or being made) to each of `addrs`, held by
/// the processes `pids`: from /proc/net/tcp{,6} and the processes' fds.
fn connections(pids: &BTreeSet<u32>, addrs: &BTreeSet<SocketAddr>) -> BTreeMap<SocketAddr, u64> {
    let mut by_inode = BTreeMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else {
                continue;
            };
            // 01 ESTABLISHED, 02 SYN_SENT.
            if !matches!(*state, "01" | "02") {
                continue;
            }
            if let Some(addr) = parse_proc_addr(remote).filter(|a| addrs.contains(a)) {
                by_inode.insert(inode.to_string(), addr);
            }
        }
    }
    let mut counts = BTreeMap::new();
    if by_inode.is_empty() {
        return counts;
    }
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'));
            if let Some(addr) = inode.and_then(|i| by_inode.get(i)) {
                *counts.entry(*addr).or_default() += 1;
            }
        }
    }
    counts
}

/// `0100007F:1F90` (IPv4, the 32-bit word in host order) or the IPv6 form
/// (four such words), with the port in hex.
pub fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip: IpAddr = match words.as_slice() {
        [w] => IpAddr::from(w.to_ne_bytes()),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl Proxy for Nginx {
    const KIND: &'static str = "nginx";
    type Error = NginxError;

    async fn apply(&mut self, desired: &Mirror) -> Result<(), NginxError> {
        let rendered = render(desired);
        if self.live.as_ref() == Some(&rendered) {
            self.master()?;
            return Ok(());
        }
        if let Some(wait) = self
            .last_reload
            .map(|at| at + self.files.reload_interval)
            .filter(|t| *t > Instant::now())
        {
            tokio::time::sleep_until(wait).await;
        }
        let on_disk = (
            tokio::fs::read_to_string(&self.files.upstreams)
                .await
                .unwrap_or_default(),
            tokio::fs::read_to_string(&self.files.locations)
                .await
                .unwrap_or_default(),
        );
        if on_disk != (rendered.upstreams.clone(), rendered.locations.clone()) {
            // Written and tested before nginx need run: an nginx started
            // later starts with them.
            self.write(&rendered).await?;
            let (ok, output) = self.nginx(&["-t", "-q"]).await?;
            if !ok {
                write(&self.files.upstreams, &on_disk.0).await?;
                write(&self.files.locations, &on_disk.1).await?;
                return Err(NginxError::ConfigTest {
                    conf: self.files.conf.clone(),
                    output,
                });
            }
        }
        let master = self.master()?;
        let old = children(master);
        let (ok, output) = self.nginx(&["-s", "reload"]).await?;
        self.last_reload = Some(Instant::now());
        if !ok {
            return Err(NginxError::Reload { output });
        }
        let deadline = Instant::now() + RELOAD_LIMIT;
        loop {
            let now = children(master);
            let new = now.difference(&old).next().is_some();
            if new
                && old
                    .iter()
                    .all(|pid| !now.contains(pid) || shutting_down(*pid))
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(NginxError::ReloadNotSeen(RELOAD_LIMIT));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(live) = &self.live {
            for (key, addr) in &live.endpoints {
                if !rendered.endpoints.contains_key(key) {
                    self.leaving.insert(key.clone(), *addr);
                }
            }
        }
        self.leaving
            .retain(|k, _| !rendered.endpoints.contains_key(k));
        info!(revision = ?desired.revision, workers = ?children(master), "nginx reloaded");
        self.live = Some(rendered);
        Ok(())
    }

    async fn in_flight(&mut self, _desired: &Mirror) -> Result<InFlight, NginxError> {
        let mut in_flight = InFlight::new();
        if self.leaving.is_empty() {
            return Ok(in_flight);
        }
        let master = self.master()?;
        let mut pids = children(master);
        pids.insert(master);
        let addrs = self.leaving.values().copied().collect();
        let counts = connections(&pids, &addrs);
        self.leaving.retain(|(service, instance), addr| {
            let n = counts.get(addr).copied().unwrap_or(0);
            if n > 0 {
                in_flight
                    .entry(service.clone())
                    .or_default()
                    .insert(instance.clone(), n);
            }
            n > 0
        });
        Ok(in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_protocol::{Message, PROTOCOL};

    #[test]
    fn renders_whole_segment_locations_and_only_routable_servers() {
        let line = format!(
            r#"{{"type":"snapshot","protocol":{PROTOCOL},"epoch":1,"revision":7,"services":[{{"name":"web","route":"/","endpoints":[{{"instance":"i-1","address":"127.0.0.1","port":80,"zone":"a","state":"healthy"}},{{"instance":"i-2","address":"127.0.0.2","port":80,"zone":"a","state":"draining"}}]}},{{"name":"users","route":"/users","endpoints":[{{"instance":"i-3","address":"127.0.0.3","port":80,"zone":"a","state":"starting"}}]}}]}}"#
        );
        let mut m = Mirror::default();
        m.apply(Message::from_line(line.as_bytes()).unwrap())
            .unwrap();
        let r = render(&m);
        assert!(r.upstreams.contains("upstream signpost_web {\n    least_conn;\n    server 127.0.0.1:80 max_fails=0;\n    keepalive 32;\n}"), "{}", r.upstreams);
        assert!(
            r.upstreams.contains(
                "upstream signpost_users {\n    least_conn;\n    server 127.0.0.1:1 down;\n"
            ),
            "{}",
            r.upstreams
        );
        assert!(
            r.locations.contains("location = /users {"),
            "{}",
            r.locations
        );
        assert!(
            r.locations.contains("location /users/ {"),
            "{}",
            r.locations
        );
        assert!(r.locations.contains("location / {"), "{}", r.locations);
        assert_eq!(r.endpoints.len(), 1);
    }

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000401A87F:4E20"),
            Some("127.168.1.4:20000".parse().unwrap())
        );
    }
}
