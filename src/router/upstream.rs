//! Kept-alive HTTP/1.1 connections to one endpoint.
//!
//! The proxy connects before it hands a request over, so a refused
//! connection leaves the request whole for a retry elsewhere, and a request
//! never needs copying. A connection goes back to its endpoint's idle list
//! when the response it carried has been read to the end.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// An idle connection older than this is closed rather than reused: the
/// endpoint may have forgotten it (nginx's default keep-alive is 75 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The request side of one connection; the connection itself is a task.
pub type Connection = SendRequest<Incoming>;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
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
            if !conn.is_closed() && now.saturating_duration_since(since) < IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request, and closes the connections that
    /// have been idle too long.
    pub fn put(&self, conn: Connection, now: Instant) {
        if conn.is_closed() {
            return;
        }
        let mut conns = self.shard().lock().expect("not poisoned");
        while conns.front().is_some_and(|(c, since)| {
            c.is_closed() || now.saturating_duration_since(*since) >= IDLE_TIMEOUT
        }) {
            conns.pop_front();
        }
        conns.push_back((conn, now));
    }
}

/// Opens a connection to `addr` and runs it as its own task until either
/// side closes it.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Connection, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
        .map_err(ConnectError::Io)?;
    stream.set_nodelay(true).map_err(ConnectError::Io)?;
    let (conn, driver) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            debug!(error = %e, %addr, "endpoint connection ended");
        }
    });
    Ok(conn)
}
