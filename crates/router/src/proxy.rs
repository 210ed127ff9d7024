//! The reverse proxy: HTTP/1.1 in, HTTP/1.1 out over kept-alive connections
//! to the endpoints (`upstream`), heads rewritten and bodies streamed both
//! ways by `http1`.
//!
//! ```text
//!  listener ─accept─► proxy thread 0: client conns ─► forward ─► upstream conns
//!     (in turn)  └──► proxy thread 1: client conns ─► forward ─► upstream conns
//! ```
//!
//! One task per client connection does everything for its requests, one at
//! a time: it reads a head, picks an endpoint, writes the rewritten head
//! and the body to an endpoint connection it holds for the exchange, and
//! writes the response back. Nothing is handed between tasks or threads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::balance::Balance;
use super::http1::{self, Body, BodyError, Framing, HeadError, Local};
use super::table::{Endpoint, Outcome, RouteTable, ServiceEndpoints};
use super::upstream::{self, Connection, READ_SIZE};

/// How long in-flight requests may finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);
/// How long a client connection may wait for its next request (nginx's
/// `keepalive_timeout` is 75 s); also bounds a head that never completes.
const CLIENT_IDLE: Duration = Duration::from_secs(75);

pub struct Proxy {
    table: Arc<ArcSwap<RouteTable>>,
    balance: Balance,
    connect_timeout: Duration,
    /// For the response head, counted from the end of the request, and for
    /// every later read of the response body.
    response_timeout: Duration,
    /// Wakes the ack reporter when passive health ejects an endpoint, so the
    /// controller hears of it at once rather than at the next tick.
    ejected: Arc<Notify>,
    /// Set once at shutdown: connections close after their current request.
    stopping: AtomicBool,
}

/// One client connection.
struct Client {
    stream: TcpStream,
    /// Received and not yet passed on: the next head, or body bytes.
    buf: BytesMut,
    /// The request head for the endpoint, and what of the body came with
    /// it: kept until the exchange is over, to send again if the endpoint
    /// had closed the connection it went out on.
    head: Vec<u8>,
    /// The response, or a part of it, on its way to the client; or the
    /// router's own answer.
    back: Vec<u8>,
    /// Request body bytes on their way to the endpoint.
    upload: Vec<u8>,
    /// The client's address as `X-Forwarded-For` shows it.
    addr: String,
}

/// What the next complete request head asks of the router.
enum Next {
    /// An answer of the router's own; `close` once it is written.
    Local(Local),
    Forward(Exchange),
}

/// A request on its way to an endpoint: what the rest of the exchange needs
/// to know of its head, which is gone from the buffer by then.
struct Exchange {
    service: Arc<ServiceEndpoints>,
    endpoint: Arc<Endpoint>,
    framing: Framing,
    is_head: bool,
    minor: u8,
    keep_alive: bool,
    has_host: bool,
    /// May be sent again after a connection failed under it.
    idempotent: bool,
}

impl Exchange {
    /// Whether the request may go again on a new connection when a
    /// kept-alive one failed under it: only one without a body (the body
    /// is gone once sent) whose method makes a second send harmless.
    fn is_resendable(&self) -> bool {
        self.framing == Framing::Empty && self.idempotent
    }
}

/// How an exchange with an endpoint failed.
#[derive(Debug, Error)]
enum Failure {
    /// A kept-alive connection the endpoint had closed, found before any of
    /// the request could matter to it: safe to send again on a new one.
    #[error("kept-alive connection closed by the endpoint")]
    Stale,
    #[error("did not answer within {0:?}")]
    Timeout(Duration),
    /// Nothing reached the client yet: it gets a 502.
    #[error("{0}")]
    BeforeResponse(String),
    /// The client has part of a response: its connection just closes.
    #[error("{0}")]
    AfterResponse(String),
    /// The client's request body is malformed: it gets a 400.
    #[error("malformed request body: {0}")]
    RequestBody(BodyError),
    /// The client's request body turned out malformed after the endpoint's
    /// response had begun on its way to the client: a 400 now would land
    /// in the middle of that response, so the connection just closes.
    #[error("malformed request body after the response began: {0}")]
    RequestBodyMidResponse(BodyError),
    /// The client went away or stalled: nothing is answered, and nothing
    /// is held against the endpoint.
    #[error("client: {0}")]
    Client(String),
}

/// How an exchange ended, for the connections and passive health.
struct Done {
    outcome: Outcome,
    /// The endpoint connection can carry another request.
    reusable: bool,
    /// The client connection closes now.
    close: bool,
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
            stopping: AtomicBool::new(false),
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
        stop: &CancellationToken,
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
        stop: CancellationToken,
    ) {
        // Every connection task holds a sender; `recv` returns `None` once
        // the last has ended.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        loop {
            let (stream, peer) = tokio::select! {
                next = accepted.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(error = %e, %peer, "cannot register a client connection");
                    continue;
                }
            };
            tokio::spawn(
                self.clone()
                    .serve_client(stream, peer, stop.clone(), open.clone()),
            );
        }
        self.stopping.store(true, Ordering::Relaxed);
        drop(open);
        if tokio::time::timeout(DRAIN, all_closed.recv())
            .await
            .is_err()
        {
            warn!("requests still open after {DRAIN:?}; closing them");
        }
    }

    /// Serves one client connection's requests, one after another.
    async fn serve_client(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
        _open: mpsc::Sender<()>,
    ) {
        let mut client = Client {
            stream,
            buf: BytesMut::with_capacity(READ_SIZE),
            head: Vec::with_capacity(1024),
            back: Vec::with_capacity(READ_SIZE),
            upload: Vec::new(),
            addr: peer.ip().to_string(),
        };
        // One timer for the connection's life, moved on only when it fires:
        // cheaper than a timer per request.
        let idle = tokio::time::sleep(CLIENT_IDLE);
        tokio::pin!(idle);
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let mut active = Instant::now();
        loop {
            let next = loop {
                if !client.buf.is_empty() {
                    if let Some(next) = self.next(&mut client) {
                        break next;
                    }
                }
                client.buf.reserve(READ_SIZE);
                tokio::select! {
                    biased;
                    read = client.stream.read_buf(&mut client.buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    // Between requests only: one begun is finished first.
                    _ = &mut stopped, if client.buf.is_empty() => return,
                    _ = &mut idle => {
                        let deadline = active + CLIENT_IDLE;
                        if deadline <= Instant::now() {
                            debug!(%peer, "client connection idle too long");
                            return;
                        }
                        idle.as_mut().reset(deadline);
                    }
                }
            };
            let keep = match next {
                Next::Local(local) => write_local(&mut client, &local).await && !local.close,
                Next::Forward(exchange) => self.forward(&mut client, exchange).await,
            };
            if !keep || self.stopping.load(Ordering::Relaxed) {
                return;
            }
            active = Instant::now();
        }
    }

    /// Reads the request head at the start of the client's buffer: `None`
    /// until it is whole. For a request to forward, leaves the endpoint's
    /// head in `client.head` and the request body's first bytes, if any, in
    /// `client.buf`.
    fn next(&self, client: &mut Client) -> Option<Next> {
        let mut fields = http1::fields();
        let (next, len) = match http1::parse_request(&client.buf, &mut fields) {
            Ok(Some(req)) => (self.route(&req, &client.addr, &mut client.head), req.len),
            Ok(None) => return None,
            Err(e) => {
                debug!(client = %client.addr, error = %e, "bad request");
                return Some(Next::Local(bad_request(&e)));
            }
        };
        client.buf.advance(len);
        Some(next)
    }

    /// Where `req` goes: to an endpoint, with its head for it written to
    /// `out`, or nowhere, with the router's answer.
    fn route(&self, req: &http1::Request<'_, '_>, client: &str, out: &mut Vec<u8>) -> Next {
        // A local answer leaves a request body unread: the connection
        // closes after it rather than read the body as the next head.
        let close = !req.keep_alive || req.framing != Framing::Empty;
        let local = |status, reason, body| {
            Next::Local(Local {
                status,
                reason,
                body,
                close,
                minor: req.minor,
            })
        };
        let service = {
            let table = self.table.load();
            if table.revision.is_none() {
                return local(
                    503,
                    "Service Unavailable",
                    "router has no routes yet\n".into(),
                );
            }
            match table.lookup(req.path) {
                Some(s) => s.clone(),
                None => return local(404, "Not Found", format!("no route for {}\n", req.path)),
            }
        };
        let Some(endpoint) = self.balance.pick(&service, None, Instant::now()) else {
            let body = format!("no healthy endpoint for service {}\n", service.name);
            return local(503, "Service Unavailable", body);
        };
        out.clear();
        req.write_head(client, out);
        Next::Forward(Exchange {
            service,
            endpoint,
            framing: req.framing,
            is_head: req.is_head(),
            minor: req.minor,
            keep_alive: req.keep_alive,
            has_host: req.has_host(),
            idempotent: req.is_idempotent(),
        })
    }

    /// Sends a request to its endpoint, or another if that one cannot be
    /// reached, and its response to the client; returns whether the client
    /// connection stays open.
    async fn forward(&self, client: &mut Client, ex: Exchange) -> bool {
        let head_len = client.head.len();
        let mut endpoint = ex.endpoint.clone();
        let mut retried = false;
        let mut pooled_ok = true;
        // A request with a body cannot be taken back once it is on its way.
        let close_on_error = !ex.keep_alive || ex.framing != Framing::Empty;
        loop {
            let in_flight = InFlight::new(endpoint.clone());
            let pooled = pooled_ok
                .then(|| endpoint.connections.take(Instant::now()))
                .flatten();
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => match upstream::connect(endpoint.addr, self.connect_timeout).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        drop(in_flight);
                        self.record(&endpoint, Outcome::ConnectFailure, Instant::now());
                        debug!(service = %ex.service.name, instance = %endpoint.instance, error = %e, "connect failed");
                        if !retried {
                            let next =
                                self.balance
                                    .pick(&ex.service, Some(&endpoint), Instant::now());
                            if let Some(next) = next {
                                endpoint = next;
                                retried = true;
                                continue;
                            }
                        }
                        let body = format!("cannot connect to service {}\n", ex.service.name);
                        return self
                            .answer(client, &ex, (502, "Bad Gateway"), body, close_on_error)
                            .await;
                    }
                },
            };
            client.head.truncate(head_len);
            http1::finish_head(&mut client.head, (!ex.has_host).then_some(&endpoint.host));
            let result = self.exchange(client, &mut conn, &ex, reused).await;
            let now = Instant::now();
            match result {
                Ok(done) => {
                    self.record(&endpoint, done.outcome, now);
                    if done.reusable {
                        endpoint.connections.put(conn, now);
                    }
                    return !done.close;
                }
                Err(Failure::Stale) => {
                    // Not the endpoint's fault, and nothing was lost: again,
                    // on a new connection.
                    debug!(instance = %endpoint.instance, "kept-alive connection was closed; sending again");
                    pooled_ok = false;
                }
                Err(Failure::Client(e)) => {
                    debug!(client = %client.addr, error = %e, "client connection ended mid-exchange");
                    return false;
                }
                Err(Failure::RequestBody(e)) => {
                    return self
                        .answer(client, &ex, (400, "Bad Request"), format!("{e}\n"), true)
                        .await;
                }
                Err(e @ Failure::RequestBodyMidResponse(_)) => {
                    // The client's fault, not the endpoint's.
                    debug!(client = %client.addr, error = %e, "request ended mid-response");
                    return false;
                }
                Err(Failure::AfterResponse(e)) => {
                    self.record(&endpoint, Outcome::ServerError, now);
                    debug!(service = %ex.service.name, instance = %endpoint.instance, error = %e, "response cut short");
                    return false;
                }
                Err(e @ Failure::Timeout(_)) => {
                    self.record(&endpoint, Outcome::ServerError, now);
                    let body = format!("service {} {e}\n", ex.service.name);
                    return self
                        .answer(client, &ex, (504, "Gateway Timeout"), body, close_on_error)
                        .await;
                }
                Err(e) => {
                    self.record(&endpoint, Outcome::ServerError, now);
                    let body = format!("service {} failed: {e}\n", ex.service.name);
                    return self
                        .answer(client, &ex, (502, "Bad Gateway"), body, close_on_error)
                        .await;
                }
            }
        }
    }

    /// Writes the router's own answer to the request `ex`; returns whether
    /// the client connection stays open.
    async fn answer(
        &self,
        client: &mut Client,
        ex: &Exchange,
        (status, reason): (u16, &'static str),
        body: String,
        close: bool,
    ) -> bool {
        let local = Local {
            status,
            reason,
            body,
            close,
            minor: ex.minor,
        };
        write_local(client, &local).await && !close
    }

    /// One request and its response over `conn`.
    async fn exchange(
        &self,
        client: &mut Client,
        conn: &mut Connection,
        ex: &Exchange,
        reused: bool,
    ) -> Result<Done, Failure> {
        // The head, and what has come of the body, in one write.
        let mut body = Body::new(ex.framing);
        let taken = body
            .take(&client.buf, &mut client.head, false)
            .map_err(Failure::RequestBody)?;
        client.buf.advance(taken);
        let (mut from_client, mut to_client) = client.stream.split();
        let (mut from_endpoint, mut to_endpoint) = conn.stream.split();
        let started = Instant::now();
        // Nanoseconds after `started` of the upload's last progress: the
        // response is due `response_timeout` after the request is sent, not
        // after it began.
        let uploaded = AtomicU64::new(0);
        // Set once the final response head is on its way to the client:
        // from then on the router has nothing to say to it but to close.
        let responding = AtomicBool::new(false);
        if let Err(e) = to_endpoint.write_all(&client.head).await {
            return Err(if reused && ex.is_resendable() {
                Failure::Stale
            } else {
                Failure::BeforeResponse(format!("cannot send the request: {e}"))
            });
        }
        let download = self.download(
            &mut from_endpoint,
            &mut conn.buf,
            &mut to_client,
            &mut client.back,
            ex,
            reused,
            (started, &uploaded),
            &responding,
        );
        if body.is_done() {
            return download.await;
        }
        let upload = upload(
            &mut from_client,
            &mut client.buf,
            &mut to_endpoint,
            &mut client.upload,
            &mut body,
            (started, &uploaded),
        );
        tokio::pin!(download, upload);
        let mut uploading = true;
        let mut upload_failed = false;
        let mut done = loop {
            tokio::select! {
                biased;
                done = &mut download => break done?,
                sent = &mut upload, if uploading => {
                    uploading = false;
                    match sent {
                        Ok(()) => {}
                        // The client broke the exchange: over at once.
                        Err(Failure::RequestBody(e)) if responding.load(Ordering::Relaxed) => {
                            return Err(Failure::RequestBodyMidResponse(e))
                        }
                        Err(e @ (Failure::Client(_) | Failure::RequestBody(_))) => return Err(e),
                        // The endpoint may still answer (it refused the
                        // body, say): wait for that.
                        Err(e) => {
                            debug!(error = %e, "request body not sent whole");
                            upload_failed = true;
                        }
                    }
                }
            }
        };
        if uploading && done.reusable {
            // Answered before the body was all sent, by an endpoint that
            // keeps its connection, so it reads the rest: both connections
            // can carry the next request once it has.
            if let Err(e) = upload.await {
                debug!(error = %e, "request body not sent whole after the response");
                upload_failed = true;
            }
        } else if uploading {
            upload_failed = true;
        }
        if upload_failed {
            // The rest of the request body is still on the client's
            // connection, and the endpoint's is mid-message: neither can
            // carry another request.
            done.reusable = false;
            done.close = true;
        }
        Ok(done)
    }

    /// Reads the response (interim ones first) from the endpoint and passes
    /// it on to the client as it comes.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        from_endpoint: &mut ReadHalf<'_>,
        buf: &mut BytesMut,
        to_client: &mut WriteHalf<'_>,
        out: &mut Vec<u8>,
        ex: &Exchange,
        reused: bool,
        (started, uploaded): (Instant, &AtomicU64),
        responding: &AtomicBool,
    ) -> Result<Done, Failure> {
        let mut deadline = started + self.response_timeout;
        let mut answered = false;
        loop {
            let head = {
                let mut fields = http1::fields();
                match http1::parse_response(buf, &mut fields, ex.is_head) {
                    Ok(Some(res)) => {
                        out.clear();
                        let delivery = res.write_head(ex.minor, ex.keep_alive, out);
                        Some((
                            res.len,
                            res.status,
                            res.is_interim(),
                            res.framing,
                            res.keep_alive,
                            delivery,
                        ))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        return Err(Failure::BeforeResponse(format!("invalid response: {e}")))
                    }
                }
            };
            let Some((len, status, interim, framing, keep_alive, delivery)) = head else {
                buf.reserve(READ_SIZE);
                let read = loop {
                    match tokio::time::timeout_at(deadline, from_endpoint.read_buf(buf)).await {
                        Ok(read) => break read,
                        Err(_) => {
                            // Still uploading, or was until recently: the
                            // response is not due yet.
                            let sent = started
                                + Duration::from_nanos(uploaded.load(Ordering::Relaxed))
                                + self.response_timeout;
                            if sent <= Instant::now() {
                                return Err(Failure::Timeout(self.response_timeout));
                            }
                            deadline = sent;
                        }
                    }
                };
                match read {
                    Ok(n) if n > 0 => continue,
                    // Nothing at all on a kept-alive connection: the endpoint
                    // closed it as the request went out.
                    Ok(_) | Err(_)
                        if reused && !answered && buf.is_empty() && ex.is_resendable() =>
                    {
                        return Err(Failure::Stale)
                    }
                    Ok(_) => {
                        return Err(Failure::BeforeResponse(
                            "connection closed before a response".into(),
                        ))
                    }
                    Err(e) => {
                        return Err(Failure::BeforeResponse(format!(
                            "cannot read the response: {e}"
                        )))
                    }
                }
            };
            answered = true;
            buf.advance(len);
            if interim {
                if status == 101 {
                    return Err(Failure::BeforeResponse(
                        "switching protocols is not supported".into(),
                    ));
                }
                // `100 Continue` and the like: for HTTP/1.1 clients only.
                if ex.minor == 1 {
                    to_client
                        .write_all(out)
                        .await
                        .map_err(|e| Failure::Client(e.to_string()))?;
                }
                continue;
            }
            responding.store(true, Ordering::Relaxed);
            let mut body = Body::new(framing);
            // The head and what has come of the body in one write; the rest
            // as it arrives.
            loop {
                let n = body
                    .take(buf, out, delivery.dechunk)
                    .map_err(|e| Failure::AfterResponse(format!("response body: {e}")))?;
                buf.advance(n);
                if !out.is_empty() {
                    to_client
                        .write_all(out)
                        .await
                        .map_err(|e| Failure::Client(e.to_string()))?;
                    out.clear();
                }
                if body.is_done() {
                    break;
                }
                buf.reserve(READ_SIZE);
                let read = tokio::time::timeout(self.response_timeout, from_endpoint.read_buf(buf))
                    .await
                    .map_err(|_| {
                        Failure::AfterResponse(format!(
                            "response body stalled for {:?}",
                            self.response_timeout
                        ))
                    })?
                    .map_err(|e| Failure::AfterResponse(format!("response body: {e}")))?;
                if read == 0 {
                    if body == Body::UntilClose {
                        break;
                    }
                    return Err(Failure::AfterResponse("endpoint closed mid-body".into()));
                }
            }
            let outcome = if status >= 500 {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            return Ok(Done {
                outcome,
                reusable: keep_alive && buf.is_empty(),
                close: delivery.close,
            });
        }
    }

    fn record(&self, endpoint: &Endpoint, outcome: Outcome, now: Instant) {
        if endpoint.record(outcome, now) {
            self.ejected.notify_one();
        }
    }
}

/// Passes the rest of a request body from the client to the endpoint.
async fn upload(
    from_client: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    to_endpoint: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    body: &mut Body,
    (started, uploaded): (Instant, &AtomicU64),
) -> Result<(), Failure> {
    while !body.is_done() {
        buf.reserve(READ_SIZE);
        let n = tokio::time::timeout(CLIENT_IDLE, from_client.read_buf(buf))
            .await
            .map_err(|_| Failure::Client(format!("no request body for {CLIENT_IDLE:?}")))?
            .map_err(|e| Failure::Client(e.to_string()))?;
        if n == 0 {
            return Err(Failure::Client("closed mid-body".into()));
        }
        out.clear();
        let n = body.take(buf, out, false).map_err(Failure::RequestBody)?;
        buf.advance(n);
        to_endpoint
            .write_all(out)
            .await
            .map_err(|e| Failure::BeforeResponse(format!("cannot send the request body: {e}")))?;
        let since = Instant::now().saturating_duration_since(started);
        uploaded.store(since.as_nanos() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Writes one of the router's own answers; false if the client is gone.
async fn write_local(client: &mut Client, local: &Local) -> bool {
    client.back.clear();
    local.write(&mut client.back);
    client.stream.write_all(&client.back).await.is_ok()
}

fn bad_request(e: &HeadError) -> Local {
    let (status, reason) = e.status();
    Local {
        status,
        reason,
        body: format!("{e}\n"),
        close: true,
        minor: 1,
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
pub async fn accept(listener: TcpListener, workers: Workers, stop: CancellationToken) {
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
            _ = stop.cancelled() => break,
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

/// Counts a request against its endpoint until its exchange is over.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: Arc<Endpoint>) -> InFlight {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Frame, Incoming};
    use hyper::header::{HeaderValue, HOST};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use signpost_protocol::{
        Epoch, Message, Mirror, WireEndpoint, WireService, WireState, PROTOCOL,
    };
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll};

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
    async fn router(endpoint: SocketAddr) -> (SocketAddr, CancellationToken) {
        upstream::set_shards(2);
        let mut mirror = Mirror::default();
        mirror
            .apply(Message::Snapshot {
                protocol: PROTOCOL,
                epoch: Epoch::from_bits(1),
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
        let stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let workers = proxy.start(2, &stop).unwrap();
        tokio::spawn(accept(listener, workers, stop.clone()));
        (addr, stop)
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

    impl hyper::body::Body for Chunks {
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
}
