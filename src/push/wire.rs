//! The push protocol's messages, shared by the controller (which writes
//! them) and every subscriber (which reads them).
//!
//! One JSON object per line. A stream starts with a `snapshot`, then carries
//! `delta`s and `ping`s. A delta names the revision it applies to (`base`):
//! a subscriber whose revision differs must not guess, it reconnects for a
//! fresh snapshot. That makes a lost or reordered message harmless.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{self, Revision, Snapshot};

/// The protocol version this build speaks. Bumped on any change a peer of
/// the previous version would misread.
pub const PROTOCOL: u32 = 1;

/// One line of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Everything routable-to-be: replaces whatever the subscriber had.
    Snapshot {
        protocol: u32,
        revision: Revision,
        services: Vec<WireService>,
    },
    /// The changes that turn revision `base` into `revision`.
    Delta {
        protocol: u32,
        revision: Revision,
        base: Revision,
        changes: Vec<WireChange>,
    },
    /// Keeps idle streams (and the proxies between) alive, and lets the
    /// subscriber tell a quiet controller from a dead one.
    Ping { revision: Revision },
}

/// A service as a router needs it: where it is routed and its endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireService {
    pub name: String,
    pub route: String,
    pub endpoints: Vec<WireEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEndpoint {
    pub instance: String,
    pub address: IpAddr,
    pub port: u16,
    pub zone: String,
    pub state: WireState,
}

/// The wire's own copy of `model::EndpointState`, so that a change to the
/// registry's model is a deliberate protocol change, not an accident.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireState {
    Starting,
    Healthy,
    Unhealthy,
    /// Its instance is terminating: route no new request to it.
    Draining,
}

impl WireState {
    pub fn is_routable(self) -> bool {
        self == WireState::Healthy
    }
}

/// One change in a delta. Endpoint changes carry the whole endpoint (a few
/// dozen bytes), so a delta costs bytes in proportion to what changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WireChange {
    /// A new service, or a service whose route changed. A new service's
    /// endpoints follow as `put_endpoint`s.
    PutService {
        name: String,
        route: String,
    },
    RemoveService {
        name: String,
    },
    /// An endpoint added, or changed (state, address, port).
    PutEndpoint {
        service: String,
        endpoint: WireEndpoint,
    },
    RemoveEndpoint {
        service: String,
        instance: String,
    },
}

impl From<model::EndpointState> for WireState {
    fn from(s: model::EndpointState) -> Self {
        match s {
            model::EndpointState::Starting => WireState::Starting,
            model::EndpointState::Healthy => WireState::Healthy,
            model::EndpointState::Unhealthy => WireState::Unhealthy,
            model::EndpointState::Draining => WireState::Draining,
        }
    }
}

impl From<&model::Endpoint> for WireEndpoint {
    fn from(e: &model::Endpoint) -> Self {
        WireEndpoint {
            instance: e.instance_id.0.clone(),
            address: e.address,
            port: e.port,
            zone: e.zone.clone(),
            state: e.state.into(),
        }
    }
}

impl Message {
    pub fn snapshot(snap: &Snapshot) -> Message {
        Message::Snapshot {
            protocol: PROTOCOL,
            revision: snap.revision,
            services: snap
                .services
                .values()
                .map(|s| WireService {
                    name: s.name.clone(),
                    route: s.settings.route.clone(),
                    endpoints: s.endpoints.values().map(WireEndpoint::from).collect(),
                })
                .collect(),
        }
    }

    /// The delta from `old` to `new`, or `None` when a snapshot would be
    /// smaller (a subscriber far behind, or most of the registry changed).
    pub fn delta(old: &Snapshot, new: &Snapshot) -> Option<Message> {
        let changes = diff(old, new);
        let size: usize = new.services.values().map(|s| 1 + s.endpoints.len()).sum();
        (changes.len() <= size).then_some(Message::Delta {
            protocol: PROTOCOL,
            revision: new.revision,
            base: old.revision,
            changes,
        })
    }

    /// The line to write: JSON and a newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("wire messages serialize");
        line.push(b'\n');
        line
    }

    pub fn from_line(line: &[u8]) -> Result<Message, WireError> {
        serde_json::from_slice(line).map_err(|e| WireError::Malformed {
            reason: e.to_string(),
            line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
        })
    }
}

/// The changes that turn `old` into `new`. Services that are the same `Arc`
/// in both (the registry shares unchanged services) cost nothing.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<WireChange> {
    let mut changes = Vec::new();
    for (name, service) in &new.services {
        let before = old.services.get(name);
        if before.is_some_and(|b| std::sync::Arc::ptr_eq(b, service)) {
            continue;
        }
        if before.is_none_or(|b| b.settings.route != service.settings.route) {
            changes.push(WireChange::PutService {
                name: name.clone(),
                route: service.settings.route.clone(),
            });
        }
        for (id, endpoint) in &service.endpoints {
            let was = before.and_then(|b| b.endpoints.get(id));
            let now = WireEndpoint::from(endpoint);
            if was.is_none_or(|w| WireEndpoint::from(w) != now) {
                changes.push(WireChange::PutEndpoint {
                    service: name.clone(),
                    endpoint: now,
                });
            }
        }
        if let Some(before) = before {
            for id in before.endpoints.keys() {
                if !service.endpoints.contains_key(id) {
                    changes.push(WireChange::RemoveEndpoint {
                        service: name.clone(),
                        instance: id.0.clone(),
                    });
                }
            }
        }
    }
    for name in old.services.keys() {
        if !new.services.contains_key(name) {
            changes.push(WireChange::RemoveService { name: name.clone() });
        }
    }
    changes
}

/// Why a subscriber refused a message. Every one of them means: keep what
/// you have, reconnect, start again from a snapshot.
#[derive(Debug, Error, PartialEq)]
pub enum WireError {
    #[error("malformed message ({reason}): {line}")]
    Malformed { reason: String, line: String },
    #[error("protocol version {got} not supported (this router speaks {PROTOCOL})")]
    ProtocolMismatch { got: u32 },
    #[error("delta for revision {base} but this subscriber has {have:?}")]
    BaseMismatch {
        base: Revision,
        have: Option<Revision>,
    },
    #[error("delta names unknown service {service:?}")]
    UnknownService { service: String },
}

/// A subscriber's copy of the registry, built from messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mirror {
    /// `None` until the first snapshot.
    pub revision: Option<Revision>,
    pub services: BTreeMap<String, MirrorService>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MirrorService {
    pub route: String,
    pub endpoints: BTreeMap<String, WireEndpoint>,
}

impl Mirror {
    /// Applies a snapshot or delta and says whether the revision moved (pings
    /// do not). On error the mirror is unchanged.
    pub fn apply(&mut self, message: Message) -> Result<bool, WireError> {
        match message {
            Message::Ping { .. } => Ok(false),
            Message::Snapshot {
                protocol,
                revision,
                services,
            } => {
                check_protocol(protocol)?;
                self.revision = Some(revision);
                self.services = services
                    .into_iter()
                    .map(|s| {
                        let endpoints = s
                            .endpoints
                            .into_iter()
                            .map(|e| (e.instance.clone(), e))
                            .collect();
                        let service = MirrorService {
                            route: s.route,
                            endpoints,
                        };
                        (s.name, service)
                    })
                    .collect();
                Ok(true)
            }
            Message::Delta {
                protocol,
                revision,
                base,
                changes,
            } => {
                check_protocol(protocol)?;
                if self.revision != Some(base) {
                    return Err(WireError::BaseMismatch {
                        base,
                        have: self.revision,
                    });
                }
                // Applied to a copy so that a bad change leaves us as we were.
                let mut services = self.services.clone();
                for change in changes {
                    apply_change(&mut services, change)?;
                }
                self.services = services;
                self.revision = Some(revision);
                Ok(true)
            }
        }
    }

    /// The mirror as a snapshot message: what the router's cache file holds.
    pub fn to_snapshot(&self) -> Option<Message> {
        Some(Message::Snapshot {
            protocol: PROTOCOL,
            revision: self.revision?,
            services: self
                .services
                .iter()
                .map(|(name, s)| WireService {
                    name: name.clone(),
                    route: s.route.clone(),
                    endpoints: s.endpoints.values().cloned().collect(),
                })
                .collect(),
        })
    }
}

fn check_protocol(got: u32) -> Result<(), WireError> {
    if got == PROTOCOL {
        Ok(())
    } else {
        Err(WireError::ProtocolMismatch { got })
    }
}

fn apply_change(
    services: &mut BTreeMap<String, MirrorService>,
    change: WireChange,
) -> Result<(), WireError> {
    match change {
        WireChange::PutService { name, route } => {
            services
                .entry(name)
                .and_modify(|s| s.route.clone_from(&route))
                .or_insert_with(|| MirrorService {
                    route,
                    endpoints: BTreeMap::new(),
                });
        }
        WireChange::RemoveService { name } => {
            services.remove(&name);
        }
        WireChange::PutEndpoint { service, endpoint } => {
            let s = services
                .get_mut(&service)
                .ok_or(WireError::UnknownService { service })?;
            s.endpoints.insert(endpoint.instance.clone(), endpoint);
        }
        WireChange::RemoveEndpoint { service, instance } => {
            let s = services
                .get_mut(&service)
                .ok_or(WireError::UnknownService { service })?;
            s.endpoints.remove(&instance);
        }
    }
    Ok(())
}

/// What a router reports after applying a revision, and every second while
/// it has requests in flight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The revision the router routes with now.
    pub revision: Revision,
    /// Requests in flight: service → instance → count. Zero counts omitted.
    #[serde(default)]
    pub in_flight: BTreeMap<String, BTreeMap<String, u64>>,
    /// Endpoints the router has stopped using on its own (passive health).
    #[serde(default)]
    pub ejected: Vec<Ejection>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ejection {
    pub service: String,
    pub instance: String,
    /// Why: `connect_failures` or `server_errors`.
    pub reason: String,
    /// Milliseconds until the router tries the endpoint again.
    pub remaining_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointState, HealthCheck, Service, ServiceSettings};
    use crate::registry::Registry;
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn endpoint(id: &str, last: u8, state: EndpointState) -> Endpoint {
        Endpoint {
            instance_id: id.into(),
            address: [127, 42, 1, last].into(),
            port: 8080,
            zone: "a".into(),
            group: "g".into(),
            state,
            since: SystemTime::UNIX_EPOCH,
        }
    }

    fn service(name: &str, endpoints: &[Endpoint]) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            settings: ServiceSettings {
                route: format!("/{name}"),
                port: 8080,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::from(["g".to_string()]),
            endpoints: endpoints
                .iter()
                .map(|e| (e.instance_id.clone(), e.clone()))
                .collect(),
        })
    }

    fn snapshot(revision: Revision, services: &[Arc<Service>]) -> Snapshot {
        Snapshot {
            revision,
            services: services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            problems: Default::default(),
        }
    }

    #[test]
    fn messages_round_trip_through_one_line_each() {
        let snap = snapshot(
            7,
            &[service(
                "users",
                &[endpoint("i-1", 4, EndpointState::Healthy)],
            )],
        );
        let messages = [
            Message::snapshot(&snap),
            Message::Delta {
                protocol: PROTOCOL,
                revision: 8,
                base: 7,
                changes: vec![
                    WireChange::PutService {
                        name: "orders".into(),
                        route: "/orders".into(),
                    },
                    WireChange::PutEndpoint {
                        service: "users".into(),
                        endpoint: (&endpoint("i-2", 5, EndpointState::Starting)).into(),
                    },
                    WireChange::RemoveEndpoint {
                        service: "users".into(),
                        instance: "i-1".into(),
                    },
                    WireChange::RemoveService {
                        name: "billing".into(),
                    },
                ],
            },
            Message::Ping { revision: 8 },
        ];
        for m in messages {
            let line = m.to_line();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(*line.last().unwrap(), b'\n');
            assert_eq!(Message::from_line(&line[..line.len() - 1]).unwrap(), m);
        }
        // The documented shape, which curl users and other implementations read.
        let line = String::from_utf8(Message::Ping { revision: 3 }.to_line()).unwrap();
        assert_eq!(line, "{\"type\":\"ping\",\"revision\":3}\n");
    }

    #[test]
    fn a_delta_carries_only_the_changed_endpoint() {
        let others: Vec<Endpoint> = (10..60)
            .map(|n| endpoint(&format!("i-{n}"), n, EndpointState::Healthy))
            .collect();
        let orders = service("orders", &others);
        let old = snapshot(
            1,
            &[
                service(
                    "users",
                    &[
                        endpoint("i-1", 4, EndpointState::Healthy),
                        endpoint("i-2", 5, EndpointState::Healthy),
                    ],
                ),
                orders.clone(),
            ],
        );
        let new = snapshot(
            2,
            &[
                service(
                    "users",
                    &[
                        endpoint("i-1", 4, EndpointState::Unhealthy),
                        endpoint("i-2", 5, EndpointState::Healthy),
                    ],
                ),
                orders,
            ],
        );
        let Some(Message::Delta {
            revision,
            base,
            changes,
            ..
        }) = Message::delta(&old, &new)
        else {
            panic!("a one-endpoint change is a delta");
        };
        assert_eq!((revision, base), (2, 1));
        assert_eq!(
            changes,
            vec![WireChange::PutEndpoint {
                service: "users".into(),
                endpoint: (&endpoint("i-1", 4, EndpointState::Unhealthy)).into(),
            }]
        );
        let delta_bytes = Message::delta(&old, &new).unwrap().to_line().len();
        let snapshot_bytes = Message::snapshot(&new).to_line().len();
        assert!(
            delta_bytes * 20 < snapshot_bytes,
            "{delta_bytes} vs {snapshot_bytes}"
        );
    }

    #[test]
    fn applying_every_delta_rebuilds_the_registry() {
        // Walk the registry through adds, state changes, removals and a
        // removed service; a mirror fed deltas must equal one fed snapshots.
        let registry = Registry::new();
        let now = SystemTime::now();
        let put = |name: &str| crate::model::Change::PutService {
            name: name.into(),
            settings: ServiceSettings {
                route: format!("/{name}"),
                port: 8080,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::from(["g".to_string()]),
        };
        let add = |s: &str, id: &str, n: u8| crate::model::Change::AddEndpoint {
            service: s.into(),
            endpoint: endpoint(id, n, EndpointState::Starting),
        };
        let batches = vec![
            vec![put("users"), add("users", "i-1", 4), put("orders")],
            vec![add("users", "i-2", 5), add("orders", "i-3", 6)],
            vec![crate::model::Change::SetState {
                service: "users".into(),
                instance: "i-1".into(),
                address: [127, 42, 1, 4].into(),
                port: 8080,
                state: EndpointState::Healthy,
            }],
            vec![crate::model::Change::RemoveEndpoint {
                service: "users".into(),
                instance: "i-2".into(),
                reason: "test",
            }],
            vec![crate::model::Change::RemoveEndpoint {
                service: "orders".into(),
                instance: "i-3".into(),
                reason: "test",
            }],
            vec![crate::model::Change::RemoveService {
                name: "orders".into(),
            }],
        ];
        let mut mirror = Mirror::default();
        mirror
            .apply(Message::snapshot(&registry.snapshot()))
            .unwrap();
        for batch in batches {
            let old = registry.snapshot();
            registry
                .apply(&batch, now)
                .expect("batch changes something");
            let new = registry.snapshot();
            mirror.apply(Message::delta(&old, &new).unwrap()).unwrap();
            let mut fresh = Mirror::default();
            fresh.apply(Message::snapshot(&new)).unwrap();
            assert_eq!(mirror, fresh);
        }
    }

    #[test]
    fn apply_rejects_a_base_mismatch_and_keeps_what_it_had() {
        let mut mirror = Mirror::default();
        let delta = |base, revision| Message::Delta {
            protocol: PROTOCOL,
            revision,
            base,
            changes: vec![WireChange::RemoveService {
                name: "users".into(),
            }],
        };
        assert_eq!(
            mirror.apply(delta(0, 1)),
            Err(WireError::BaseMismatch {
                base: 0,
                have: None
            }),
            "a delta before any snapshot"
        );
        let snap = snapshot(
            5,
            &[service(
                "users",
                &[endpoint("i-1", 4, EndpointState::Healthy)],
            )],
        );
        mirror.apply(Message::snapshot(&snap)).unwrap();
        let before = mirror.clone();
        assert_eq!(
            mirror.apply(delta(4, 6)),
            Err(WireError::BaseMismatch {
                base: 4,
                have: Some(5)
            })
        );
        assert_eq!(mirror, before);
        let bad = Message::Delta {
            protocol: PROTOCOL,
            revision: 6,
            base: 5,
            changes: vec![
                WireChange::RemoveService {
                    name: "users".into(),
                },
                WireChange::RemoveEndpoint {
                    service: "nope".into(),
                    instance: "i-1".into(),
                },
            ],
        };
        assert!(matches!(
            mirror.apply(bad),
            Err(WireError::UnknownService { .. })
        ));
        assert_eq!(mirror, before, "a half-applied delta is not kept");
        assert_eq!(mirror.apply(delta(5, 6)), Ok(true));
        assert!(mirror.services.is_empty());
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let mut mirror = Mirror::default();
        let line = br#"{"type":"snapshot","protocol":2,"revision":1,"services":[]}"#;
        let message = Message::from_line(line).unwrap();
        assert_eq!(
            mirror.apply(message),
            Err(WireError::ProtocolMismatch { got: 2 })
        );
        assert_eq!(mirror.revision, None);
        assert!(matches!(
            Message::from_line(b"{\"type\":\"snapshot\""),
            Err(WireError::Malformed { .. })
        ));
    }
}
