//! The router's HTTP/1.1 reverse proxy, checked on the wire: raw TCP on both
//! sides, so that these tests pin what clients and endpoints see, whatever
//! parses and writes HTTP inside the router.
//!
//! ```text
//!  Client (raw bytes) ──► router (Proxy, port 0) ──► backend script (raw bytes)
//!     reads responses         2 proxy threads         records what it got,
//!     by their headers                                answers exact bytes
//! ```
//!
//! Every read has a deadline: a hang fails its test rather than hanging it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use signpost_protocol::{Epoch, Message, Mirror, WireEndpoint, WireService, WireState, PROTOCOL};
use signpost_router::balance::Balance;
use signpost_router::proxy::{accept, Proxy};
use signpost_router::table::RouteTable;
use signpost_router::upstream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

/// How long the client waits for any one answer before calling it a hang.
const DEADLINE: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The router

/// A router on two proxy threads with one service, `app`.
struct Router {
    addr: SocketAddr,
    /// Notified when passive health ejects an endpoint.
    ejected: Arc<Notify>,
    /// Held for the test's length: dropping it, or sending true, stops the
    /// router.
    stop: CancellationToken,
}

/// A router sending every path to `endpoints`.
async fn router(endpoints: &[SocketAddr]) -> Router {
    router_with("/", endpoints, RESPONSE_TIMEOUT).await
}

async fn router_with(route: &str, endpoints: &[SocketAddr], response_timeout: Duration) -> Router {
    upstream::set_shards(2);
    let mut mirror = Mirror::default();
    mirror
        .apply(Message::Snapshot {
            protocol: PROTOCOL,
            epoch: Epoch::from_bits(1),
            revision: 1,
            services: vec![WireService {
                name: "app".into(),
                route: route.into(),
                endpoints: endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| WireEndpoint {
                        instance: format!("i-{i}"),
                        address: addr.ip(),
                        port: addr.port(),
                        zone: "a".into(),
                        state: WireState::Healthy,
                    })
                    .collect(),
            }],
        })
        .unwrap();
    let table = RouteTable::build(&mirror, &mut HashMap::new());
    let ejected = Arc::new(Notify::new());
    let proxy = Arc::new(Proxy::new(
        Arc::new(ArcSwap::from_pointee(table)),
        Balance::P2c,
        CONNECT_TIMEOUT,
        response_timeout,
        ejected.clone(),
    ));
    let stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let workers = proxy.start(2, &stop).unwrap();
    tokio::spawn(accept(listener, workers, stop.clone()));
    Router {
        addr,
        ejected,
        stop,
    }
}

// ---------------------------------------------------------------------------
// Reading HTTP/1.1 off a stream

/// The read side of a connection, through a buffer: heads and bodies arrive
/// in whatever pieces TCP makes of them.
struct Wire<R> {
    rx: R,
    /// Read but not yet consumed.
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Wire<R> {
    fn new(rx: R) -> Wire<R> {
        Wire {
            rx,
            buf: Vec::new(),
        }
    }

    /// Reads more into the buffer; false once the stream has ended.
    async fn fill(&mut self) -> io::Result<bool> {
        self.buf.reserve(64 * 1024);
        match self.rx.read_buf(&mut self.buf).await {
            Ok(n) => Ok(n > 0),
            // A peer that closes with unread data sends a reset rather than a
            // FIN; either way the stream has ended.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A head up to and including its blank line; `None` if the stream ended
    /// before its first byte. Consumes nothing until the head is whole, so a
    /// read cancelled by a timeout loses nothing.
    async fn head(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut searched = 0;
        loop {
            if let Some(i) = find(&self.buf[searched..], b"\r\n\r\n") {
                let end = searched + i + 4;
                return Ok(Some(self.buf.drain(..end).collect()));
            }
            searched = self.buf.len().saturating_sub(3);
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ended("in a head"))
                };
            }
        }
    }

    /// `n` bytes, or fewer if the stream ends first.
    async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n && self.fill().await? {}
        let n = n.min(self.buf.len());
        Ok(self.buf.drain(..n).collect())
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..i + 2).take(i).collect());
            }
            if !self.fill().await? {
                return Err(ended("in a line"));
            }
        }
    }

    /// Decodes a chunked body into `body`, dropping chunk extensions and
    /// trailers. On an `UnexpectedEof` error `body` holds what came.
    async fn chunked(&mut self, body: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let line = self.line().await?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| {
                    let line = String::from_utf8_lossy(&line);
                    io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
                })?;
            if size == 0 {
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            let data = self.take(size).await?;
            body.extend_from_slice(&data);
            if data.len() < size {
                return Err(ended("in a chunk"));
            }
            if !self.line().await?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no CRLF after a chunk",
                ));
            }
        }
    }

    /// Everything up to the end of the stream.
    async fn rest(&mut self) -> io::Result<Vec<u8>> {
        while self.fill().await? {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// The next final response, read as a client reads it: framed by its
    /// own headers, interim (1xx) responses collected on the way. Panics
    /// when it has not ended within `DEADLINE`.
    async fn answer(&mut self, method: &str) -> Answer {
        match timeout(DEADLINE, self.read_answer(method)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => panic!("reading a response to {method}: {e}"),
            Err(_) => panic!(
                "no whole response to {method} within {DEADLINE:?}; unread: {:?}",
                String::from_utf8_lossy(&self.buf[..self.buf.len().min(300)])
            ),
        }
    }

    async fn read_answer(&mut self, method: &str) -> io::Result<Answer> {
        let mut interim = Vec::new();
        let head = loop {
            let Some(raw) = self.head().await? else {
                return Ok(Answer::Closed);
            };
            let head = Head::parse(&raw);
            let status = head.status();
            // 101 ends HTTP on the connection: it is final.
            if (100..200).contains(&status) && status != 101 {
                interim.push(status);
                continue;
            }
            break head;
        };
        let status = head.status();
        let mut body = Vec::new();
        let (framing, whole) = if method == "HEAD" || status < 200 || status == 204 || status == 304
        {
            (Framing::None, true)
        } else if head.is_chunked() {
            match self.chunked(&mut body).await {
                Ok(()) => (Framing::Chunked, true),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => (Framing::Chunked, false),
                Err(e) => return Err(e),
            }
        } else if let Some(n) = head.content_length() {
            body = self.take(n).await?;
            (Framing::Length, body.len() == n)
        } else {
            body = self.rest().await?;
            (Framing::Close, true)
        };
        let response = Response {
            head,
            interim,
            body,
            framing,
        };
        Ok(if whole {
            Answer::Whole(response)
        } else {
            Answer::Truncated(response)
        })
    }

    /// Waits for the other side to close, with nothing more said.
    async fn closed(&mut self) {
        let rest = timeout(DEADLINE, self.rest())
            .await
            .unwrap_or_else(|_| panic!("connection still open after {DEADLINE:?}"))
            .unwrap();
        assert!(
            rest.is_empty(),
            "bytes after the last response: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn ended(where_: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("stream ended {where_}"),
    )
}

/// A request or response head.
#[derive(Clone, Debug)]
struct Head {
    /// As it came, for failure messages.
    raw: String,
    /// The start line's three parts: method, target and version, or
    /// version, status and reason.
    start: [String; 3],
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> Head {
        let raw = String::from_utf8_lossy(raw).into_owned();
        let mut lines = raw.trim_end_matches("\r\n").split("\r\n");
        let mut start = lines.next().unwrap_or_default().splitn(3, ' ');
        let start = [(); 3].map(|_| start.next().unwrap_or_default().to_owned());
        let headers = lines
            .map(|line| match line.split_once(':') {
                Some((name, value)) => (name.to_owned(), value.trim().to_owned()),
                // Kept whole, so that an assertion on names shows it.
                None => (line.to_owned(), String::new()),
            })
            .collect();
        Head {
            raw: raw.clone(),
            start,
            headers,
        }
    }

    fn status(&self) -> u16 {
        self.start[1]
            .parse()
            .unwrap_or_else(|_| panic!("not a status line: {:?}", self.raw))
    }

    /// Every value of the field `name`, in order; names are case-insensitive.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The field's values as one list, as a recipient may combine them.
    fn joined(&self, name: &str) -> String {
        self.all(name).join(", ")
    }

    /// Whether `chunked` is the last transfer coding, which makes it the framing.
    fn is_chunked(&self) -> bool {
        let codings = self.joined("transfer-encoding");
        codings
            .rsplit(',')
            .next()
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.get("content-length").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad Content-Length in {:?}", self.raw))
        })
    }
}

/// How a response ended.
#[derive(Debug)]
enum Answer {
    Whole(Response),
    /// The stream ended inside the body.
    Truncated(Response),
    /// The stream ended before a status line.
    Closed,
}

#[derive(Debug)]
struct Response {
    head: Head,
    /// Statuses of the interim (1xx) responses before this one.
    interim: Vec<u16>,
    body: Vec<u8>,
    framing: Framing,
}

impl Response {
    fn status(&self) -> u16 {
        self.head.status()
    }
}

/// What delimited a response body.
#[derive(Debug, PartialEq)]
enum Framing {
    None,
    Length,
    Chunked,
    Close,
}

// ---------------------------------------------------------------------------
// The client

struct Client {
    wire: Wire<OwnedReadHalf>,
    tx: OwnedWriteHalf,
}

impl Client {
    async fn connect(router: &Router) -> Client {
        let stream = TcpStream::connect(router.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (rx, tx) = stream.into_split();
        Client {
            wire: Wire::new(rx),
            tx,
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes).await.expect("client write failed");
    }

    /// Writes, for a test in which the router may close the connection first.
    async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        timeout(DEADLINE, self.tx.write_all(bytes.as_ref()))
            .await
            .unwrap_or_else(|_| panic!("client write blocked for {DEADLINE:?}"))
    }

    /// The next response, which must come whole.
    async fn response(&mut self, method: &str) -> Response {
        match self.wire.answer(method).await {
            Answer::Whole(response) => response,
            other => panic!("expected a whole response to {method}, got {other:?}"),
        }
    }

    /// Sends a GET for `target` and checks that the backend's echo comes back.
    async fn get_echo(&mut self, target: &str) {
        self.send(format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n"))
            .await;
        let response = self.response("GET").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(String::from_utf8_lossy(&response.body), target);
    }
}

// ---------------------------------------------------------------------------
// Backends

/// A request as a backend received it.
#[derive(Clone, Debug)]
struct Received {
    /// Which of the backend's connections it came on, from 1.
    connection: usize,
    head: Head,
    body: Vec<u8>,
}

impl Received {
    fn method(&self) -> &str {
        &self.head.start[0]
    }

    fn target(&self) -> &str {
        &self.head.start[1]
    }
}

/// What a backend saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: Mutex<Vec<Received>>,
}

impl Seen {
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests for `target`.
    fn requests_for(&self, target: &str) -> Vec<Received> {
        self.requests()
            .into_iter()
            .filter(|r| r.target() == target)
            .collect()
    }
}

struct Endpoint {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

/// A backend on a port of its own running `script` on each connection it
/// accepts. A script's error only means that the router closed the
/// connection: tests judge by what each side saw, not by how scripts end.
async fn backend<F, Fut>(script: F) -> Endpoint
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let number = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
            let (rx, tx) = stream.into_split();
            tokio::spawn(script(Conn {
                wire: Wire::new(rx),
                tx,
                number,
                seen: shared.clone(),
            }));
        }
    });
    Endpoint { addr, seen }
}

/// One connection from the router to a backend, as its script sees it.
struct Conn {
    wire: Wire<OwnedReadHalf>,
    tx: OwnedWriteHalf,
    /// From 1, in the order the backend accepted them.
    number: usize,
    seen: Arc<Seen>,
}

impl Conn {
    /// The next request's head, not yet recorded; `None` once the router
    /// has closed the connection.
    async fn head(&mut self) -> io::Result<Option<Received>> {
        Ok(self.wire.head().await?.map(|raw| Received {
            connection: self.number,
            head: Head::parse(&raw),
            body: Vec::new(),
        }))
    }

    /// Reads the request's body, framed as its head says.
    async fn body(&mut self, request: &mut Received) -> io::Result<()> {
        if request.head.is_chunked() {
            self.wire.chunked(&mut request.body).await
        } else if let Some(n) = request.head.content_length() {
            request.body = self.wire.take(n).await?;
            if request.body.len() < n {
                return Err(ended("in a request body"));
            }
            Ok(())
        } else {
            Ok(())
        }
    }

    fn record(&self, request: &Received) {
        self.seen.requests.lock().unwrap().push(request.clone());
    }

    /// The next request, body and all, recorded.
    async fn request(&mut self) -> io::Result<Option<Received>> {
        let Some(mut request) = self.head().await? else {
            return Ok(None);
        };
        self.body(&mut request).await?;
        self.record(&request);
        Ok(Some(request))
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        self.tx.write_all(bytes.as_ref()).await
    }
}

/// A 200 with `body`, framed by its length.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut response =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    response.extend_from_slice(body);
    response
}

/// Answers every request with its body, or with its target if it has none.
async fn echo(mut conn: Conn) -> io::Result<()> {
    while let Some(request) = conn.request().await? {
        let body = if request.body.is_empty() {
            request.target().as_bytes()
        } else {
            &request.body
        };
        conn.send(ok(body)).await?;
    }
    Ok(())
}

/// `n` bytes that differ with their offset, so that a lost, repeated or
/// misplaced piece shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// The chunks `/chunked` answers with, of varied sizes.
fn chunks() -> Vec<Vec<u8>> {
    (1..=8).map(|i| vec![b'a' + i as u8; i * 100]).collect()
}

const BIG: usize = 10 * 1024 * 1024;

/// Answers `/length`, `/chunked` (in pieces, written apart), `/close`
/// (no length: the body ends with the connection) and `/big` (10 MiB by
/// length); echoes anything else.
async fn assorted(mut conn: Conn) -> io::Result<()> {
    while let Some(request) = conn.request().await? {
        match request.target() {
            "/length" => conn.send(ok(&pattern(1000))).await?,
            "/chunked" => {
                conn.send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await?;
                for chunk in chunks() {
                    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                    framed.extend_from_slice(&chunk);
                    framed.extend_from_slice(b"\r\n");
                    conn.send(framed).await?;
                    // Apart, so that the router sees them one by one.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                conn.send("0\r\n\r\n").await?;
            }
            "/close" => {
                conn.send("HTTP/1.1 200 OK\r\n\r\n").await?;
                for piece in pattern(3000).chunks(1000) {
                    conn.send(piece).await?;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                return Ok(());
            }
            "/big" => conn.send(ok(&pattern(BIG))).await?,
            target => conn.send(ok(target.as_bytes())).await?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1-4: requests on their way

#[tokio::test]
async fn requests_one_after_another_share_one_backend_connection_and_say_who_asked() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for target in ["/x?y=1", "/x?y=2"] {
        client
            .send(format!(
                "GET {target} HTTP/1.1\r\nHost: app.example\r\n\r\n"
            ))
            .await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, target.as_bytes());
    }
    assert_eq!(backend.seen.connections(), 1);
    let requests = backend.seen.requests();
    assert!(requests.iter().all(|r| r.connection == 1));
    let targets: Vec<&str> = requests.iter().map(Received::target).collect();
    assert_eq!(targets, ["/x?y=1", "/x?y=2"]);
    for request in &requests {
        let head = &request.head;
        assert_eq!(head.all("host"), ["app.example"], "{}", head.raw);
        assert_eq!(head.joined("x-forwarded-for"), "127.0.0.1", "{}", head.raw);
        assert_eq!(head.joined("x-forwarded-proto"), "http", "{}", head.raw);
    }
}

#[tokio::test]
async fn an_absolute_form_target_reaches_the_backend_in_origin_form() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("GET http://app/x?y=1 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    let requests = backend.seen.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].target(), "/x?y=1", "{}", requests[0].head.raw);
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_router_both_ways() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            if request.target() == "/hop" {
                conn.send(
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-resp-hop\r\n\
                     X-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-End-To-End: 1\r\n\r\nok",
                )
                .await?;
            } else {
                conn.send(ok(request.target().as_bytes())).await?;
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send(
            "GET /hop HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
             Upgrade: websocket\r\nX-Request-Id: abc\r\n\r\n",
        )
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body, b"ok");

    let sent = &backend.seen.requests_for("/hop")[0].head;
    for name in ["x-hop", "keep-alive", "proxy-connection", "te", "upgrade"] {
        assert!(!sent.has(name), "{name} reached the backend:\n{}", sent.raw);
    }
    // The router may speak for its own connection, but not pass on the client's.
    for value in sent.all("connection") {
        assert!(
            ["keep-alive", "close"].contains(&value.to_ascii_lowercase().as_str()),
            "the client's Connection reached the backend:\n{}",
            sent.raw
        );
    }
    assert_eq!(sent.get("x-request-id"), Some("abc"), "{}", sent.raw);

    let got = &response.head;
    for name in ["x-resp-hop", "keep-alive"] {
        assert!(!got.has(name), "{name} reached the client:\n{}", got.raw);
    }
    for value in got.all("connection") {
        assert!(
            value.eq_ignore_ascii_case("keep-alive"),
            "the backend's Connection reached the client:\n{}",
            got.raw
        );
    }
    assert_eq!(got.get("x-end-to-end"), Some("1"), "{}", got.raw);
    client.get_echo("/after").await;
}

#[tokio::test]
async fn forwarding_headers_extend_what_an_earlier_proxy_said() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send(
            "GET /x HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 1.2.3.4\r\n\
             X-Forwarded-Proto: https\r\n\r\n",
        )
        .await;
    assert_eq!(client.response("GET").await.status(), 200);
    let sent = &backend.seen.requests()[0].head;
    assert_eq!(
        sent.joined("x-forwarded-for"),
        "1.2.3.4, 127.0.0.1",
        "{}",
        sent.raw
    );
    assert_eq!(sent.joined("x-forwarded-proto"), "https", "{}", sent.raw);

    // Several fields: one list, in order, the client last.
    client
        .send(
            "GET /y HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 1.1.1.1\r\n\
             X-Forwarded-For: 2.2.2.2, 3.3.3.3\r\n\r\n",
        )
        .await;
    assert_eq!(client.response("GET").await.status(), 200);
    let sent = &backend.seen.requests_for("/y")[0].head;
    assert_eq!(
        sent.all("x-forwarded-for"),
        ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"],
        "{}",
        sent.raw
    );
}

// ---------------------------------------------------------------------------
// 5-9: bodies

#[tokio::test]
async fn request_bodies_arrive_whole_by_length_and_chunked_and_the_connection_goes_on() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;

    let body = pattern(100 * 1024);
    let mut request = format!(
        "POST /length HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    client.send(request).await;
    let response = client.response("POST").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(response.body == body, "echo differs");
    assert!(backend.seen.requests_for("/length")[0].body == body);
    client.get_echo("/after-length").await;

    client
        .send("POST /chunked HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let big_chunk = pattern(4096);
    let mut pieces = vec![
        b"5\r\nhello\r\n".to_vec(),
        b"6;a=b\r\n world\r\n".to_vec(),
        b"1000\r\n".to_vec(),
    ];
    pieces[2].extend_from_slice(&big_chunk);
    pieces[2].extend_from_slice(b"\r\n");
    pieces.push(b"0\r\n\r\n".to_vec());
    for piece in pieces {
        client.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut body = b"hello world".to_vec();
    body.extend_from_slice(&big_chunk);
    let response = client.response("POST").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(response.body == body, "echo differs");
    assert!(backend.seen.requests_for("/chunked")[0].body == body);
    client.get_echo("/after-chunked").await;
}

#[tokio::test]
async fn response_bodies_arrive_whole_by_length_chunked_and_close() {
    let backend = backend(assorted).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;

    client
        .send("GET /length HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(response.body == pattern(1000));

    client
        .send("GET /chunked HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(response.body == chunks().concat());

    client.send("GET /big HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body.len(), BIG);
    assert!(response.body == pattern(BIG), "10 MiB body differs");

    // Last: a body the backend ends by closing may end the client connection too.
    client
        .send("GET /close HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(
        response.body == pattern(3000),
        "close-delimited body differs"
    );
    println!(
        "a close-delimited body reached the client {:?}",
        response.framing
    );
}

#[tokio::test]
async fn a_head_response_has_no_body_and_the_connection_goes_on() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            if request.method() == "HEAD" && request.target() == "/chunked" {
                conn.send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await?;
            } else if request.method() == "HEAD" {
                conn.send("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    .await?;
            } else {
                conn.send(ok(request.target().as_bytes())).await?;
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("HEAD /h HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("HEAD").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    // The length of the body a GET would get, if told at all.
    if let Some(length) = response.head.get("content-length") {
        assert_eq!(length, "1000", "{}", response.head.raw);
    }
    client.get_echo("/after").await;
    // A chunked one: no chunks follow either.
    client
        .send("HEAD /chunked HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("HEAD").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    client.get_echo("/after-chunked").await;
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body_and_the_connection_goes_on() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            match request.target() {
                "/204" => conn.send("HTTP/1.1 204 No Content\r\n\r\n").await?,
                "/304" => {
                    conn.send("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
                        .await?
                }
                target => conn.send(ok(target.as_bytes())).await?,
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for status in [204, 304] {
        client
            .send(format!("GET /{status} HTTP/1.1\r\nHost: app\r\n\r\n"))
            .await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), status, "{}", response.head.raw);
        client.get_echo(&format!("/after-{status}")).await;
    }
}

#[tokio::test]
async fn expect_continue_gets_the_final_response_to_the_whole_body() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(mut request) = conn.head().await? {
            if request
                .head
                .get("expect")
                .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
            {
                conn.send("HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            conn.body(&mut request).await?;
            conn.record(&request);
            conn.send(ok(&request.body)).await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send(
            "POST /e HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\
             Expect: 100-continue\r\n\r\n",
        )
        .await;
    // As curl does: wait a second for the go-ahead, then send the body anyway.
    let go_ahead = match timeout(Duration::from_secs(1), client.wire.head()).await {
        Ok(head) => {
            let head = Head::parse(&head.unwrap().expect("closed before the body was sent"));
            assert_eq!(
                head.status(),
                100,
                "a final answer before the body: {}",
                head.raw
            );
            true
        }
        Err(_) => false,
    };
    println!("100 Continue relayed to the client: {go_ahead}");
    client.send("0123456789").await;
    let response = client.response("POST").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body, b"0123456789");
    println!("interim responses after the body: {:?}", response.interim);
}

// ---------------------------------------------------------------------------
// 10-12: older and eager clients

#[tokio::test]
async fn http_1_0_clients_get_their_connection_semantics_and_no_chunks() {
    let backend = backend(assorted).await;
    let router = router(&[backend.addr]).await;

    // No keep-alive asked for: the connection ends with the response.
    let mut client = Client::connect(&router).await;
    client.send("GET /a HTTP/1.0\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body, b"/a");
    client.wire.closed().await;

    // Keep-alive asked for: the connection takes another request.
    let mut client = Client::connect(&router).await;
    for target in ["/b1", "/b2"] {
        client
            .send(format!(
                "GET {target} HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n"
            ))
            .await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, target.as_bytes());
    }

    // No Host: the backend gets one anyway, as HTTP/1.1 requires.
    let mut client = Client::connect(&router).await;
    client.send("GET /c HTTP/1.0\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    let sent = &backend.seen.requests_for("/c")[0].head;
    assert!(
        sent.get("host").is_some_and(|h| !h.is_empty()),
        "no Host:\n{}",
        sent.raw
    );

    // A chunked answer reaches an HTTP/1.0 client unchunked.
    let mut client = Client::connect(&router).await;
    client
        .send("GET /chunked HTTP/1.0\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert!(
        !response.head.has("transfer-encoding"),
        "{}",
        response.head.raw
    );
    assert_ne!(response.framing, Framing::Chunked);
    assert!(response.body == chunks().concat(), "body differs");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send(
            "GET /first HTTP/1.1\r\nHost: app\r\n\r\n\
             GET /second HTTP/1.1\r\nHost: app\r\n\r\n",
        )
        .await;
    for target in ["/first", "/second"] {
        let response = client.response("GET").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, target.as_bytes());
    }
}

#[tokio::test]
async fn pipelined_requests_with_bodies_are_answered_in_order() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send(
            "POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nfirst\
             POST /b HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nsec\r\n3;x=y\r\nond\r\n0\r\nX-Trailer: 1\r\n\r\n\
             GET /third HTTP/1.1\r\nHost: app\r\n\r\n",
        )
        .await;
    for (method, body) in [("POST", "first"), ("POST", "second"), ("GET", "/third")] {
        let response = client.response(method).await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(String::from_utf8_lossy(&response.body), body);
    }
    assert_eq!(backend.seen.connections(), 1);
}

// ---------------------------------------------------------------------------
// 13-14: what the router refuses

#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused_or_made_unambiguous() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;

    let mut client = Client::connect(&router).await;
    client.send("GARBAGE\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 400, "{}", response.head.raw);
    client.wire.closed().await;

    // Length and chunked at once: the framing request smuggling plays on.
    // The chunked body is longer than the length says.
    let mut client = Client::connect(&router).await;
    client
        .send(
            "POST /both HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
    let response = client.response("POST").await;
    let forwarded = backend.seen.requests_for("/both");
    println!(
        "length and chunked at once: {} to the client, {} request(s) to the backend",
        response.status(),
        forwarded.len()
    );
    match response.status() {
        400 => assert!(forwarded.is_empty(), "refused, yet forwarded"),
        200 => {
            let sent = &forwarded[0];
            assert!(
                !(sent.head.has("content-length") && sent.head.has("transfer-encoding")),
                "both framings reached the backend:\n{}",
                sent.head.raw
            );
            assert_eq!(sent.body, b"hello", "{}", sent.head.raw);
        }
        other => panic!("{other}: {}", response.head.raw),
    }

    let mut client = Client::connect(&router).await;
    client
        .send(
            "POST /twice HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\
             Content-Length: 4\r\n\r\nabcd",
        )
        .await;
    let response = client.response("POST").await;
    assert_eq!(response.status(), 400, "{}", response.head.raw);
    assert!(backend.seen.requests_for("/twice").is_empty());
}

#[tokio::test]
async fn a_huge_header_is_refused_and_the_router_serves_on() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    let huge = "a".repeat(100 * 1024);
    // The router may close before it has read it all.
    let _ = client
        .try_send(format!(
            "GET /huge HTTP/1.1\r\nHost: app\r\nX-Huge: {huge}\r\n\r\n"
        ))
        .await;
    let response = client.response("GET").await;
    assert!(
        (400..500).contains(&response.status()),
        "{}",
        response.head.raw
    );
    client.wire.closed().await;
    Client::connect(&router).await.get_echo("/after").await;
}

// ---------------------------------------------------------------------------
// 15-20: backends that end early, close, lie or stall

/// Sends `head` then `body` on its own task, ignoring errors: the far side
/// may answer, or close, before taking it all.
fn upload(mut tx: OwnedWriteHalf, head: String, body: Vec<u8>) {
    tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        tx.write_all(&body).await?;
        Ok::<_, io::Error>(tx)
    });
}

#[tokio::test]
async fn a_backend_refusing_an_upload_unread_does_not_hang_the_client() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(mut request) = conn.head().await? {
            conn.record(&request);
            if request.target() == "/upload" {
                // Closes with the body unread, as a server at its limit does.
                return conn
                    .send(
                        "HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n\
                         Content-Length: 0\r\n\r\n",
                    )
                    .await;
            }
            conn.body(&mut request).await?;
            conn.send(ok(request.target().as_bytes())).await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let Client { mut wire, tx } = Client::connect(&router).await;
    let body = pattern(8 * 1024 * 1024);
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    upload(tx, head, body);
    match wire.answer("POST").await {
        Answer::Whole(response) => assert_eq!(response.status(), 413, "{}", response.head.raw),
        Answer::Closed => println!("the client connection was closed without an answer"),
        truncated => panic!("{truncated:?}"),
    }
    Client::connect(&router).await.get_echo("/after").await;
}

#[tokio::test]
async fn an_upload_answered_early_holds_up_no_other_request() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(mut request) = conn.head().await? {
            conn.record(&request);
            if request.target() == "/upload" {
                // Answers at once, then takes the body at its own pace.
                conn.send(ok(b"accepted")).await?;
            }
            conn.body(&mut request).await?;
            if request.target() != "/upload" {
                conn.send(ok(request.target().as_bytes())).await?;
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut uploader = Client::connect(&router).await;
    let body = pattern(1024 * 1024);
    uploader
        .send(format!(
            "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ))
        .await;
    let (first_half, second_half) = body.split_at(body.len() / 2);
    uploader.send(first_half).await;
    let response = uploader.response("POST").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body, b"accepted");

    // With the upload still open: several connections, as the router may
    // spread them over its threads and only one shares the uploader's.
    for i in 0..3 {
        Client::connect(&router)
            .await
            .get_echo(&format!("/other-{i}"))
            .await;
    }
    uploader.send(second_half).await;
    uploader.get_echo("/after-upload").await;
}

#[tokio::test]
async fn a_backend_closing_each_connection_after_its_response_costs_no_request() {
    let backend = backend(|mut conn: Conn| async move {
        if let Some(request) = conn.request().await? {
            // Says nothing of closing: the router learns it from the FIN.
            conn.send(ok(request.target().as_bytes())).await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for i in 0..20 {
        client.get_echo(&format!("/{i}")).await;
    }
}

#[tokio::test]
async fn a_body_cut_short_by_the_backend_ends_the_client_connection() {
    let backend = backend(|mut conn: Conn| async move {
        if conn.number > 1 {
            return echo(conn).await;
        }
        conn.request().await?;
        conn.send("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .await
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("GET /cut HTTP/1.1\r\nHost: app\r\n\r\n").await;
    match client.wire.answer("GET").await {
        // `answer` read to the end of the stream: the router closed.
        Answer::Truncated(response) => {
            assert_eq!(response.status(), 200, "{}", response.head.raw);
            assert!(response.body.len() < 1000);
            println!("cut short after {} bytes, then closed", response.body.len());
        }
        Answer::Whole(response) => {
            assert_eq!(response.status(), 502, "{}", response.head.raw)
        }
        Answer::Closed => {}
    }
    Client::connect(&router).await.get_echo("/after").await;
}

#[tokio::test]
async fn a_backend_answering_garbage_gets_the_client_a_bad_gateway() {
    let backend = backend(|mut conn: Conn| async move {
        conn.head().await?;
        conn.send("NOT HTTP\r\n\r\n").await
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("GET /x HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 502, "{}", response.head.raw);
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_the_client_a_gateway_timeout() {
    let backend = backend(|mut conn: Conn| async move {
        conn.head().await?;
        // Holds the connection open, silent.
        std::future::pending::<()>().await;
        drop(conn);
        Ok(())
    })
    .await;
    let response_timeout = Duration::from_secs(2);
    let router = router_with("/", &[backend.addr], response_timeout).await;
    let mut client = Client::connect(&router).await;
    let asked = Instant::now();
    client.send("GET /x HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 504, "{}", response.head.raw);
    assert!(
        asked.elapsed() >= response_timeout - Duration::from_millis(50),
        "504 after only {:?}",
        asked.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 21: no route

#[tokio::test]
async fn an_unknown_path_gets_a_framed_not_found_and_the_connection_goes_on() {
    let backend = backend(echo).await;
    let router = router_with("/app", &[backend.addr], RESPONSE_TIMEOUT).await;
    let mut client = Client::connect(&router).await;
    client
        .send("GET /elsewhere HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 404, "{}", response.head.raw);
    assert_eq!(response.framing, Framing::Length, "{}", response.head.raw);
    client.get_echo("/app/x").await;
    assert!(backend.seen.requests_for("/elsewhere").is_empty());
}

// ---------------------------------------------------------------------------
// 22-25: backends that answer oddly or go away

#[tokio::test]
async fn a_response_in_tiny_pieces_or_behind_an_interim_one_in_the_same_read_arrives_whole() {
    let backend = backend(|mut conn: Conn| async move {
        conn.tx.as_ref().set_nodelay(true)?;
        while let Some(request) = conn.request().await? {
            match request.target() {
                "/interim" => {
                    conn.send(
                        "HTTP/1.1 100 Continue\r\n\r\n\
                         HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    )
                    .await?
                }
                "/tiny" => {
                    let response = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello";
                    for byte in response {
                        conn.send([*byte]).await?;
                        // Apart, so that the router reads them one by one.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                target => conn.send(ok(target.as_bytes())).await?,
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("GET /interim HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.interim, [100]);
    assert_eq!(response.body, b"ok");
    client.send("GET /tiny HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.head.get("x-a"), Some("1"), "{}", response.head.raw);
    assert_eq!(response.body, b"hello");
    client.get_echo("/after").await;
    assert_eq!(backend.seen.connections(), 1);
}

#[tokio::test]
async fn bytes_after_a_response_body_never_reach_the_next_request() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            let mut response = ok(request.target().as_bytes());
            if request.target() == "/extra" {
                response.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!");
            }
            conn.send(response).await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.get_echo("/extra").await;
    client.get_echo("/next").await;
}

#[tokio::test]
async fn a_response_head_over_64_kib_gets_a_bad_gateway_and_the_router_serves_on() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            if request.target() == "/huge" {
                let huge = "a".repeat(70 * 1024);
                conn.send(format!(
                    "HTTP/1.1 200 OK\r\nX-Huge: {huge}\r\nContent-Length: 2\r\n\r\nok"
                ))
                .await?;
            } else {
                conn.send(ok(request.target().as_bytes())).await?;
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("GET /huge HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 502, "{}", response.head.raw);
    client.get_echo("/after").await;
}

#[tokio::test]
async fn after_the_backend_restarts_its_pooled_connections_cost_no_request() {
    const CLIENTS: usize = 4;
    let (restart, restarted) = watch::channel(());
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel();
    // All first requests are held until every one has arrived, so that each
    // has a backend connection of its own, and all go back to the pool.
    let arrived = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let backend = backend(move |mut conn: Conn| {
        let mut restarted = restarted.clone();
        restarted.borrow_and_update();
        let arrived = arrived.clone();
        let gone = gone_tx.clone();
        async move {
            loop {
                let request = tokio::select! {
                    request = conn.request() => match request? {
                        Some(request) => request,
                        None => return Ok(()),
                    },
                    _ = restarted.changed() => {
                        // Closes the connection, as a process exiting does.
                        drop(conn);
                        let _ = gone.send(());
                        return Ok(());
                    }
                };
                if request.target().starts_with("/warm") {
                    arrived.wait().await;
                }
                let body = if request.body.is_empty() {
                    request.target().as_bytes()
                } else {
                    &request.body
                };
                conn.send(ok(body)).await?;
            }
        }
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut warming = Vec::new();
    for i in 0..CLIENTS {
        let mut client = Client::connect(&router).await;
        warming.push(tokio::spawn(async move {
            client.get_echo(&format!("/warm-{i}")).await;
            client
        }));
    }
    let mut clients = Vec::new();
    for warm in warming {
        clients.push(warm.await.unwrap());
    }
    assert_eq!(backend.seen.connections(), CLIENTS);

    restart.send(()).unwrap();
    for _ in 0..CLIENTS {
        timeout(DEADLINE, gone.recv())
            .await
            .expect("the backend closes its connections")
            .unwrap();
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client.get_echo(&format!("/again-{i}")).await;
        client
            .send("POST /post HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
            .await;
        let response = client.response("POST").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, b"hello");
    }
}

// ---------------------------------------------------------------------------
// 26-33: known bugs, ignored until fixed

#[tokio::test]
async fn a_connection_field_naming_the_framing_smuggles_no_request() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    let chunked = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    for (target, framing, body) in [
        (
            "/length",
            format!("Content-Length: {}", smuggled.len()),
            smuggled.to_owned(),
        ),
        ("/chunked", "Transfer-Encoding: chunked".to_owned(), chunked),
    ] {
        let name = framing.split(':').next().unwrap();
        let mut client = Client::connect(&router).await;
        client
            .send(format!(
                "POST {target} HTTP/1.1\r\nHost: app\r\nConnection: {name}\r\n{framing}\r\n\r\n{body}"
            ))
            .await;
        let response = client.response("POST").await;
        let forwarded = backend.seen.requests_for(target);
        match response.status() {
            400 => assert!(forwarded.is_empty(), "refused, yet forwarded"),
            200 => {
                let sent = &forwarded[0];
                assert_eq!(
                    String::from_utf8_lossy(&sent.body),
                    smuggled,
                    "`Connection: {name}`: the backend got no body, so it reads it as a request:\n{}",
                    sent.head.raw
                );
            }
            other => panic!("{other}: {}", response.head.raw),
        }
    }
}

/// Reads a line ended by LF alone or by CRLF, without its end, as RFC 9112
/// §2.2 lets a recipient do.
async fn lenient_line(wire: &mut Wire<OwnedReadHalf>) -> io::Result<Vec<u8>> {
    loop {
        if let Some(i) = wire.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = wire.buf.drain(..=i).take(i).collect();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if !wire.fill().await? {
            return Err(ended("in a line"));
        }
    }
}

#[tokio::test]
async fn a_bare_lf_in_a_chunk_size_line_smuggles_no_request() {
    // Reads chunked bodies with lines ended by LF alone, as many servers do.
    let backend = backend(|mut conn: Conn| async move {
        while let Some(mut request) = conn.head().await? {
            if request.head.is_chunked() {
                loop {
                    let line = lenient_line(&mut conn.wire).await?;
                    let size = line.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
                    if size == 0 {
                        while !lenient_line(&mut conn.wire).await?.is_empty() {}
                        break;
                    }
                    let data = conn.wire.take(size).await?;
                    request.body.extend_from_slice(&data);
                    lenient_line(&mut conn.wire).await?;
                }
            }
            conn.record(&request);
            conn.send(ok(request.target().as_bytes())).await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    // The router ends the size line at the CRLF, so its chunk is `inner`;
    // the backend ends it at the LF, so its chunk is `a`s, and `inner` is
    // the last chunk and a request of its own.
    let inner = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    let size = inner.len() - 2;
    let body = format!("{size:x};\n{}\r\n{inner}0\r\n\r\n", "a".repeat(size));
    let mut client = Client::connect(&router).await;
    client
        .send(format!(
            "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        ))
        .await;
    let response = client.response("POST").await;
    let forwarded = backend.seen.requests_for("/upload");
    match response.status() {
        400 => assert!(forwarded.is_empty(), "refused, yet forwarded"),
        200 => assert_eq!(
            String::from_utf8_lossy(&forwarded[0].body),
            &inner[..size],
            "the backend framed the body otherwise than the router"
        ),
        other => panic!("{other}: {}", response.head.raw),
    }
}

/// The first connection answers its first request, then takes the second
/// and closes before answering: a kept-alive connection the backend gave
/// up on just as a request arrived (or a crashing process). Later
/// connections echo.
async fn closes_on_the_second_request(mut conn: Conn) -> io::Result<()> {
    if conn.number > 1 {
        return echo(conn).await;
    }
    let Some(request) = conn.request().await? else {
        return Ok(());
    };
    conn.send(ok(request.target().as_bytes())).await?;
    conn.request().await?;
    Ok(())
}

#[tokio::test]
async fn a_get_on_a_connection_the_backend_closes_as_it_arrives_goes_again_on_a_new_one() {
    let backend = backend(closes_on_the_second_request).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.get_echo("/warm").await;
    client.get_echo("/again").await;
    let sent = backend.seen.requests_for("/again");
    assert_eq!(sent.len(), 2, "the GET went out once more, whole");
    assert_eq!(sent[1].connection, 2);
}

#[tokio::test]
async fn a_non_idempotent_request_is_never_sent_twice() {
    let backend = backend(closes_on_the_second_request).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.get_echo("/warm").await;
    client
        .send("POST /charge HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n")
        .await;
    let response = client.response("POST").await;
    assert_eq!(
        backend.seen.requests_for("/charge").len(),
        1,
        "the POST reached the backend more than once; the client got {}",
        response.head.raw
    );
    assert_eq!(response.status(), 502, "{}", response.head.raw);
}

#[tokio::test]
async fn on_shutdown_new_connections_are_refused_and_a_request_in_flight_is_answered() {
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let released = release.clone();
    // Holds its answer until released.
    let backend = backend(move |mut conn: Conn| {
        let (arrived, released) = (arrived_tx.clone(), released.clone());
        async move {
            if let Some(request) = conn.request().await? {
                let _ = arrived.send(());
                released.notified().await;
                conn.send(ok(request.target().as_bytes())).await?;
            }
            Ok(())
        }
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("GET /slow HTTP/1.1\r\nHost: app\r\n\r\n").await;
    timeout(DEADLINE, arrived.recv())
        .await
        .expect("the request reaches the backend");

    router.stop.cancel();
    timeout(DEADLINE, async {
        while TcpStream::connect(router.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the router stops accepting");

    // The request outlasts the start of the shutdown by a clear margin:
    // without the drain its connection would be gone by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.notify_one();
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    assert_eq!(response.body, b"/slow");
    client.wire.closed().await;
}

#[tokio::test]
async fn a_malformed_chunk_in_a_later_read_gets_a_bad_request() {
    let (got_head, mut head_arrived) = tokio::sync::mpsc::unbounded_channel();
    let backend = backend(move |mut conn: Conn| {
        let got_head = got_head.clone();
        async move {
            while let Some(mut request) = conn.head().await? {
                let _ = got_head.send(());
                conn.body(&mut request).await?;
                conn.record(&request);
                conn.send(ok(&request.body)).await?;
            }
            Ok(())
        }
    })
    .await;
    let response_timeout = Duration::from_secs(1);
    let router = router_with("/", &[backend.addr], response_timeout).await;
    let mut client = Client::connect(&router).await;
    client
        .send("POST /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    // The head went on: the next bytes come in a read of their own.
    timeout(DEADLINE, head_arrived.recv())
        .await
        .expect("the head reaches the backend")
        .unwrap();
    let asked = Instant::now();
    client.send("zz\r\n").await;
    let response = client.response("POST").await;
    assert_eq!(
        response.status(),
        400,
        "after {:?}: {}",
        asked.elapsed(),
        response.head.raw
    );
}

#[tokio::test]
async fn a_client_hanging_up_mid_download_is_not_held_against_the_backend() {
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel();
    let backend = backend(move |mut conn: Conn| {
        let gone = gone_tx.clone();
        async move {
            while let Some(request) = conn.request().await? {
                if request.target() != "/stream" {
                    conn.send(ok(request.target().as_bytes())).await?;
                    continue;
                }
                // More than any client waits for: sent until the router hangs up.
                conn.send("HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
                    .await?;
                let piece = pattern(64 * 1024);
                while conn.send(&piece).await.is_ok() {}
                let _ = gone.send(());
                return Ok(());
            }
            Ok(())
        }
    })
    .await;
    let router = router(&[backend.addr]).await;
    // `EJECT_AFTER` (3) failures in a row eject.
    for _ in 0..3 {
        let mut client = Client::connect(&router).await;
        client
            .send("GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")
            .await;
        timeout(DEADLINE, client.wire.head())
            .await
            .expect("the response head")
            .unwrap()
            .expect("a head");
        drop(client);
        // The router dropped the backend connection, so it has recorded the
        // exchange's outcome.
        timeout(DEADLINE, gone.recv())
            .await
            .expect("the router closes the backend connection")
            .unwrap();
    }
    let ejected = timeout(Duration::from_millis(10), router.ejected.notified()).await;
    assert!(
        ejected.is_err(),
        "the backend was ejected for its clients hanging up"
    );
    Client::connect(&router).await.get_echo("/after").await;
}

#[tokio::test]
async fn a_client_hanging_up_mid_upload_releases_the_backend_connection() {
    let (head_tx, mut head_arrived) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let backend = backend(move |mut conn: Conn| {
        let (head_tx, closed_tx) = (head_tx.clone(), closed_tx.clone());
        async move {
            while let Some(mut request) = conn.head().await? {
                let _ = head_tx.send(());
                if conn.body(&mut request).await.is_err() {
                    // The router hung up mid-body.
                    let _ = closed_tx.send(());
                    return Ok(());
                }
                conn.send(ok(&request.body)).await?;
            }
            Ok(())
        }
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await;
    timeout(DEADLINE, head_arrived.recv())
        .await
        .expect("the head reaches the backend")
        .unwrap();
    drop(client);
    let left = Instant::now();
    timeout(Duration::from_secs(1), closed.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the backend connection still open {:?} after the client left",
                left.elapsed()
            )
        })
        .unwrap();
}

#[tokio::test]
async fn an_absolute_form_target_gives_the_backend_its_host() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("GET http://app.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    let sent = &backend.seen.requests_for("/x")[0].head;
    assert_eq!(sent.all("host"), ["app.example"], "{}", sent.raw);
}

#[tokio::test]
async fn an_http_1_0_response_with_transfer_encoding_ends_its_connection() {
    let backend = backend(|mut conn: Conn| async move {
        while conn.request().await?.is_some() {
            conn.send(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n\
                 2\r\nok\r\n0\r\n\r\n",
            )
            .await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for _ in 0..2 {
        client.send("GET /x HTTP/1.1\r\nHost: app\r\n\r\n").await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, b"ok");
    }
    assert_eq!(
        backend.seen.connections(),
        2,
        "the connection of a faulty framing was reused"
    );
}

// ---------------------------------------------------------------------------
// Framing gaps (issue 11, part 2): what the router forwards must frame the
// same for every reader downstream.

/// The router's limit on a head, request or response.
const MAX_HEAD: usize = signpost_router::http1::MAX_HEAD;

/// A head of exactly `len` bytes, `start` line first, padded by one field:
/// its end comes in the second of two writes, `first` bytes into it.
fn padded_head(start: &str, len: usize, first: usize) -> (String, String) {
    let fixed = start.len() + "X-Pad: \r\n\r\n".len();
    let head = format!("{start}X-Pad: {}\r\n\r\n", "p".repeat(len - fixed));
    assert_eq!(head.len(), len);
    let (a, b) = head.split_at(first);
    (a.to_owned(), b.to_owned())
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_refused_when_it_ends_in_a_later_read() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    // Under the limit until its last read, which ends it just past it.
    let (first, rest) = padded_head(
        "GET /big-head HTTP/1.1\r\nHost: app\r\n",
        MAX_HEAD + 16,
        60_000,
    );
    client.send(first).await;
    // The pause only gives the bug its shape (the first part read alone,
    // so the read that completes the head is the one that takes it past
    // the limit); the verdict does not depend on it: with the fix any head
    // over the limit is refused, however it is read.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = client.try_send(rest).await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 431, "{}", response.head.raw);
    client.wire.closed().await;
    assert!(backend.seen.requests_for("/big-head").is_empty());
    Client::connect(&router).await.get_echo("/after").await;
}

#[tokio::test]
async fn a_response_head_over_64_kib_gets_a_bad_gateway_when_it_ends_in_a_later_read() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            if request.target() == "/big-head" {
                let (first, rest) = padded_head(
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
                    MAX_HEAD + 16,
                    60_000,
                );
                conn.send(first).await?;
                conn.send(rest).await?;
            } else {
                conn.send(ok(request.target().as_bytes())).await?;
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("GET /big-head HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 502, "{}", response.head.raw);
    client.get_echo("/after").await;
}

/// Sends a chunked POST to `target` with `body` in one write and returns
/// the status the client got.
async fn post_chunked(router: &Router, target: &str, body: &str) -> u16 {
    let mut client = Client::connect(router).await;
    client
        .send(format!(
            "POST {target} HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        ))
        .await;
    client.response("POST").await.status()
}

#[tokio::test]
async fn chunk_size_lines_outside_the_grammar_are_refused_not_forwarded() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    for (target, body) in [
        // Whitespace after the size, with no extension after it.
        ("/size-space", "5 \r\nhello\r\n0\r\n\r\n"),
        ("/size-tab", "5\t\r\nhello\r\n0\r\n\r\n"),
        // A quoted extension value left open: a reader that lets a quoted
        // string run past the line end frames the rest otherwise.
        ("/open-quote", "5;a=\"b\r\nhello\r\n0\r\n\r\n"),
        ("/no-name", "5;\r\nhello\r\n0\r\n\r\n"),
        ("/no-value", "5;a=\r\nhello\r\n0\r\n\r\n"),
    ] {
        let status = post_chunked(&router, target, body).await;
        assert_eq!(status, 400, "{body:?}");
        assert!(
            backend.seen.requests_for(target).is_empty(),
            "{body:?} reached the backend"
        );
    }
    // What the grammar allows goes through: whitespace around `;` and `=`,
    // and a quoted value holding `;` and an escaped quote.
    let status = post_chunked(
        &router,
        "/ext",
        "5 ; a = \"x;\\\"y\" ;b\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(backend.seen.requests_for("/ext")[0].body, b"hello");
}

#[tokio::test]
async fn a_request_line_in_a_request_trailer_is_refused_not_forwarded() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    for (target, trailer) in [
        ("/request-line", "GET /smuggled HTTP/1.1\r\nHost: app\r\n"),
        ("/space-before-colon", "X-Sum : 1\r\n"),
    ] {
        let body = format!("5\r\nhello\r\n0\r\n{trailer}\r\n");
        let status = post_chunked(&router, target, &body).await;
        assert_eq!(status, 400, "{trailer:?}");
        assert!(
            backend.seen.requests_for(target).is_empty(),
            "{trailer:?} reached the backend"
        );
    }
    // A field line is a trailer and passes.
    let status = post_chunked(&router, "/trailer", "5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(backend.seen.requests_for("/trailer")[0].body, b"hello");
}

#[tokio::test]
async fn a_status_line_in_a_response_trailer_never_reaches_the_client() {
    let backend = backend(|mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            let trailer = match request.target() {
                "/split" => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n",
                _ => "X-Sum: 1\r\n",
            };
            conn.send(format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n{trailer}\r\n"
            ))
            .await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client.send("GET /fine HTTP/1.1\r\nHost: app\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.body, b"ok");
    client
        .send("GET /split HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    // The router cannot take back what it has sent: the client gets the
    // response cut short (or nothing), and no status line in a trailer.
    let rest = timeout(DEADLINE, client.wire.rest())
        .await
        .expect("the router closes the connection")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("HTTP/1.1 200 OK\r\nContent-Length: 4"),
        "the trailer's status line reached the client: {rest:?}"
    );
}

#[tokio::test]
async fn a_length_sent_as_a_list_or_twice_goes_on_as_one_value_both_ways() {
    let lengths = [
        ("/list", "Content-Length: 5, 5\r\n"),
        ("/twice", "Content-Length: 5\r\nContent-Length: 5\r\n"),
        ("/both", "Content-Length: 5,5\r\ncontent-length: 5\r\n"),
        ("/zeros", "Content-Length: 005\r\n"),
    ];
    let backend = backend(move |mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            let (_, length) = lengths
                .iter()
                .find(|(target, _)| *target == request.target())
                .copied()
                .unwrap_or(("", "Content-Length: 5\r\n"));
            conn.send(format!("HTTP/1.1 200 OK\r\n{length}\r\nhello"))
                .await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for (target, length) in lengths {
        client
            .send(format!(
                "POST {target} HTTP/1.1\r\nHost: app\r\n{length}\r\nhello"
            ))
            .await;
        let response = client.response("POST").await;
        assert_eq!(response.status(), 200, "{}", response.head.raw);
        assert_eq!(response.body, b"hello");
        assert_eq!(
            response.head.all("content-length"),
            ["5"],
            "the client got {length:?} as:\n{}",
            response.head.raw
        );
        let sent = &backend.seen.requests_for(target)[0];
        assert_eq!(
            sent.head.all("content-length"),
            ["5"],
            "the backend got {length:?} as:\n{}",
            sent.head.raw
        );
    }
}

#[tokio::test]
async fn no_content_and_not_modified_reach_the_client_without_length_or_coding() {
    let answers = [
        (
            "/204-length",
            "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        ),
        (
            "/204-chunked",
            "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "/304-length",
            "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\n",
        ),
        (
            "/304-chunked",
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
    ];
    let backend = backend(move |mut conn: Conn| async move {
        while let Some(request) = conn.request().await? {
            match answers.iter().find(|(t, _)| *t == request.target()) {
                Some((_, answer)) => conn.send(answer).await?,
                None => conn.send(ok(request.target().as_bytes())).await?,
            }
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    for (target, answer) in answers {
        client
            .send(format!("GET {target} HTTP/1.1\r\nHost: app\r\n\r\n"))
            .await;
        let response = client.response("GET").await;
        assert!(
            !response.head.has("content-length") && !response.head.has("transfer-encoding"),
            "{answer:?} reached the client as:\n{}",
            response.head.raw
        );
        client.get_echo(&format!("/after{target}")).await;
    }
}

#[tokio::test]
async fn an_http_1_1_request_without_one_valid_host_gets_a_bad_request() {
    let backend = backend(echo).await;
    let router = router(&[backend.addr]).await;
    for (target, hosts) in [
        ("/no-host", ""),
        ("/list", "Host: app, other\r\n"),
        ("/space", "Host: app other\r\n"),
        ("/path", "Host: app/x\r\n"),
        ("/port", "Host: app:80x\r\n"),
        ("/two", "Host: app\r\nHost: other\r\n"),
    ] {
        let mut client = Client::connect(&router).await;
        client
            .send(format!("GET {target} HTTP/1.1\r\n{hosts}\r\n"))
            .await;
        let response = client.response("GET").await;
        assert_eq!(response.status(), 400, "{hosts:?}: {}", response.head.raw);
        client.wire.closed().await;
        assert!(
            backend.seen.requests_for(target).is_empty(),
            "{hosts:?} reached the backend"
        );
    }
    // HTTP/1.0 has no Host to require: the endpoint's own goes on.
    let mut client = Client::connect(&router).await;
    client.send("GET /old HTTP/1.0\r\n\r\n").await;
    let response = client.response("GET").await;
    assert_eq!(response.status(), 200, "{}", response.head.raw);
    let sent = &backend.seen.requests_for("/old")[0].head;
    assert_eq!(sent.all("host"), [backend.addr.to_string()], "{}", sent.raw);
}

#[tokio::test]
async fn a_request_body_malformed_after_the_response_began_closes_rather_than_answers() {
    // Starts its answer once the head is in, then reads the body.
    let backend = backend(|mut conn: Conn| async move {
        while let Some(mut request) = conn.head().await? {
            conn.send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
                .await?;
            conn.body(&mut request).await?;
            conn.send("world").await?;
        }
        Ok(())
    })
    .await;
    let router = router(&[backend.addr]).await;
    let mut client = Client::connect(&router).await;
    client
        .send("POST /c HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    let head = timeout(DEADLINE, client.wire.head())
        .await
        .expect("the response head")
        .unwrap()
        .expect("a head");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
    client.send("zz\r\n").await;
    let rest = timeout(DEADLINE, client.wire.rest())
        .await
        .expect("the router closes the connection")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "hello",
        "the client got more than the response it had begun (a 400 inside it?)"
    );
}
