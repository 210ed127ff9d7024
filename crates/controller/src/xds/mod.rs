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
mod version;

pub use version::Version;

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_server::LoadReportingServiceServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::Status;

use crate::auth::Refusal;
use crate::listener::{ApiListener, Io, Peer};
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

/// Serves ADS and LRS on `listener` (the API's kind: TLS when `tls.cert`
/// is set, handshakes off the accept loop) until `stop`.
pub async fn serve(
    listener: ApiListener,
    ads: Arc<ads::Ads>,
    lrs: Arc<lrs::Lrs>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(ads::AdsService(ads)))
        .add_service(LoadReportingServiceServer::new(lrs::LrsService(lrs)))
        .serve_with_incoming_shutdown(Incoming(listener), stop.cancelled_owned())
        .await
}

/// The listener's connections as the stream tonic serves.
struct Incoming(ApiListener);

impl tonic::codegen::tokio_stream::Stream for Incoming {
    type Item = Result<Connection, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0
            .poll_accept(cx)
            .map(|(io, peer)| Some(Ok(Connection { io, peer })))
    }
}

/// A connection with its [`Peer`], which tonic puts in each request's
/// extensions: the streams take the client's identity from there.
struct Connection {
    io: Io,
    peer: Peer,
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Who opened a stream: the connection's peer and the `authorization`
/// metadata (a bearer token), for `auth::Gate::admit`.
pub fn caller_of<T>(request: &tonic::Request<T>) -> (Peer, Option<String>) {
    let peer = request.extensions().get::<Peer>().cloned().unwrap_or(Peer {
        address: SocketAddr::from(([0, 0, 0, 0], 0)),
        certificate: None,
    });
    let authorization = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (peer, authorization)
}

/// A refused stream's status: PERMISSION_DENIED when the node id is not
/// the client's identity, with the refusal's text naming both.
pub fn refused(refusal: &Refusal) -> Status {
    let text = format!("xDS stream refused: {refusal}");
    match refusal {
        Refusal::NoCredentials | Refusal::UnknownToken => Status::unauthenticated(text),
        Refusal::BadId { .. } => Status::invalid_argument(text),
        Refusal::TooManySubscriptions { .. } | Refusal::RateLimited { .. } => {
            Status::resource_exhausted(text)
        }
        _ => Status::permission_denied(text),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_that_is_not_the_clients_identity_is_permission_denied_naming_both() {
        let refusal = Refusal::NotItself {
            router: "envoy-1".into(),
            identity: "envoy-2".into(),
            credential: "client certificate",
            what: "subscribe",
        };
        let status = refused(&refusal);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("\"envoy-1\"") && status.message().contains("\"envoy-2\""),
            "{}",
            status.message()
        );
        assert_eq!(
            refused(&Refusal::NoCredentials).code(),
            tonic::Code::Unauthenticated
        );
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
