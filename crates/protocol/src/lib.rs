//! signpost's push protocol: the messages the controller writes and every
//! subscriber reads, the acks subscribers send back, and the revision that
//! orders them. Depends on nothing else of signpost's: the controller and
//! the data plane both depend on it, never on each other.
//!
//! One JSON object per line. A stream starts with a `snapshot`, then carries
//! `delta`s and `ping`s. A delta names the revision it applies to (`base`):
//! a subscriber whose revision differs must not guess, it reconnects for a
//! fresh snapshot. That makes a lost or reordered message harmless.
//!
//! Revisions count from 1 again whenever a controller starts, so every
//! snapshot, delta and ack also carries the controller's `Epoch`, chosen at
//! random when it starts: an ack only counts for the controller lifetime
//! that sent what it acknowledges, and a subscriber takes a snapshot of a
//! new epoch even when its revision went backwards.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The registry revision: bumped by one for every change a reader can see.
pub type Revision = u64;

/// One controller lifetime: chosen at random when a controller starts, so
/// that revision 20 of one lifetime is never taken for revision 20 of
/// another. At most 2^53 - 1, so that JSON readers in any language (some
/// parse numbers as doubles) read it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(u64);

impl Epoch {
    /// Largest epoch a double holds exactly.
    const MAX: u64 = (1 << 53) - 1;

    /// The epoch for `bits`, keeping the low 53 (never 0, so that a
    /// default-filled number is never a real epoch).
    pub const fn from_bits(bits: u64) -> Epoch {
        let bits = bits & Self::MAX;
        Epoch(if bits == 0 { 1 } else { bits })
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The protocol version this build speaks. Bumped on any change a peer of
/// the previous version would misread. 2: epochs in snapshots, deltas and
/// acks.
pub const PROTOCOL: u32 = 2;

/// One line of the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Everything routable-to-be: replaces whatever the subscriber had.
    Snapshot {
        protocol: u32,
        epoch: Epoch,
        revision: Revision,
        services: Vec<WireService>,
    },
    /// The changes that turn revision `base` into `revision`, both of
    /// `epoch`.
    Delta {
        protocol: u32,
        epoch: Epoch,
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

/// The wire's own copy of the registry's endpoint state, so that a change to the
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

impl Message {
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
    #[error("delta of controller epoch {got} but this subscriber's snapshot is of epoch {have:?}")]
    EpochMismatch { got: Epoch, have: Option<Epoch> },
    #[error("revision went backwards within epoch {epoch}: {got} after {have}")]
    RevisionBackwards {
        epoch: Epoch,
        got: Revision,
        have: Revision,
    },
    #[error("delta names unknown service {service:?}")]
    UnknownService { service: String },
}

/// A subscriber's copy of the registry, built from messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mirror {
    /// The controller lifetime the revision belongs to; `None` until the
    /// first snapshot.
    pub epoch: Option<Epoch>,
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
                epoch,
                revision,
                services,
            } => {
                check_protocol(protocol)?;
                // A new epoch is a restarted controller: its revisions start
                // again, so only within one epoch must they move forwards.
                if let (Some(have), true) = (self.revision, self.epoch == Some(epoch)) {
                    if revision < have {
                        return Err(WireError::RevisionBackwards {
                            epoch,
                            got: revision,
                            have,
                        });
                    }
                }
                self.epoch = Some(epoch);
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
                epoch,
                revision,
                base,
                changes,
            } => {
                check_protocol(protocol)?;
                if revision <= base {
                    return Err(WireError::RevisionBackwards {
                        epoch,
                        got: revision,
                        have: base,
                    });
                }
                if self.epoch != Some(epoch) {
                    return Err(WireError::EpochMismatch {
                        got: epoch,
                        have: self.epoch,
                    });
                }
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
            epoch: self.epoch?,
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// The controller lifetime of `revision`.
    pub epoch: Epoch,
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
    pub reason: EjectionReason,
    /// Milliseconds until the router tries the endpoint again.
    pub remaining_ms: u64,
}

/// Why a router stopped using an endpoint on its own. A reason added later
/// is a protocol change: an older controller refuses the ack that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EjectionReason {
    /// Connections to it failed in a row.
    ConnectFailures,
    /// It answered 5xx in a row.
    ServerErrors,
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: Epoch = Epoch(11);
    const E2: Epoch = Epoch(22);

    fn users_snapshot(epoch: Epoch, revision: Revision) -> Message {
        Message::Snapshot {
            protocol: PROTOCOL,
            epoch,
            revision,
            services: vec![WireService {
                name: "users".into(),
                route: "/users".into(),
                endpoints: vec![WireEndpoint {
                    instance: "i-1".into(),
                    address: [127, 42, 1, 4].into(),
                    port: 8080,
                    zone: "a".into(),
                    state: WireState::Healthy,
                }],
            }],
        }
    }

    fn remove_users(epoch: Epoch, base: Revision, revision: Revision) -> Message {
        Message::Delta {
            protocol: PROTOCOL,
            epoch,
            revision,
            base,
            changes: vec![WireChange::RemoveService {
                name: "users".into(),
            }],
        }
    }

    #[test]
    fn apply_rejects_a_base_mismatch_and_keeps_what_it_had() {
        let mut mirror = Mirror::default();
        assert_eq!(
            mirror.apply(remove_users(E1, 0, 1)),
            Err(WireError::EpochMismatch {
                got: E1,
                have: None
            }),
            "a delta before any snapshot"
        );
        mirror.apply(users_snapshot(E1, 5)).unwrap();
        let before = mirror.clone();
        assert_eq!(
            mirror.apply(remove_users(E1, 4, 6)),
            Err(WireError::BaseMismatch {
                base: 4,
                have: Some(5)
            })
        );
        assert_eq!(mirror, before);
        let bad = Message::Delta {
            protocol: PROTOCOL,
            epoch: E1,
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
        assert_eq!(mirror.apply(remove_users(E1, 5, 6)), Ok(true));
        assert!(mirror.services.is_empty());
    }

    #[test]
    fn a_snapshot_of_a_new_epoch_replaces_the_table_even_when_its_revision_is_lower() {
        let mut mirror = Mirror::default();
        mirror.apply(users_snapshot(E1, 20)).unwrap();
        assert_eq!(mirror.apply(users_snapshot(E2, 1)), Ok(true));
        assert_eq!((mirror.epoch, mirror.revision), (Some(E2), Some(1)));
    }

    #[test]
    fn within_one_epoch_a_backwards_revision_is_a_protocol_error() {
        let mut mirror = Mirror::default();
        mirror.apply(users_snapshot(E1, 20)).unwrap();
        let before = mirror.clone();
        assert_eq!(
            mirror.apply(users_snapshot(E1, 19)),
            Err(WireError::RevisionBackwards {
                epoch: E1,
                got: 19,
                have: 20
            })
        );
        assert_eq!(
            mirror.apply(remove_users(E1, 20, 20)),
            Err(WireError::RevisionBackwards {
                epoch: E1,
                got: 20,
                have: 20
            }),
            "a delta must move forwards"
        );
        assert_eq!(mirror, before);
        assert_eq!(mirror.apply(users_snapshot(E1, 20)), Ok(true), "a resend");
    }

    #[test]
    fn a_delta_of_another_epoch_is_refused() {
        let mut mirror = Mirror::default();
        mirror.apply(users_snapshot(E1, 5)).unwrap();
        let before = mirror.clone();
        assert_eq!(
            mirror.apply(remove_users(E2, 5, 6)),
            Err(WireError::EpochMismatch {
                got: E2,
                have: Some(E1)
            })
        );
        assert_eq!(mirror, before);
    }

    #[test]
    fn epochs_fit_a_double_and_are_never_zero() {
        assert_eq!(Epoch::from_bits(u64::MAX).get(), (1 << 53) - 1);
        assert_eq!(Epoch::from_bits(1 << 53).get(), 1);
        let line = serde_json::to_string(&Ack {
            epoch: Epoch::from_bits(7),
            revision: 3,
            in_flight: BTreeMap::new(),
            ejected: vec![],
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"epoch":7,"revision":3,"in_flight":{},"ejected":[]}"#
        );
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let mut mirror = Mirror::default();
        let line = br#"{"type":"snapshot","protocol":1,"epoch":1,"revision":1,"services":[]}"#;
        let message = Message::from_line(line).unwrap();
        assert_eq!(
            mirror.apply(message),
            Err(WireError::ProtocolMismatch { got: 1 })
        );
        assert_eq!(mirror.revision, None);
        assert!(matches!(
            Message::from_line(b"{\"type\":\"snapshot\""),
            Err(WireError::Malformed { .. })
        ));
    }
}
