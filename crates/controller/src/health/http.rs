//! The HTTP health probe: `GET path` over a connection kept alive per
//! endpoint, on a few lines of HTTP/1.1 of our own.
//!
//! Why not hyper's client: with 10,000 endpoints every one keeps a
//! connection, and hyper's pooled connection costs a connection task and
//! its buffers, about 17 KiB each (the scale bench: 193 MiB resident at
//! 10,000), and its pool and URI handling most of the probes' CPU. Here an
//! idle connection is a socket in a map; a buffer exists only while a
//! probe reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ProbeError;

/// Bytes read at a time: an answer to a health check is a status line,
/// a few headers and a short body.
const READ_CHUNK: usize = 512;
/// A longer head is refused: no health endpoint sends one.
const MAX_HEAD: usize = 16 * 1024;
/// A body up to this is read (and dropped) so that the connection can be
/// used again; a longer one, or one without a length, closes it instead.
const MAX_KEPT_BODY: usize = 64 * 1024;
/// A connection idle this long is closed rather than used: the endpoint may
/// be gone, and servers close idle connections after a while of their own.
const IDLE_FOR: Duration = Duration::from_secs(90);
/// Idle connections are swept once every this many returned.
const SWEEP_EVERY: u64 = 4096;

#[derive(Default)]
pub struct HttpProbe {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    connections: HashMap<SocketAddr, (TcpStream, Instant)>,
    returned: u64,
}

/// How an exchange failed.
enum Failed {
    /// The server had closed a kept-alive connection before this request:
    /// not the endpoint's fault, so the request is made again on a new one.
    Stale,
    Probe(ProbeError),
}

impl HttpProbe {
    /// One check: `Ok` on a 2xx or 3xx answer.
    pub async fn check(&self, address: SocketAddr, path: &str) -> Result<(), ProbeError> {
        if let Some(stream) = self.take(address) {
            match exchange(stream, address, path).await {
                Ok(answer) => return self.finish(address, answer),
                Err(Failed::Probe(e)) => return Err(e),
                Err(Failed::Stale) => {}
            }
        }
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| ProbeError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match exchange(stream, address, path).await {
            Ok(answer) => self.finish(address, answer),
            Err(Failed::Probe(e)) => Err(e),
            Err(Failed::Stale) => Err(ProbeError::Connect(
                "connection closed before an answer".into(),
            )),
        }
    }

    fn take(&self, address: SocketAddr) -> Option<TcpStream> {
        let (stream, since) = self.idle.lock().unwrap().connections.remove(&address)?;
        (since.elapsed() < IDLE_FOR).then_some(stream)
    }

    fn finish(
        &self,
        address: SocketAddr,
        (status, kept): (u16, Option<TcpStream>),
    ) -> Result<(), ProbeError> {
        if let Some(stream) = kept {
            let mut idle = self.idle.lock().unwrap();
            idle.connections.insert(address, (stream, Instant::now()));
            idle.returned += 1;
            if idle.returned.is_multiple_of(SWEEP_EVERY) {
                idle.connections
                    .retain(|_, (_, since)| since.elapsed() < IDLE_FOR);
            }
        }
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        }
    }
}

/// Sends the request and reads the answer: its status, and the connection
/// when it can carry the next request.
async fn exchange(
    mut stream: TcpStream,
    address: SocketAddr,
    path: &str,
) -> Result<(u16, Option<TcpStream>), Failed> {
    // `path` is checked when the tag is read (`tags::parse_health`): no
    // whitespace or control characters, so it is a request target as is.
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: signpost-health\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Err(Failed::Stale);
    }
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        let head = loop {
            if let Some(head) = parse_head(&buf).map_err(Failed::Probe)? {
                break head;
            }
            if buf.len() > MAX_HEAD {
                return Err(malformed(format!("answer head over {MAX_HEAD} bytes")));
            }
            buf.reserve(READ_CHUNK);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) if buf.is_empty() => return Err(Failed::Stale),
                Ok(0) => {
                    return Err(malformed(
                        "connection closed within the answer's head".into(),
                    ))
                }
                Err(e) => return Err(Failed::Probe(ProbeError::Connect(e.to_string()))),
                Ok(_) => {}
            }
        };
        buf.drain(..head.length);
        // An interim answer (100 Continue, 103 Early Hints): the real one follows.
        if (100..200).contains(&head.status) && head.status != 101 {
            continue;
        }
        let Some(body) = head.body.filter(|n| *n <= MAX_KEPT_BODY) else {
            return Ok((head.status, None));
        };
        while buf.len() < body {
            buf.reserve(READ_CHUNK.min(body - buf.len()));
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Ok((head.status, None)),
                Ok(_) => {}
            }
        }
        // Bytes beyond the body were never asked for: do not reuse.
        let reusable = buf.len() == body;
        return Ok((head.status, reusable.then_some(stream)));
    }
}

struct Head {
    status: u16,
    /// Head's length in bytes.
    length: usize,
    /// The body's length when the connection may carry another request
    /// after it; `None`: close it (no length, chunked, `Connection: close`,
    /// HTTP/1.0).
    body: Option<usize>,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ProbeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ProbeError::Connect(format!("malformed HTTP answer: {e}"))),
    };
    let status = response.code.unwrap_or_default();
    let mut content_length = None;
    let mut close = response.version != Some(1);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse::<usize>().ok();
            close |= content_length.is_none();
        } else if header.name.eq_ignore_ascii_case("transfer-encoding")
            || (header.name.eq_ignore_ascii_case("connection")
                && value.eq_ignore_ascii_case("close"))
        {
            close = true;
        }
    }
    // No body, whatever the headers say (RFC 9112 section 6.3).
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let body = match (close, bodiless) {
        (true, _) => None,
        (false, true) => Some(0),
        (false, false) => content_length,
    };
    Ok(Some(Head {
        status,
        length,
        body,
    }))
}

fn malformed(why: String) -> Failed {
    Failed::Probe(ProbeError::Connect(format!("malformed HTTP answer: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// A server that answers every request on a connection with `answer`,
    /// then closes the connection after `per_connection` answers; counts
    /// the connections it accepted.
    async fn server(answer: &'static str, per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    for _ in 0..per_connection {
                        let mut request = Vec::new();
                        while !request.ends_with(b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        assert!(request.starts_with(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:"));
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_the_next_probe() {
        let (address, accepted) =
            server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", usize::MAX).await;
        let probe = HttpProbe::default();
        for _ in 0..3 {
            assert_eq!(probe.check(address, "/health").await, Ok(()));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_replaced_without_a_failure() {
        let (address, accepted) = server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1).await;
        let probe = HttpProbe::default();
        assert_eq!(probe.check(address, "/health").await, Ok(()));
        // The server closed the kept-alive connection after its answer:
        // the write or the read on it fails, and the probe asks again on a
        // new one, whichever of the two comes first.
        assert_eq!(probe.check(address, "/health").await, Ok(()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn error_statuses_fail_and_redirects_pass() {
        let (address, _) = server("HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n", 9).await;
        let probe = HttpProbe::default();
        assert_eq!(
            probe.check(address, "/health").await,
            Err(ProbeError::Status(503))
        );
        let (address, _) = server(
            "HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n",
            9,
        )
        .await;
        assert_eq!(probe.check(address, "/health").await, Ok(()));
    }

    #[tokio::test]
    async fn bodies_without_a_length_close_the_connection_and_still_pass() {
        for answer in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ] {
            let (address, accepted) = server(answer, usize::MAX).await;
            let probe = HttpProbe::default();
            assert_eq!(probe.check(address, "/health").await, Ok(()), "{answer:?}");
            assert_eq!(probe.check(address, "/health").await, Ok(()), "{answer:?}");
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{answer:?}");
        }
    }

    #[tokio::test]
    async fn an_interim_answer_is_skipped() {
        let (address, _) = server(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
            9,
        )
        .await;
        let probe = HttpProbe::default();
        assert_eq!(
            probe.check(address, "/health").await,
            Err(ProbeError::Status(500))
        );
    }

    #[tokio::test]
    async fn garbage_and_silence_fail_with_why() {
        let (address, _) = server("SSH-2.0-OpenSSH_9.2\r\n\r\n", 9).await;
        let probe = HttpProbe::default();
        let error = probe.check(address, "/health").await.unwrap_err();
        assert!(
            matches!(&error, ProbeError::Connect(m) if m.contains("malformed")),
            "{error}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // Accepts and closes at once: no answer at all.
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let error = probe.check(address, "/health").await.unwrap_err();
        assert!(
            matches!(&error, ProbeError::Connect(m) if m.contains("closed before an answer")),
            "{error}"
        );
    }

    #[test]
    fn a_head_says_whether_the_connection_can_be_used_again() {
        let body = |answer: &str| parse_head(answer.as_bytes()).unwrap().unwrap().body;
        assert_eq!(
            body("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
            Some(2)
        );
        assert_eq!(
            body("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            Some(0)
        );
        assert_eq!(body("HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(body("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), None);
        assert_eq!(
            body("HTTP/1.1 200 OK\r\nconnection: Close\r\nContent-Length: 2\r\n\r\n"),
            None
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
    }
}
