//! The registry's snapshots as push protocol messages: what the hub sends.

use signpost_protocol::{
    Epoch, Message, WireChange, WireEndpoint, WireService, WireState, PROTOCOL,
};

use crate::model::{self, Snapshot};

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
            instance: e.instance_id.to_string(),
            address: e.address,
            port: e.port,
            zone: e.zone.clone(),
            state: e.state.into(),
        }
    }
}

pub fn snapshot(epoch: Epoch, snap: &Snapshot) -> Message {
    Message::Snapshot {
        protocol: PROTOCOL,
        epoch,
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
pub fn delta(epoch: Epoch, old: &Snapshot, new: &Snapshot) -> Option<Message> {
    let changes = diff(old, new);
    let size: usize = new.services.values().map(|s| 1 + s.endpoints.len()).sum();
    (changes.len() <= size).then_some(Message::Delta {
        protocol: PROTOCOL,
        epoch,
        revision: new.revision,
        base: old.revision,
        changes,
    })
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
                        instance: id.to_string(),
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointState, HealthCheck, Revision, Service, ServiceSettings};
    use crate::registry::Registry;
    use signpost_protocol::Mirror;

    const E: Epoch = Epoch::from_bits(5);
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

    fn snapshot_at(revision: Revision, services: &[Arc<Service>]) -> Snapshot {
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
        let snap = snapshot_at(
            7,
            &[service(
                "users",
                &[endpoint("i-1", 4, EndpointState::Healthy)],
            )],
        );
        let messages = [
            snapshot(E, &snap),
            Message::Delta {
                protocol: PROTOCOL,
                epoch: E,
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
        let old = snapshot_at(
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
        let new = snapshot_at(
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
        }) = delta(E, &old, &new)
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
        let delta_bytes = delta(E, &old, &new).unwrap().to_line().len();
        let snapshot_bytes = snapshot(E, &new).to_line().len();
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
        let put = |name: &str| model::Change::PutService {
            name: name.into(),
            settings: ServiceSettings {
                route: format!("/{name}"),
                port: 8080,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::from(["g".to_string()]),
        };
        let add = |s: &str, id: &str, n: u8| model::Change::AddEndpoint {
            service: s.into(),
            endpoint: endpoint(id, n, EndpointState::Starting),
        };
        let batches = vec![
            vec![put("users"), add("users", "i-1", 4), put("orders")],
            vec![add("users", "i-2", 5), add("orders", "i-3", 6)],
            vec![model::Change::SetState {
                service: "users".into(),
                instance: "i-1".into(),
                address: [127, 42, 1, 4].into(),
                port: 8080,
                state: EndpointState::Healthy,
            }],
            vec![model::Change::RemoveEndpoint {
                service: "users".into(),
                instance: "i-2".into(),
                reason: "test",
            }],
            vec![model::Change::RemoveEndpoint {
                service: "orders".into(),
                instance: "i-3".into(),
                reason: "test",
            }],
            vec![model::Change::RemoveService {
                name: "orders".into(),
            }],
        ];
        let mut mirror = Mirror::default();
        mirror.apply(snapshot(E, &registry.snapshot())).unwrap();
        for batch in batches {
            let old = registry.snapshot();
            registry
                .apply(&batch, now)
                .expect("batch changes something");
            let new = registry.snapshot();
            mirror.apply(delta(E, &old, &new).unwrap()).unwrap();
            let mut fresh = Mirror::default();
            fresh.apply(snapshot(E, &new)).unwrap();
            assert_eq!(mirror, fresh);
        }
    }
}
