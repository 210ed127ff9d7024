//! Kept-alive HTTP/1.1 connections to one endpoint.
//!
//! A connection is used by one request at a time, from the task of the
//! client connection that took it, and goes back to its endpoint's idle
//! list once its exchange ended cleanly: response read to the end, request
//! sent whole, the endpoint willing to keep it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read at a time, from clients and from endpoints.
pub const READ_SIZE: usize = 16 * 1024;

/// An idle connection older than this is closed rather than reused: the
/// endpoint may have forgotten it (nginx's default keep-alive is 75 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to an endpoint, with what has been read from it and not
/// yet passed on.
pub struct Connection {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Connection {
    /// Whether the endpoint may still take a request on this idle
    /// connection. Costs no system call unless the event loop saw the socket
    /// become readable, which for an idle connection means the endpoint
    /// closed it (or sent what nobody asked for).
    fn is_open(&self) -> bool {
        matches!(self.stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[source] std::io::Error),
}

/// How many proxy threads keep their own idle lists; set once at start.
static SHARDS: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// This proxy thread's idle list in every endpoint's `Idle`.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Gives each of `n` proxy threads its own idle list in every `Idle`
/// created from now on. Called once, before the route table is built.
pub fn set_shards(n: usize) {
    let _ = SHARDS.set(n.max(1));
}

/// Marks the calling thread as proxy thread `i`.
pub fn enter_shard(i: usize) {
    SHARD.with(|s| s.set(i));
}

/// One endpoint's idle connections, one list per proxy thread: a
/// connection's task runs on the thread that opened it, so a request sent
/// on it from that thread wakes no other thread.
pub struct Idle {
    /// Each list is used as a stack, newest at the back: the most recently
    /// used connection is the least likely to have been closed by the
    /// endpoint. The front holds the oldest, so expired ones are dropped from
    /// there. A plain mutex: only its own thread takes it, for one push or
    /// pop, never across an await.
    shards: Box<[Mutex<Stack>]>,
}

/// Idle connections with the time each came back.
type Stack = VecDeque<(Connection, Instant)>;

impl Default for Idle {
    fn default() -> Idle {
        let n = *SHARDS.get().unwrap_or(&1);
        Idle {
            shards: (0..n).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Idle {
    fn shard(&self) -> &Mutex<Stack> {
        &self.shards[SHARD.with(Cell::get) % self.shards.len()]
    }

    /// The most recently used connection that is still open, if any.
    pub fn take(&self, now: Instant) -> Option<Connection> {
        let mut conns = self.shard().lock().expect("not poisoned");
        while let Some((conn, since)) = conns.pop_back() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT && conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request, and closes the connections that
    /// have been idle too long.
    pub fn put(&self, conn: Connection, now: Instant) {
        debug_assert!(conn.buf.is_empty(), "an idle connection has nothing unread");
        let mut conns = self.shard().lock().expect("not poisoned");
        while conns
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_TIMEOUT)
        {
            conns.pop_front();
        }
        conns.push_back((conn, now));
    }
}

/// Opens a connection to `addr`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
        .map_err(ConnectError::Io)?;
    stream.set_nodelay(true).map_err(ConnectError::Io)?;
    Ok(Connection {
        stream,
        buf: BytesMut::with_capacity(READ_SIZE),
    })
}
