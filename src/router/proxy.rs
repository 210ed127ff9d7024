//! The reverse proxy: HTTP/1.1 in, HTTP/1.1 out over kept-alive connections
//! to the endpoints, bodies streamed both ways.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::balance::Balance;
use super::table::{Backend, Outcome, RouteTable};

/// How long in-flight requests may finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

pub struct Proxy {
    table: Arc<ArcSwap<RouteTable>>,
    client: Client<HttpConnector, UpstreamBody>,
    balance: Balance,
    response_timeout: Duration,
    /// Wakes the ack reporter when passive health ejects an endpoint, so the
    /// controller hears of it at once rather than at the next tick.
    ejected: Arc<Notify>,
}

impl Proxy {
    pub fn new(
        table: Arc<ArcSwap<RouteTable>>,
        balance: Balance,
        connect_timeout: Duration,
        response_timeout: Duration,
        ejected: Arc<Notify>,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Proxy {
            table,
            client,
            balance,
            response_timeout,
            ejected,
        }
    }

    /// Accepts connections until `stop`, then lets open requests finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: back off
                        // rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::stopped(&mut stop) => break,
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, %peer, "client connection ended");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still open after {DRAIN:?}; closing them");
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let service = {
            let table = self.table.load();
            if table.revision.is_none() {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "router has no routes yet\n".into(),
                );
            }
            match table.lookup(req.uri().path()) {
                Some(s) => s.clone(),
                None => {
                    let body = format!("no route for {}\n", req.uri().path());
                    return local(StatusCode::NOT_FOUND, body);
                }
            }
        };
        let Some(mut backend) = self.balance.pick(&service, None, Instant::now()) else {
            let body = format!("no healthy endpoint for service {}\n", service.name);
            return local(StatusCode::SERVICE_UNAVAILABLE, body);
        };

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        forwarded_for(&mut parts.headers, client);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| "/".parse().expect("valid"));
        let hint = body.size_hint();
        let end = body.is_end_stream();
        let slot = Arc::new(Mutex::new(Some(body)));

        let mut retried = false;
        loop {
            let uri = Uri::builder()
                .scheme("http")
                .authority(backend.authority.clone())
                .path_and_query(path.clone())
                .build()
                .expect("valid parts make a valid URI");
            let mut upstream = Request::new(UpstreamBody {
                slot: slot.clone(),
                body: None,
                hint,
                end,
            });
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri;
            *upstream.version_mut() = Version::HTTP_11;
            *upstream.headers_mut() = parts.headers.clone();

            let in_flight = InFlight::new(backend.clone());
            let result =
                tokio::time::timeout(self.response_timeout, self.client.request(upstream)).await;
            let now = Instant::now();
            match result {
                Ok(Ok(response)) => {
                    let outcome = if response.status().is_server_error() {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    };
                    self.record(&backend, outcome, now);
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Response::from_parts(parts, ProxyBody::Upstream { body, in_flight });
                }
                Ok(Err(e)) if e.is_connect() => {
                    drop(in_flight);
                    self.record(&backend, Outcome::ConnectFailure, now);
                    debug!(service = %service.name, instance = %backend.instance, error = %e, "connect failed");
                    // Only a request whose body was never touched can go again.
                    let untouched = slot.lock().expect("not poisoned").is_some();
                    if !retried && untouched {
                        if let Some(next) = self.balance.pick(&service, Some(&backend), now) {
                            backend = next;
                            retried = true;
                            continue;
                        }
                    }
                    let body = format!("cannot connect to service {}\n", service.name);
                    return local(StatusCode::BAD_GATEWAY, body);
                }
                Ok(Err(e)) => {
                    self.record(&backend, Outcome::ServerError, now);
                    let body = format!("service {} failed: {e}\n", service.name);
                    return local(StatusCode::BAD_GATEWAY, body);
                }
                Err(_) => {
                    self.record(&backend, Outcome::ServerError, now);
                    let body = format!(
                        "service {} did not answer within {:?}\n",
                        service.name, self.response_timeout
                    );
                    return local(StatusCode::GATEWAY_TIMEOUT, body);
                }
            }
        }
    }

    fn record(&self, backend: &Backend, outcome: Outcome, now: Instant) {
        if backend.record(outcome, now) {
            self.ejected.notify_one();
        }
    }
}

fn local(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 §7.6.1): `Connection`, every header it names, and the
/// well-known hop-by-hop fields.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TE, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Appends the client to `X-Forwarded-For`; says `http` in
/// `X-Forwarded-Proto` unless a proxy in front already said what the client
/// used.
fn forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let ip = client.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
    headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
}

/// Counts a request against its endpoint until the response body is done.
pub struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(backend: Arc<Backend>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's request body on its way to an endpoint. It stays in `slot`
/// until the upstream connection first asks for it, so that a request whose
/// connect failed still has its body for the retry.
pub struct UpstreamBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    body: Option<Incoming>,
    hint: SizeHint,
    end: bool,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if this.body.is_none() {
            this.body = this.slot.lock().expect("not poisoned").take();
        }
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().map_or(self.end, Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| self.hint, Body::size_hint)
    }
}

/// What the router answers with: its own short message, or the endpoint's
/// response streamed through.
pub enum ProxyBody {
    Local(Full<Bytes>),
    Upstream { body: Incoming, in_flight: InFlight },
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Local(full) => Pin::new(full).poll_frame(cx).map_err(|e| match e {}),
            ProxyBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(full) => full.is_end_stream(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(full) => full.size_hint(),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Session-Hop"),
            ("connection", "x-other-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-session-hop", "1"),
            ("x-other-hop", "1"),
            ("content-length", "3"),
            ("host", "example.com"),
            ("x-request-id", "abc"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "host", "x-request-id"]);
    }

    #[test]
    fn forwarded_headers_append_the_client_and_keep_an_earlier_proto() {
        let client: SocketAddr = "10.0.0.7:5555".parse().unwrap();
        let mut h = HeaderMap::new();
        forwarded_for(&mut h, client);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_for(&mut h, client);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
