//! A fault-injecting HTTP proxy in front of the emulator: the controller's
//! `AWS_ENDPOINT_URL` points here, every call goes on to moto unless the
//! test has scripted a fault for its action.
//!
//! The action is read as AWS routes it: `Action=` in the form body or query
//! string (Auto Scaling, EC2: the query protocol), else the operation in
//! `X-Amz-Target` (`AmazonSQS.ReceiveMessage`, `DynamoDB_20120810.GetItem`).
//! Every call is counted with its arrival time, faulted or not, so that a
//! test can check how fast the controller calls while AWS misbehaves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::free_port;

/// What the proxy does to a call instead of (or on top of) forwarding it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// The service's own throttling error (`Throttling` for Auto Scaling,
    /// `RequestLimitExceeded` for EC2, `ThrottlingException` for the JSON
    /// APIs), as AWS writes it, with
    /// a `Retry-After` header of that many seconds when given.
    Throttle { retry_after: Option<u32> },
    /// That status with AWS's error body (`InternalFailure` for 500,
    /// `ServiceUnavailable` for 503, ...).
    Status(u16),
    /// That status with that error code in AWS's error body: a service's
    /// own error, such as DynamoDB's throttling of a table
    /// (`ProvisionedThroughputExceededException`, 400).
    Error { status: u16, code: &'static str },
    /// The connection is reset (RST) before any answer.
    Reset,
    /// No answer for this long, then the real one.
    Stall(Duration),
    /// The real answer's head and half its body, then the connection dies.
    Truncated,
    /// 200 with a body that is not XML.
    Malformed,
    /// The real answer with a `NextToken` added, so that the caller asks
    /// for a second page; that page answers 500 (`InternalFailure`).
    BrokenPage,
    /// The real answer, this late.
    Slow(Duration),
}

/// The `NextToken` of `BrokenPage`: a page AWS never gave.
const BROKEN_PAGE: &str = "fault-proxy-broken-page";

impl Fault {
    /// A short name for logs and tables.
    pub fn name(&self) -> String {
        match self {
            Fault::Throttle { retry_after: None } => "throttled".into(),
            Fault::Throttle {
                retry_after: Some(s),
            } => format!("throttled, Retry-After {s}"),
            Fault::Status(s) => format!("HTTP {s}"),
            Fault::Error { status, code } => format!("{status} {code}"),
            Fault::Reset => "connection reset".into(),
            Fault::Stall(d) => format!("stall {d:?}"),
            Fault::Truncated => "truncated body".into(),
            Fault::Malformed => "malformed body".into(),
            Fault::BrokenPage => "next page fails".into(),
            Fault::Slow(d) => format!("slow answer {d:?}"),
        }
    }
}

/// How many calls a scripted fault applies to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Times {
    /// The next N calls of the action, then it answers normally again.
    Next(usize),
    /// Every call until `FaultProxy::clear`.
    Always,
}

#[derive(Default)]
struct Script {
    faults: HashMap<String, (Fault, Times)>,
    /// Arrival time of every call, by action.
    calls: HashMap<String, Vec<Instant>>,
    /// Calls answered with a fault, by action.
    faulted: HashMap<String, usize>,
    /// Arrival time of every call forwarded untouched, by action.
    forwarded: HashMap<String, Vec<Instant>>,
}

impl Script {
    /// Counts the call and takes the fault it gets, if any.
    fn call(&mut self, action: &str) -> Option<Fault> {
        let now = Instant::now();
        self.calls.entry(action.to_owned()).or_default().push(now);
        let Some((fault, times)) = self.faults.get_mut(action) else {
            self.forwarded
                .entry(action.to_owned())
                .or_default()
                .push(now);
            return None;
        };
        let fault = *fault;
        if let Times::Next(n) = times {
            *n -= 1;
            if *n == 0 {
                self.faults.remove(action);
            }
        }
        *self.faulted.entry(action.to_owned()).or_default() += 1;
        Some(fault)
    }
}

pub struct FaultProxy {
    pub port: u16,
    script: Arc<Mutex<Script>>,
    task: JoinHandle<()>,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target` (a base
    /// URL, the emulator's endpoint).
    pub async fn start(target: &str) -> FaultProxy {
        let port = free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the fault proxy");
        let script = Arc::new(Mutex::new(Script::default()));
        let upstream: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let target = target.trim_end_matches('/').to_owned();
        let task = tokio::spawn({
            let script = script.clone();
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    // Closing with a zero linger sends RST: what `Reset`
                    // does, by failing the exchange before any answer.
                    let _ = stream.set_zero_linger();
                    let (script, upstream, target) =
                        (script.clone(), upstream.clone(), target.clone());
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (script, upstream, target) =
                                (script.clone(), upstream.clone(), target.clone());
                            async move { answer(req, &script, &upstream, &target).await }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                    while connections.try_join_next().is_some() {}
                }
            }
        });
        FaultProxy { port, script, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, `times` calls of `action` get `fault`.
    pub fn inject(&self, action: &str, fault: Fault, times: Times) {
        let mut script = self.script.lock().unwrap();
        script.faults.insert(action.to_owned(), (fault, times));
    }

    /// `action` answers normally again.
    pub fn clear(&self, action: &str) {
        self.script.lock().unwrap().faults.remove(action);
    }

    /// Arrival times of every call of `action` so far.
    pub fn calls(&self, action: &str) -> Vec<Instant> {
        let script = self.script.lock().unwrap();
        script.calls.get(action).cloned().unwrap_or_default()
    }

    /// Arrival times of every call, whatever its action, sorted.
    pub fn all_calls(&self) -> Vec<Instant> {
        let script = self.script.lock().unwrap();
        let mut all: Vec<Instant> = script.calls.values().flatten().copied().collect();
        all.sort();
        all
    }

    /// Calls of `action` answered with a fault so far.
    pub fn faulted(&self, action: &str) -> usize {
        let script = self.script.lock().unwrap();
        script.faulted.get(action).copied().unwrap_or(0)
    }

    /// Arrival times of the calls of `action` forwarded untouched (no fault
    /// scripted for them): those that reached the emulator as sent.
    pub fn forwarded(&self, action: &str) -> Vec<Instant> {
        let script = self.script.lock().unwrap();
        script.forwarded.get(action).cloned().unwrap_or_default()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The most calls among `calls` (sorted) within any `window` that begins at
/// or after `since`.
pub fn most_within(calls: &[Instant], since: Instant, window: Duration) -> usize {
    let calls: Vec<Instant> = calls.iter().copied().filter(|t| *t >= since).collect();
    (0..calls.len())
        .map(|i| {
            calls[i..]
                .iter()
                .take_while(|t| **t < calls[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The AWS operation a request calls.
fn action_of(req: &hyper::http::request::Parts, body: &[u8]) -> String {
    if let Some(target) = req.headers.get("x-amz-target") {
        let target = target.to_str().unwrap_or_default();
        return target.rsplit('.').next().unwrap_or(target).to_owned();
    }
    let form = |text: &str| {
        text.split('&')
            .find_map(|pair| pair.strip_prefix("Action="))
            .map(str::to_owned)
    };
    form(&String::from_utf8_lossy(body))
        .or_else(|| req.uri.query().and_then(form))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// AWS's error body as the service writes it: the JSON protocols' `__type`
/// (SQS, DynamoDB: `json`), EC2's `<Response><Errors>`, Auto Scaling's
/// `<ErrorResponse>`.
fn error_body(action: &str, json: bool, code: &str, message: &str) -> String {
    if json {
        format!(r#"{{"__type":"com.amazonaws.fault#{code}","message":"{message}"}}"#)
    } else if is_ec2(action) {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
        )
    } else {
        format!(
            "<ErrorResponse xmlns=\"https://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>fault-proxy</RequestId></ErrorResponse>"
        )
    }
}

/// The EC2 actions signpost calls (the rest of the query API it calls is
/// Auto Scaling's).
fn is_ec2(action: &str) -> bool {
    action.starts_with("DescribeInstance")
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

async fn answer(
    req: Request<Incoming>,
    script: &Mutex<Script>,
    upstream: &Client<HttpConnector, Full<Bytes>>,
    target: &str,
) -> Result<Response<Body>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let action = action_of(&parts, &body);
    let json = parts.headers.contains_key("x-amz-target");
    let fault = script.lock().unwrap().call(&action);
    let follows_broken_page = String::from_utf8_lossy(&body).contains(BROKEN_PAGE);
    if follows_broken_page {
        let message = "the page after a NextToken the fault proxy added";
        return Ok(full(
            500,
            error_body(&action, json, "InternalFailure", message),
        ));
    }
    match fault {
        Some(Fault::Throttle { retry_after }) => {
            let (status, code) = if json {
                (400, "ThrottlingException")
            } else if is_ec2(&action) {
                (503, "RequestLimitExceeded")
            } else {
                (400, "Throttling")
            };
            let mut response = full(status, error_body(&action, json, code, "Rate exceeded"));
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            return Ok(response);
        }
        Some(Fault::Status(status)) => {
            let code = match status {
                503 => "ServiceUnavailable",
                _ => "InternalFailure",
            };
            let message = "injected by the fault proxy";
            return Ok(full(status, error_body(&action, json, code, message)));
        }
        Some(Fault::Error { status, code }) => {
            let message = "injected by the fault proxy";
            return Ok(full(status, error_body(&action, json, code, message)));
        }
        Some(Fault::Reset) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ))
        }
        Some(Fault::Malformed) => return Ok(full(200, "<html><body>oops")),
        Some(Fault::Stall(d)) | Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Truncated) | Some(Fault::BrokenPage) | None => {}
    }
    let mut forward = Request::builder().method(parts.method).uri(format!(
        "{target}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for (name, value) in &parts.headers {
        forward = forward.header(name, value);
    }
    let real = upstream
        .request(forward.body(Full::new(body)).unwrap())
        .await
        .map_err(std::io::Error::other)?;
    let (mut head, body) = real.into_parts();
    let mut body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    if fault == Some(Fault::BrokenPage) {
        body = with_next_token(&action, &body).into();
        head.headers.remove("x-amz-crc32");
    }
    let length = body.len();
    let body: Body = if fault == Some(Fault::Truncated) {
        // The head promises the whole body; half of it comes, a pause puts
        // it on the wire, then the body fails and the connection is dropped.
        let (frames, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let _ = frames.send(Ok(Frame::data(body.slice(..length / 2)))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = frames
                .send(Err(std::io::Error::other("injected truncation")))
                .await;
        });
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
    } else {
        Full::new(body)
            .map_err(|never: Infallible| match never {})
            .boxed()
    };
    let mut response = Response::from_parts(head, body);
    let headers = response.headers_mut();
    headers.remove("transfer-encoding");
    headers.insert("content-length", length.into());
    Ok(response)
}

/// The answer with a `NextToken`: Auto Scaling's inside `<...Result>`,
/// EC2's (`nextToken`) at the end of `<...Response>`.
fn with_next_token(action: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let (close, token) = if is_ec2(action) {
        (format!("</{action}Response>"), "nextToken")
    } else {
        (format!("</{action}Result>"), "NextToken")
    };
    let at = text
        .find(&close)
        .unwrap_or_else(|| panic!("{action}'s answer has no {close}: {text}"));
    format!(
        "{}<{token}>{BROKEN_PAGE}</{token}>{}",
        &text[..at],
        &text[at..]
    )
}
