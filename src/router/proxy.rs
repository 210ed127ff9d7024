//! The reverse proxy: HTTP/1.1 in, HTTP/1.1 out over kept-alive connections
//! to the endpoints (`upstream`), bodies streamed both ways.
//!
//! ```text
//!  listener ─accept─► proxy thread 0: client conns ─► handle ─► upstream conns
//!     (in turn)  └──► proxy thread 1: client conns ─► handle ─► upstream conns
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE,
};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::balance::Balance;
use super::table::{Backend, Outcome, RouteTable};
use super::upstream::{self, ConnectError, Connection};

/// How long in-flight requests may finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub struct Proxy {
    table: Arc<ArcSwap<RouteTable>>,
    balance: Balance,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Wakes the ack reporter when passive health ejects an endpoint, so the
    /// controller hears of it at once rather than at the next tick.
    ejected: Arc<Notify>,
}

/// How one attempt to hand a request to an endpoint ended.
enum Sent {
    Answered(Response<Incoming>, Connection),
    /// No connection: the request was not sent and comes back for a retry.
    NotConnected(ConnectError, Request<Incoming>),
    Failed(hyper::Error),
}

impl Proxy {
    pub fn new(
        table: Arc<ArcSwap<RouteTable>>,
        balance: Balance,
        connect_timeout: Duration,
        response_timeout: Duration,
        ejected: Arc<Notify>,
    ) -> Proxy {
        Proxy {
            table,
            balance,
            connect_timeout,
            response_timeout,
            ejected,
        }
    }

    /// Starts `threads` proxy threads that serve the connections `accept`
    /// hands them until `stop`, then let open requests finish.
    ///
    /// Each proxy thread runs its own single-threaded runtime, as nginx runs
    /// one event loop per worker: a client connection, the endpoint
    /// connections its requests use and their tasks all stay on one thread,
    /// so a request is never handed between threads.
    pub fn start(
        self: Arc<Self>,
        threads: usize,
        stop: &watch::Receiver<bool>,
    ) -> std::io::Result<Workers> {
        let mut workers = Workers {
            accepted: Vec::with_capacity(threads),
            finished: Vec::with_capacity(threads),
        };
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (accepted, accepted_rx) = mpsc::unbounded_channel();
            let (finished, finished_rx) = oneshot::channel();
            let proxy = self.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    upstream::enter_shard(i);
                    runtime.block_on(proxy.serve_connections(accepted_rx, stop));
                    let _ = finished.send(());
                })?;
            workers.accepted.push(accepted);
            workers.finished.push(finished_rx);
        }
        Ok(workers)
    }

    /// One proxy thread: serves the connections it is handed until `stop`,
    /// then lets open requests finish.
    async fn serve_connections(
        self: Arc<Self>,
        mut accepted: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // Responses are mostly small: one copy into the write buffer costs
        // less than queueing the body as a second buffer for `writev`.
        http.writev(false);
        loop {
            let (stream, peer) = tokio::select! {
                next = accepted.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
                _ = crate::stopped(&mut stop) => break,
            };
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(error = %e, %peer, "cannot register a client connection");
                    continue;
                }
            };
            let proxy = self.clone();
            // Formatted once per connection rather than once per request.
            let client = client_header(peer);
            let service = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, client).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, %peer, "client connection ended");
                }
            });
        }
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still open after {DRAIN:?}; closing them");
        }
    }

    /// Proxies one request; `client` is the client's address as a header value.
    pub async fn handle(&self, req: Request<Incoming>, client: HeaderValue) -> Response<ProxyBody> {
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
        // Endpoints get the origin form (`/path?query`), whatever form the
        // client used.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(path);
        }
        parts.version = Version::HTTP_11;
        let had_host = parts.headers.contains_key(HOST);
        let mut request = Request::from_parts(parts, body);

        let mut retried = false;
        loop {
            if !had_host {
                request.headers_mut().insert(HOST, backend.host.clone());
            }
            let in_flight = InFlight::new(backend.clone());
            let result =
                tokio::time::timeout(self.response_timeout, self.send(&backend, request)).await;
            let now = Instant::now();
            match result {
                Ok(Sent::Answered(response, conn)) => {
                    let outcome = if response.status().is_server_error() {
                        Outcome::ServerError
                    } else {
                        Outcome::Success
                    };
                    self.record(&backend, outcome, now);
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let body = ProxyBody::Upstream(UpstreamBody {
                        body,
                        ended: false,
                        conn: Some(conn),
                        in_flight,
                    });
                    return Response::from_parts(parts, body);
                }
                Ok(Sent::NotConnected(e, unsent)) => {
                    drop(in_flight);
                    self.record(&backend, Outcome::ConnectFailure, now);
                    debug!(service = %service.name, instance = %backend.instance, error = %e, "connect failed");
                    if !retried {
                        if let Some(next) = self.balance.pick(&service, Some(&backend), now) {
                            backend = next;
                            retried = true;
                            request = unsent;
                            continue;
                        }
                    }
                    let body = format!("cannot connect to service {}\n", service.name);
                    return local(StatusCode::BAD_GATEWAY, body);
                }
                Ok(Sent::Failed(e)) => {
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

    /// Sends `request` on an idle connection to `backend`, or on a new one.
    /// Connecting comes first, so a request that found no connection is
    /// returned untouched, body and all.
    async fn send(&self, backend: &Backend, mut request: Request<Incoming>) -> Sent {
        loop {
            let (mut conn, reused) = match backend.connections.take(Instant::now()) {
                Some(conn) => (conn, true),
                None => match upstream::connect(backend.addr, self.connect_timeout).await {
                    Ok(conn) => (conn, false),
                    Err(e) => return Sent::NotConnected(e, request),
                },
            };
            // A connection comes back to the pool as soon as its response has
            // been read, possibly before its task has caught up; wait for it.
            // An error means the endpoint closed it meanwhile.
            if reused && conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(request).await {
                Ok(response) => return Sent::Answered(response, conn),
                Err(mut e) => match e.take_message() {
                    // A kept-alive connection closed before it took the
                    // request (the endpoint's keep-alive ran out): not the
                    // endpoint's fault, and safe to send again.
                    Some(unsent) if reused => request = unsent,
                    _ => return Sent::Failed(e.into_error()),
                },
            }
        }
    }

    fn record(&self, backend: &Backend, outcome: Outcome, now: Instant) {
        if backend.record(outcome, now) {
            self.ejected.notify_one();
        }
    }
}

/// The proxy threads, as `accept` sees them.
pub struct Workers {
    accepted: Vec<mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
    /// Each fires when its thread has drained.
    finished: Vec<oneshot::Receiver<()>>,
}

/// Accepts connections until `stop` and hands them out to the proxy
/// threads in turn; returns once every thread has let its open requests
/// finish.
pub async fn accept(listener: TcpListener, workers: Workers, mut stop: watch::Receiver<bool>) {
    let mut next = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: back off rather
                    // than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        match stream.into_std() {
            Ok(stream) => {
                let _ = workers.accepted[next].send((stream, peer));
                next = (next + 1) % workers.accepted.len();
            }
            Err(e) => debug!(error = %e, %peer, "client connection lost before handing over"),
        }
    }
    drop(listener);
    drop(workers.accepted);
    for finished in workers.finished {
        let _ = finished.await;
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

/// The hop-by-hop fields that every message loses (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 §7.6.1): `Connection`, every header it names, and the
/// well-known hop-by-hop fields.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names a message has, rather than a lookup per
    // hop-by-hop field: most messages carry none, or only `Connection`.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection: keep-alive` names a field removed anyway: only collect
    // names when it names others.
    let names_others = headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|name| !name.trim_ascii().eq_ignore_ascii_case(b"keep-alive"))
    });
    if names_others {
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
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The client's address as `X-Forwarded-For` shows it.
fn client_header(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string()).expect("an IP address is a valid header value")
}

/// Appends the client to `X-Forwarded-For`; says `http` in
/// `X-Forwarded-Proto` unless a proxy in front already said what the client
/// used.
fn forwarded_for(headers: &mut HeaderMap, client: HeaderValue) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(before) => {
            let joined = [before.as_bytes(), b", ", client.as_bytes()].concat();
            HeaderValue::from_bytes(&joined).ok()
        }
        None => Some(client),
    };
    if let Some(v) = value {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    headers
        .entry(&X_FORWARDED_PROTO)
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

/// What the router answers with: its own short message, or the endpoint's
/// response streamed through.
pub enum ProxyBody {
    Local(Full<Bytes>),
    Upstream(UpstreamBody),
}

/// An endpoint's response body on its way to the client. Its connection
/// goes back to the endpoint's idle list once the body has been read to the
/// end; a body dropped half-read closes it, as nothing else could be sent
/// on it.
pub struct UpstreamBody {
    body: Incoming,
    ended: bool,
    conn: Option<Connection>,
    in_flight: InFlight,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.ended || self.body.is_end_stream() {
                self.in_flight.0.connections.put(conn, Instant::now());
            }
        }
    }
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
            ProxyBody::Upstream(up) => {
                let frame = Pin::new(&mut up.body).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    up.ended = true;
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(full) => full.is_end_stream(),
            ProxyBody::Upstream(up) => up.ended || up.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(full) => full.size_hint(),
            ProxyBody::Upstream(up) => up.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::wire::{Message, Mirror, WireEndpoint, WireService, WireState, PROTOCOL};
    use http_body_util::BodyExt;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    /// An endpoint answering with the request's body, or `ok` for none, and
    /// the `X-Forwarded-For` it got; counts the connections it accepted.
    /// `keep_alive: false` closes each one after its response.
    async fn endpoint(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let xff = req.headers().get("x-forwarded-for").cloned();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let body = if body.is_empty() {
                        Bytes::from_static(b"ok")
                    } else {
                        body
                    };
                    let mut response = Response::new(Full::new(body));
                    if let Some(xff) = xff {
                        response.headers_mut().insert("x-seen-xff", xff);
                    }
                    Ok::<_, Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, accepted)
    }

    /// A router on two proxy threads with one route, `/`, to `endpoint`.
    async fn router(endpoint: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
        upstream::set_shards(2);
        let mut mirror = Mirror::default();
        mirror
            .apply(Message::Snapshot {
                protocol: PROTOCOL,
                revision: 1,
                services: vec![WireService {
                    name: "app".into(),
                    route: "/".into(),
                    endpoints: vec![WireEndpoint {
                        instance: "i-1".into(),
                        address: endpoint.ip(),
                        port: endpoint.port(),
                        zone: "a".into(),
                        state: WireState::Healthy,
                    }],
                }],
            })
            .unwrap();
        let table = RouteTable::build(&mirror, &mut HashMap::new());
        let proxy = Arc::new(Proxy::new(
            Arc::new(ArcSwap::from_pointee(table)),
            Balance::P2c,
            Duration::from_secs(1),
            Duration::from_secs(5),
            Arc::new(Notify::new()),
        ));
        let (stop_tx, stop) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let workers = proxy.start(2, &stop).unwrap();
        tokio::spawn(accept(listener, workers, stop));
        (addr, stop_tx)
    }

    /// Sends `n` requests one after another on one client connection.
    async fn get(router: SocketAddr, n: usize) -> Vec<(StatusCode, Option<HeaderValue>, Bytes)> {
        let stream = TcpStream::connect(router).await.unwrap();
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut answers = Vec::new();
        for _ in 0..n {
            let request = Request::builder()
                .uri("/x")
                .header(HOST, "app")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            let status = response.status();
            let xff = response.headers().get("x-seen-xff").cloned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            answers.push((status, xff, body));
        }
        answers
    }

    #[tokio::test]
    async fn requests_one_after_another_reuse_one_endpoint_connection() {
        let (endpoint, accepted) = endpoint(true).await;
        let (router, _stop) = router(endpoint).await;
        for (status, xff, body) in get(router, 20).await {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(xff.unwrap(), "127.0.0.1");
            assert_eq!(body, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn request_bodies_stream_through_and_the_connection_is_kept() {
        let (endpoint, accepted) = endpoint(true).await;
        let (router, _stop) = router(endpoint).await;
        let stream = TcpStream::connect(router).await.unwrap();
        let (mut client, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        for round in 0..3u8 {
            // Chunked (no length given), in 64 pieces.
            let body = Chunks(
                (0..64)
                    .map(|i| Bytes::from(vec![round ^ i; 16 * 1024]))
                    .collect(),
            );
            let request = Request::builder()
                .method("POST")
                .uri("/upload")
                .header(HOST, "app")
                .body(body)
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let echoed = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(echoed.len(), 64 * 16 * 1024);
            assert!(echoed
                .chunks(16 * 1024)
                .enumerate()
                .all(|(i, c)| c[0] == round ^ i as u8));
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    /// A request body of the given chunks, of no announced length.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn an_endpoint_closing_its_connections_costs_no_request() {
        let (endpoint, accepted) = endpoint(false).await;
        let (router, _stop) = router(endpoint).await;
        for (status, _, body) in get(router, 10).await {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 10);
    }

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
        let client = client_header("10.0.0.7:5555".parse().unwrap());
        let mut h = HeaderMap::new();
        forwarded_for(&mut h, client.clone());
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
