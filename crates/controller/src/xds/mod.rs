//! The xDS management server: Envoy and proxyless gRPC clients as routers,
//! held to the same confirmed-delivery contract as signpost's own.
//!
//! ```text
//!  registry ──watch──► resources:: Resources::from_snapshot (pure)
//!                          │ watch (one Arc<Resources> per registry revision)
//!                          ▼
//!                      ads:: one task per ADS stream (state of the world):
//!                          │  what this client subscribes to, in
//!                          │  make-before-break order; its ACKs and NACKs
//!                          ▼
//!                      routers::Routers ◄── lrs:: in flight per endpoint (Envoy)
//! ```
//!
//! What to send is apart from how it is sent (as in go-control-plane's
//! cache and server): `resources` derives every resource from a registry
//! snapshot and knows nothing of streams; `ads` streams them and records
//! what each client ACKed into `routers::Routers`, which lifecycle hooks
//! wait on whatever the router kind.
//!
//! Versions: every response's `version_info` is `<epoch>-<revision>`, the
//! controller lifetime and the registry revision it was built from. An ACK
//! counts only with the nonce of the newest response of its type on the
//! same stream, and only for this controller's epoch: a client reconnecting
//! with a version a previous controller sent never counts.

pub mod ads;
pub mod lrs;
pub mod resources;

use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::LoadReportingServiceServer;
use signpost_protocol::{Epoch, Revision};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::model::Snapshot;

/// Keeps `tx` at the resources of the newest registry snapshot, from when
/// routers are served (`ready`) until `stop`. One derivation per revision,
/// shared by every stream.
pub async fn publish(
    mut registry: watch::Receiver<Arc<Snapshot>>,
    settings: resources::Settings,
    mut ready: watch::Receiver<Option<Instant>>,
    tx: watch::Sender<Option<Arc<resources::Resources>>>,
    stop: CancellationToken,
) {
    tokio::select! {
        r = ready.wait_for(Option::is_some) => if r.is_err() { return },
        _ = stop.cancelled() => return,
    }
    loop {
        let snapshot = registry.borrow_and_update().clone();
        let derived = resources::Resources::from_snapshot(&snapshot, &settings);
        tx.send_if_modified(|current| {
            if current.as_deref() == Some(&derived) {
                return false;
            }
            *current = Some(Arc::new(derived));
            true
        });
        tokio::select! {
            changed = registry.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

/// Serves ADS and LRS on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    ads: Arc<ads::Ads>,
    lrs: Arc<lrs::Lrs>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    info!(listen = ?listener.local_addr().ok(), "xDS server (ADS, LRS) listening");
    tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(ads::AdsService(ads)))
        .add_service(LoadReportingServiceServer::new(lrs::LrsService(lrs)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            stop.cancelled_owned(),
        )
        .await
}

/// The resource types signpost serves, in make-before-break order: a
/// listener or route is sent only after the clusters and endpoints it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Cluster,
    Endpoints,
    Listener,
    Route,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoints,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoints => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs, metric labels and `/v1/routers`.
    pub fn label(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoints => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A response's `version_info`: the controller lifetime and the registry
/// revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub epoch: Epoch,
    pub revision: Revision,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.revision)
    }
}

impl Version {
    /// Reads a `version_info`; `None` for anything signpost did not write
    /// (empty on a first request, another control plane's).
    pub fn parse(text: &str) -> Option<Version> {
        let (epoch, revision) = text.split_once('-')?;
        let epoch: u64 = epoch.parse().ok()?;
        if Epoch::from_bits(epoch).get() != epoch {
            return None;
        }
        Some(Version {
            epoch: Epoch::from_bits(epoch),
            revision: revision.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_back_and_foreign_ones_do_not_parse() {
        let v = Version {
            epoch: Epoch::from_bits(77),
            revision: 12,
        };
        assert_eq!(Version::parse(&v.to_string()), Some(v));
        for foreign in ["", "12", "x-1", "1-x", "0-3", "1-2-3"] {
            assert_eq!(Version::parse(foreign), None, "{foreign:?}");
        }
    }

    #[test]
    fn type_urls_round_trip_and_order_is_make_before_break() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/x.Y"), None);
        let mut sorted = ResourceType::ALL;
        sorted.sort();
        assert_eq!(sorted, ResourceType::ALL);
    }
}
