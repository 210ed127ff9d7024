//! The registry: services → endpoints, the single writer of endpoint state.
//!
//! Readers never lock: they hold an `Arc<Snapshot>` from a `watch` channel.
//! Every batch of changes that alters anything publishes a new snapshot with
//! the revision bumped by one; a batch that alters nothing publishes nothing.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tracing::{debug, info};

use crate::model::{Change, EndpointState, Revision, Service, Snapshot};

pub struct Registry {
    /// `send_if_modified` serializes writers, so the reconcile loop and the
    /// health scheduler can both apply changes without a lock of our own.
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Applies a batch; returns the new revision if anything changed.
    pub fn apply(&self, changes: &[Change], now: SystemTime) -> Option<Revision> {
        if changes.is_empty() {
            return None;
        }
        let mut revision = None;
        self.tx.send_if_modified(|current| {
            let mut next = Snapshot::clone(current);
            let changed = changes
                .iter()
                .fold(false, |acc, c| apply_one(&mut next, c, now) | acc);
            if changed {
                next.revision += 1;
                revision = Some(next.revision);
                *current = Arc::new(next);
            }
            changed
        });
        revision
    }
}

/// Applies one change; says whether it altered the snapshot.
fn apply_one(snap: &mut Snapshot, change: &Change, now: SystemTime) -> bool {
    match change {
        Change::PutService {
            name,
            settings,
            groups,
        } => match snap.services.get_mut(name) {
            Some(s) if s.settings == *settings && s.groups == *groups => false,
            Some(s) => {
                let s = Arc::make_mut(s);
                s.settings = settings.clone();
                s.groups = groups.clone();
                true
            }
            None => {
                info!(service = %name, route = %settings.route, "service added");
                snap.services.insert(
                    name.clone(),
                    Arc::new(Service {
                        name: name.clone(),
                        settings: settings.clone(),
                        groups: groups.clone(),
                        endpoints: Default::default(),
                    }),
                );
                true
            }
        },
        Change::RemoveService { name } => {
            let removed = snap.services.remove(name).is_some();
            if removed {
                info!(service = %name, "service removed");
            }
            removed
        }
        Change::AddEndpoint { service, endpoint } => {
            let Some(s) = snap.services.get_mut(service) else {
                debug!(%service, "endpoint for unknown service skipped");
                return false;
            };
            if s.endpoints.contains_key(&endpoint.instance_id) {
                return false;
            }
            let mut endpoint = endpoint.clone();
            endpoint.state = EndpointState::Starting;
            endpoint.since = now;
            info!(%service, instance = %endpoint.instance_id, address = %endpoint.address, "endpoint registered");
            Arc::make_mut(s)
                .endpoints
                .insert(endpoint.instance_id.clone(), endpoint);
            true
        }
        Change::RemoveEndpoint {
            service,
            instance,
            reason,
        } => {
            let Some(s) = snap.services.get_mut(service) else {
                return false;
            };
            if !s.endpoints.contains_key(instance) {
                return false;
            }
            info!(%service, %instance, reason, "endpoint removed");
            Arc::make_mut(s).endpoints.remove(instance);
            true
        }
        Change::SetState {
            service,
            instance,
            address,
            port,
            state,
        } => {
            let Some(s) = snap.services.get_mut(service) else {
                return false;
            };
            // Draining is left only by removal: a late health verdict must
            // not put a terminating instance back into routing.
            match s.endpoints.get(instance) {
                Some(e)
                    if e.address == *address
                        && e.port == *port
                        && e.state != *state
                        && e.state != EndpointState::Draining => {}
                _ => return false,
            }
            let e = Arc::make_mut(s)
                .endpoints
                .get_mut(instance)
                .expect("checked above");
            info!(%service, %instance, from = ?e.state, to = ?state, "endpoint health changed");
            e.state = *state;
            e.since = now;
            true
        }
        Change::SetProblems(problems) => {
            if snap.problems == *problems {
                return false;
            }
            snap.problems = problems.clone();
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, HealthCheck, InstanceId, ServiceSettings};
    use std::collections::BTreeSet;

    fn put(name: &str) -> Change {
        Change::PutService {
            name: name.into(),
            settings: ServiceSettings {
                route: format!("/{name}"),
                port: 80,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::from(["g".to_string()]),
        }
    }

    fn add(service: &str, id: &str) -> Change {
        Change::AddEndpoint {
            service: service.into(),
            endpoint: Endpoint {
                instance_id: id.into(),
                address: [127, 42, 1, 4].into(),
                port: 80,
                zone: "a".into(),
                group: "g".into(),
                state: EndpointState::Healthy,
                since: SystemTime::UNIX_EPOCH,
            },
        }
    }

    #[test]
    fn each_changing_batch_bumps_the_revision_once_and_notifies() {
        let r = Registry::new();
        let mut rx = r.subscribe();
        let now = SystemTime::now();
        assert_eq!(r.apply(&[put("users"), add("users", "i-1")], now), Some(1));
        assert!(rx.has_changed().unwrap());
        let snap = rx.borrow_and_update().clone();
        let e = snap.endpoint("users", &InstanceId::from("i-1")).unwrap();
        assert_eq!(
            e.state,
            EndpointState::Starting,
            "new endpoints never start healthy"
        );
        assert_eq!(e.since, now);

        // The same batch again changes nothing: no revision, no wake-up.
        assert_eq!(r.apply(&[put("users"), add("users", "i-1")], now), None);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn state_changes_only_apply_to_the_same_address() {
        let r = Registry::new();
        let now = SystemTime::now();
        r.apply(&[put("users"), add("users", "i-1")], now);
        let set = |address: [u8; 4]| Change::SetState {
            service: "users".into(),
            instance: "i-1".into(),
            address: address.into(),
            port: 80,
            state: EndpointState::Healthy,
        };
        assert_eq!(r.apply(&[set([127, 0, 0, 9])], now), None);
        assert_eq!(r.apply(&[set([127, 42, 1, 4])], now), Some(2));
        let snap = r.snapshot();
        assert_eq!(
            snap.endpoint("users", &"i-1".into()).unwrap().state,
            EndpointState::Healthy
        );
    }

    #[test]
    fn draining_is_left_only_by_removal() {
        let r = Registry::new();
        let now = SystemTime::now();
        r.apply(&[put("users"), add("users", "i-1")], now);
        let set = |state| Change::SetState {
            service: "users".into(),
            instance: "i-1".into(),
            address: [127, 42, 1, 4].into(),
            port: 80,
            state,
        };
        assert!(r.apply(&[set(EndpointState::Draining)], now).is_some());
        assert_eq!(r.apply(&[set(EndpointState::Healthy)], now), None);
        let snap = r.snapshot();
        let e = snap.endpoint("users", &"i-1".into()).unwrap();
        assert_eq!(e.state, EndpointState::Draining);
    }

    #[test]
    fn unchanged_services_are_shared_between_snapshots() {
        let r = Registry::new();
        let now = SystemTime::now();
        r.apply(&[put("a"), put("b"), add("a", "i-1")], now);
        let before = r.snapshot();
        r.apply(&[add("a", "i-2")], now);
        let after = r.snapshot();
        assert!(Arc::ptr_eq(&before.services["b"], &after.services["b"]));
        assert_eq!(after.services["a"].endpoints.len(), 2);
        assert_eq!(
            before.services["a"].endpoints.len(),
            1,
            "old snapshots never change"
        );
    }
}
