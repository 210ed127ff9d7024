//! The Load Reporting Service: Envoy tells, every second, how many requests
//! it has in flight to each endpoint (`total_requests_in_progress` with
//! `report_endpoint_granularity`), which is what a terminate hook waits on.
//! Endpoints are named by address in a report: they are mapped back to
//! instances through the registry.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::{
    load_reporting_service_server::LoadReportingService, LoadStatsRequest, LoadStatsResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::ads::Responses;
use crate::auth::{Action, Gate};
use crate::listener::Peer;
use crate::model::Snapshot;
use crate::routers::Routers;

/// Envoy reports this often. Short, since a drain waits for a report newer
/// than the ACK of the draining version.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Lrs {
    pub registry: watch::Receiver<Arc<Snapshot>>,
    pub routers: Arc<Routers>,
    pub stop: CancellationToken,
    /// A report, like an ACK, counts only from the node itself.
    pub gate: Arc<Gate>,
}

/// Requests in flight by service and instance, from one report. Endpoints
/// signpost does not know (gone from the registry) and zero counts are left
/// out.
pub fn in_flight(
    stats: &[ClusterStats],
    snapshot: &Snapshot,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for cluster in stats {
        let Some(service) = snapshot.services.get(&cluster.cluster_name) else {
            continue;
        };
        let endpoints = cluster
            .upstream_locality_stats
            .iter()
            .flat_map(|l| &l.upstream_endpoint_stats);
        for e in endpoints {
            if e.total_requests_in_progress == 0 {
                continue;
            }
            let Some(at) = e
                .address
                .as_ref()
                .and_then(|a| socket_of(a.address.as_ref()?))
            else {
                continue;
            };
            let instance = service
                .endpoints
                .values()
                .find(|ep| ep.address == at.ip() && ep.port == at.port());
            if let Some(instance) = instance {
                // Saturating, as `RouterRecord::in_flight_to`: one endpoint
                // reported in two localities must not wrap to 0 (drained).
                let count = out
                    .entry(service.name.clone())
                    .or_default()
                    .entry(instance.instance_id.to_string())
                    .or_default();
                *count = count.saturating_add(e.total_requests_in_progress);
            }
        }
    }
    out
}

fn socket_of(a: &address::Address) -> Option<SocketAddr> {
    let address::Address::SocketAddress(s) = a else {
        return None;
    };
    let ip: IpAddr = s.address.parse().ok()?;
    let Some(PortSpecifier::PortValue(port)) = s.port_specifier else {
        return None;
    };
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}

impl Lrs {
    async fn serve(
        self: Arc<Self>,
        (peer, authorization): (Peer, Option<String>),
        mut inbound: Streaming<LoadStatsRequest>,
        tx: mpsc::Sender<Result<LoadStatsResponse, Status>>,
    ) {
        let mut id: Option<String> = None;
        loop {
            let message = tokio::select! {
                m = inbound.message() => m,
                _ = self.stop.cancelled() => return,
            };
            let request = match message {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(status) => {
                    debug!(router = ?id, error = %status, "LRS stream broken");
                    return;
                }
            };
            let id = match &id {
                Some(id) => id.clone(),
                None => {
                    let Some(node) = request.node.as_ref().filter(|n| !n.id.is_empty()) else {
                        warn!("LRS stream refused: the first request has no node.id");
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "the first LoadStatsRequest must carry node.id",
                            )))
                            .await;
                        return;
                    };
                    // A report is the in-flight half of an ack: only the
                    // node itself may make it.
                    let action = Action::Ack {
                        router: node.id.clone(),
                    };
                    let admitted =
                        self.gate
                            .admit(&peer, authorization.as_deref(), &action, "xds lrs");
                    if let Err(refusal) = admitted {
                        let _ = tx.send(Err(super::refused(&refusal))).await;
                        return;
                    }
                    id = Some(node.id.clone());
                    let ask = LoadStatsResponse {
                        send_all_clusters: true,
                        load_reporting_interval: Some(
                            envoy_types::pb::google::protobuf::Duration {
                                seconds: REPORT_INTERVAL.as_secs() as i64,
                                nanos: REPORT_INTERVAL.subsec_nanos() as i32,
                            },
                        ),
                        report_endpoint_granularity: true,
                        ..Default::default()
                    };
                    if tx.send(Ok(ask)).await.is_err() {
                        return;
                    }
                    // The first message only names the node: no report yet.
                    continue;
                }
            };
            let snapshot = self.registry.borrow().clone();
            let counts = in_flight(&request.cluster_stats, &snapshot);
            if !self.routers.load_reported(&id, counts) {
                debug!(router = %id, "load report from a client not connected over ADS as Envoy; ignored");
            }
        }
    }
}

pub struct LrsService(pub Arc<Lrs>);

#[tonic::async_trait]
impl LoadReportingService for LrsService {
    type StreamLoadStatsStream = Responses<LoadStatsResponse>;

    async fn stream_load_stats(
        &self,
        request: Request<Streaming<LoadStatsRequest>>,
    ) -> Result<Response<Self::StreamLoadStatsStream>, Status> {
        let (tx, rx) = mpsc::channel(2);
        let caller = super::caller_of(&request);
        tokio::spawn(self.0.clone().serve(caller, request.into_inner(), tx));
        Ok(Response::new(Responses::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointState, HealthCheck, Service, ServiceSettings};
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        UpstreamEndpointStats, UpstreamLocalityStats,
    };
    use std::collections::BTreeSet;
    use std::time::SystemTime;

    #[test]
    fn counts_of_one_endpoint_in_two_localities_saturate_rather_than_wrap() {
        let endpoint = Endpoint {
            instance_id: "i-1".into(),
            address: [10, 0, 0, 1].into(),
            port: 8080,
            zone: "a".into(),
            group: "g".into(),
            state: EndpointState::Draining,
            since: SystemTime::UNIX_EPOCH,
        };
        let service = Service {
            name: "users".into(),
            settings: ServiceSettings {
                route: "/users".into(),
                port: 8080,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::new(),
            endpoints: [(endpoint.instance_id.clone(), endpoint)]
                .into_iter()
                .collect(),
        };
        let snapshot = Snapshot {
            revision: 1,
            services: [("users".to_string(), Arc::new(service))]
                .into_iter()
                .collect(),
            problems: BTreeMap::new(),
        };
        let locality = |n| UpstreamLocalityStats {
            upstream_endpoint_stats: vec![UpstreamEndpointStats {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "10.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(8080)),
                        ..Default::default()
                    })),
                }),
                total_requests_in_progress: n,
                ..Default::default()
            }],
            ..Default::default()
        };
        let report = [ClusterStats {
            cluster_name: "users".into(),
            upstream_locality_stats: vec![locality(u64::MAX), locality(1)],
            ..Default::default()
        }];
        assert_eq!(in_flight(&report, &snapshot)["users"]["i-1"], u64::MAX);
    }
}
