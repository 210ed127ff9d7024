//! The Aggregated Discovery Service, state of the world: one task per
//! stream sends each client what it subscribes to, in make-before-break
//! order, and records its ACKs and NACKs into `routers::Routers`.
//!
//! A client has applied revision R when it has ACKed, for every type it
//! subscribes to, the newest response of that type, and that response is
//! what R gives it. A type whose resources did not change in R is not sent
//! again: its last ACKed response already is R's.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::resources::{ordered, Balancing, ResourceSet, Resources, Subscription};
use super::{ResourceType, Version};
use crate::auth::{Action, Credential, Gate};
use crate::lease::{self, Leadership};
use crate::listener::Peer;
use crate::metrics::Histogram;
use crate::model::Revision;
use crate::routers::{Nack, RouterKind, Routers};

/// Responses queued per stream before its task waits. While it waits,
/// `watch` coalesces revisions: a slow client gets the newest state, not a
/// backlog.
const QUEUE: usize = 8;

/// Counters and histograms for `/metrics`.
#[derive(Default)]
pub struct XdsMetrics {
    /// NACKs, by type label.
    pub nacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests that could not be used: no node id, unknown type URL.
    pub bad_requests: Mutex<BTreeMap<&'static str, u64>>,
    /// From a response written to its ACK.
    pub push_to_ack: Mutex<Histogram>,
    pub responses: AtomicU64,
}

impl XdsMetrics {
    fn count(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str) {
        *map.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// The ADS service. Resources are `None` until the registry has warmed up:
/// a client is listed but sent nothing, and keeps what it has (an Envoy
/// reconnecting to a restarted controller must not swap its clusters for
/// an empty set).
pub struct Ads {
    pub resources: watch::Receiver<Option<Arc<Resources>>>,
    pub routers: Arc<Routers>,
    pub metrics: Arc<XdsMetrics>,
    pub stop: CancellationToken,
    /// Only the leader serves (see `lease`): a follower refuses streams as
    /// UNAVAILABLE, so that a client with several controller addresses
    /// retries another, and the leader ends its streams when its term ends.
    pub leadership: watch::Receiver<Leadership>,
    /// The API's gate: a stream's node id must be its client's identity
    /// (certificate or token), since its ACKs hold lifecycle hooks.
    pub gate: Arc<Gate>,
}

/// How a node says what it is: Envoy sets `user_agent_name` to `envoy`,
/// gRPC to `gRPC <language>`. Anything else is served like Envoy (it gets
/// what it asks for) but counted as Envoy only when it says so.
pub fn kind_of(node: &Node) -> RouterKind {
    let agent = node.user_agent_name.to_ascii_lowercase();
    if agent.contains("grpc") {
        RouterKind::Grpc
    } else {
        RouterKind::Envoy
    }
}

/// One type on one stream.
#[derive(Default)]
struct TypeState {
    subscription: Option<Subscription>,
    /// What the newest response carried (the final set, after any
    /// make-before-break step).
    sent: Option<ResourceSet>,
    /// The newest response's nonce, version and when it was written.
    nonce: u64,
    sent_revision: Revision,
    sent_at: Option<Instant>,
    /// The newest revision whose resources of this type are `sent`.
    covers: Revision,
    /// The nonce and revision of its newest ACK.
    acked: Option<(u64, Revision)>,
}

impl TypeState {
    /// The newest revision it has for this type, if any.
    fn applied(&self) -> Option<Revision> {
        match self.acked {
            Some((nonce, _)) if nonce == self.nonce => Some(self.covers),
            Some((_, revision)) => Some(revision),
            None => None,
        }
    }
}

/// One client's stream.
struct Stream {
    id: String,
    balancing: Balancing,
    connection: u64,
    routers: Arc<Routers>,
    metrics: Arc<XdsMetrics>,
    types: BTreeMap<ResourceType, TypeState>,
    next_nonce: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

/// Why a stream ended early.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("the client went away")]
    Gone,
}

impl Stream {
    fn version(&self, revision: Revision) -> String {
        Version {
            epoch: self.routers.epoch(),
            revision,
        }
        .to_string()
    }

    async fn send(
        &mut self,
        kind: ResourceType,
        set: ResourceSet,
        revision: Revision,
    ) -> Result<(), StreamEnd> {
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        let response = DiscoveryResponse {
            version_info: self.version(revision),
            resources: set.values().cloned().collect(),
            type_url: kind.type_url().into(),
            nonce: nonce.to_string(),
            ..Default::default()
        };
        self.tx
            .send(Ok(response))
            .await
            .map_err(|_| StreamEnd::Gone)?;
        self.metrics.responses.fetch_add(1, Ordering::Relaxed);
        let state = self.types.entry(kind).or_default();
        state.sent = Some(set);
        state.nonce = nonce;
        state.sent_revision = revision;
        state.covers = revision;
        state.sent_at = Some(Instant::now());
        let version = self.version(revision);
        self.routers.xds_status(&self.id, self.connection, |x| {
            x.types.entry(kind.label()).or_default().sent_version = Some(version);
        });
        Ok(())
    }

    /// Brings every subscribed type (or just `only`) to `resources`.
    async fn bring_to(
        &mut self,
        resources: &Resources,
        only: Option<ResourceType>,
    ) -> Result<(), StreamEnd> {
        let mut sent = BTreeMap::new();
        let mut next = BTreeMap::new();
        for (&kind, state) in &self.types {
            if only.is_some_and(|o| o != kind) {
                continue;
            }
            let Some(subscription) = &state.subscription else {
                continue;
            };
            if let Some(s) = &state.sent {
                sent.insert(kind, s.clone());
            }
            next.insert(kind, resources.view(kind, subscription, self.balancing));
        }
        let steps = ordered(&sent, &next);
        for (kind, set) in steps {
            self.send(kind, set, resources.revision).await?;
        }
        // Types that needed nothing have R's resources already.
        for kind in next.keys() {
            let state = self.types.get_mut(kind).expect("subscribed");
            state.covers = resources.revision;
        }
        self.routers
            .sent(&self.id, self.connection, resources.revision);
        self.report_applied();
        Ok(())
    }

    /// Tells `Routers` the newest revision it has for every type it
    /// subscribes to.
    fn report_applied(&self) {
        let subscribed = self.types.values().filter(|t| t.subscription.is_some());
        let applied = subscribed.map(TypeState::applied).min().flatten();
        if let Some(revision) = applied {
            let _ = self
                .routers
                .xds_applied(&self.id, self.routers.epoch(), revision);
        }
    }

    /// One request: an ACK, a NACK, a subscription, or several at once.
    async fn request(
        &mut self,
        request: DiscoveryRequest,
        resources: Option<&Resources>,
    ) -> Result<(), StreamEnd> {
        let Some(kind) = ResourceType::from_type_url(&request.type_url) else {
            warn!(router = %self.id, type_url = %request.type_url, "xDS request for a type signpost does not serve; ignored");
            XdsMetrics::count(&self.metrics.bad_requests, "unknown_type");
            return Ok(());
        };
        let epoch = self.routers.epoch();
        let state = self.types.entry(kind).or_default();
        if !request.response_nonce.is_empty() {
            if request.response_nonce != state.nonce.to_string() {
                // A reply to a response superseded since: the protocol says
                // to ignore it, the reply to the newest one will follow.
                debug!(router = %self.id, %kind, nonce = %request.response_nonce, "stale nonce; ignored");
                return Ok(());
            }
            let version = Version {
                epoch,
                revision: state.sent_revision,
            }
            .to_string();
            if let Some(error) = &request.error_detail {
                XdsMetrics::count(&self.metrics.nacks, kind.label());
                warn!(router = %self.id, %kind, version = %version, code = error.code, error = %error.message, "xDS client rejected a response (NACK); it keeps what it had");
                let nack = Nack {
                    type_url: request.type_url.clone(),
                    version,
                    message: error.message.clone(),
                    at: SystemTime::now(),
                };
                self.routers.xds_status(&self.id, self.connection, |x| {
                    x.last_nack = Some(nack);
                    x.nacks += 1;
                });
            } else if Version::parse(&request.version_info)
                .is_some_and(|v| v.epoch == epoch && v.revision == state.sent_revision)
            {
                state.acked = Some((state.nonce, state.sent_revision));
                if let Some(at) = state.sent_at.take() {
                    self.metrics
                        .push_to_ack
                        .lock()
                        .unwrap()
                        .observe_ms(at.elapsed().as_millis() as u64);
                }
                self.routers.xds_status(&self.id, self.connection, |x| {
                    x.types.entry(kind.label()).or_default().acked_version = Some(version);
                });
            } else {
                warn!(router = %self.id, %kind, version_info = %request.version_info, expected = %version, "ACK with the newest nonce but another version; not counted");
            }
        }
        let subscription = Subscription::from_names(&request.resource_names);
        let state = self.types.get_mut(&kind).expect("inserted above");
        let changed = state.subscription.as_ref() != Some(&subscription);
        if changed {
            let shown = match &subscription {
                Subscription::Wildcard => vec!["*".to_string()],
                Subscription::Named(names) => names.iter().cloned().collect(),
            };
            self.routers.xds_status(&self.id, self.connection, |x| {
                x.types.entry(kind.label()).or_default().subscribed = shown;
            });
            state.subscription = Some(subscription);
            if let Some(resources) = resources {
                // A new subscription is answered even when the set is the
                // same: the client waits for a response.
                if state.sent.is_none() || request.response_nonce.is_empty() {
                    state.sent = None;
                }
                self.bring_to(resources, Some(kind)).await?;
            }
        }
        self.report_applied();
        Ok(())
    }
}

impl Ads {
    async fn serve(
        self: Arc<Self>,
        (peer, authorization): (Peer, Option<String>),
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let first = tokio::select! {
            first = inbound.message() => first,
            _ = self.stop.cancelled() => return,
        };
        let first = match first {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(status) => {
                debug!(address = %peer.address, error = %status, "xDS stream ended before its first request");
                return;
            }
        };
        let Some(node) = first
            .node
            .clone()
            .filter(|n| !n.id.is_empty() && n.id.len() <= 253)
        else {
            warn!(address = %peer.address, "xDS stream refused: the first request has no node.id (1 to 253 characters)");
            XdsMetrics::count(&self.metrics.bad_requests, "no_node_id");
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first DiscoveryRequest must carry node.id (1 to 253 characters): signpost counts each client by it",
                )))
                .await;
            return;
        };
        let action = Action::Subscribe {
            router: node.id.clone(),
        };
        let admitted = self
            .gate
            .admit(&peer, authorization.as_deref(), &action, "xds ads")
            .and_then(|caller| {
                let slot = self
                    .gate
                    .hold_subscription(&caller, &node.id, &peer, "xds ads")?;
                Ok((caller, slot))
            });
        // The slot is held for as long as the stream is served.
        let (caller, _slot) = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let _ = tx.send(Err(super::refused(&refusal))).await;
                return;
            }
        };
        let address = peer.address;
        let kind = kind_of(&node);
        let connection = self.routers.connect_kind(&node.id, address, kind);
        // As the NDJSON hub does: the identity goes into `/v1/routers` and
        // into the audit of each lifecycle completion its acks justify.
        if caller.credential != Credential::None {
            self.routers
                .identify(&node.id, connection, &caller.identity);
        }
        info!(router = %node.id, %address, ?kind, agent = %node.user_agent_name, "xDS client connected");
        let mut stream = Stream {
            id: node.id.clone(),
            balancing: match kind {
                RouterKind::Grpc => Balancing::RoundRobin,
                _ => Balancing::LeastRequest,
            },
            connection,
            routers: self.routers.clone(),
            metrics: self.metrics.clone(),
            types: BTreeMap::new(),
            next_nonce: 0,
            tx,
        };
        let mut resources = self.resources.clone();
        let mut current = resources.borrow_and_update().clone();
        let mut leadership = self.leadership.clone();
        let ended = async {
            stream.request(first, current.as_deref()).await?;
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(request)) => stream.request(request, current.as_deref()).await?,
                        Ok(None) => return Ok(()),
                        Err(status) => {
                            debug!(router = %stream.id, error = %status, "xDS stream broken");
                            return Ok(());
                        }
                    },
                    changed = resources.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        current = resources.borrow_and_update().clone();
                        if let Some(r) = &current {
                            stream.bring_to(r, None).await?;
                        }
                    }
                    _ = stream.tx.closed() => return Ok(()),
                    _ = lease::stopped_leading(&mut leadership) => return Ok(()),
                    _ = self.stop.cancelled() => return Ok(()),
                }
            }
        };
        let ended: Result<(), StreamEnd> = ended.await;
        if let Err(e) = ended {
            debug!(router = %node.id, error = %e, "xDS stream ended");
        }
        self.routers.disconnect(&node.id, connection);
    }
}

/// The response side of a stream: whatever its task queues.
pub struct Responses<T>(mpsc::Receiver<Result<T, Status>>);

impl<T> Responses<T> {
    pub fn new(rx: mpsc::Receiver<Result<T, Status>>) -> Responses<T> {
        Responses(rx)
    }
}

impl<T> tonic::codegen::tokio_stream::Stream for Responses<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// `Arc<Ads>` so that each stream's task holds the service.
pub struct AdsService(pub Arc<Ads>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let caller = super::caller_of(&request);
        let leadership = self.0.leadership.borrow().clone();
        if !leadership.is_leader() {
            let leader = leadership.leader_address().unwrap_or("not known yet");
            return Err(Status::unavailable(format!(
                "this controller is not the leader (the leader's API: {leader}); connect to another replica"
            )));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(self.0.clone().serve(caller, request.into_inner(), tx));
        Ok(Response::new(Responses::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "signpost serves state-of-the-world ADS only: set ads_config.api_type to GRPC, not DELTA_GRPC",
        ))
    }
}
