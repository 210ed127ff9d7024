//! The controller's listeners (the API's, for `axum::serve`, and the xDS
//! server's, for tonic): plain TCP, or TLS with the server config in force
//! at each accept (so a re-read certificate applies to new connections).
//! Each connection carries its [`Peer`]: the address and, over mTLS, the
//! identity its client certificate gives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tracing::debug;

use crate::config::TlsConfig;

/// A client that has not finished its handshake by then is dropped: a slow
/// or silent client must not hold a task and a socket for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for `axum::serve` to take them.
const BACKLOG: usize = 64;

/// Who is at the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub address: SocketAddr,
    /// The identity of a verified client certificate (`None`: none was
    /// presented; `Err`: it names no identity, and why).
    pub certificate: Option<Result<String, String>>,
}

impl Connected<IncomingStream<'_, ApiListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

pub struct ApiListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<(Io, Peer)>,
    acceptor: AbortHandle,
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl ApiListener {
    /// Serves `tcp` plainly, or over TLS with the newest of `tls`.
    /// Handshakes run in their own tasks, so one slow client delays no other.
    pub fn new(
        tcp: TcpListener,
        tls: Option<(watch::Receiver<Arc<ServerConfig>>, TlsConfig)>,
    ) -> std::io::Result<ApiListener> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(BACKLOG);
        let task =
            tokio::spawn(async move {
                loop {
                    let (stream, address) = match tcp.accept().await {
                        Ok(conn) => conn,
                        Err(e) => {
                            // Out of file descriptors, most likely: wait, as
                            // axum's own listener does.
                            debug!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let Some((configs, settings)) = &tls else {
                        let peer = Peer {
                            address,
                            certificate: None,
                        };
                        if tx.send((Either::Left(stream), peer)).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    let acceptor = TlsAcceptor::from(configs.borrow().clone());
                    let tx = tx.clone();
                    let settings = settings.clone();
                    tokio::spawn(async move {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    debug!(%address, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    debug!(%address, "TLS handshake timed out");
                                    return;
                                }
                            };
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|cert| crate::tls::identity(cert, &settings));
                        let peer = Peer {
                            address,
                            certificate,
                        };
                        let _ = tx.send((Either::Right(stream), peer)).await;
                    });
                }
            });
        Ok(ApiListener {
            local,
            accepted,
            acceptor: task.abort_handle(),
        })
    }

    /// The next handshaken connection, for a server that polls (tonic).
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(Io, Peer)> {
        match self.accepted.poll_recv(cx) {
            Poll::Ready(Some(conn)) => Poll::Ready(conn),
            // The acceptor only ends when this listener is dropped.
            _ => Poll::Pending,
        }
    }
}

impl Listener for ApiListener {
    type Io = Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (Io, Peer) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            // The acceptor only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            address: self.local,
            certificate: None,
        })
    }
}
