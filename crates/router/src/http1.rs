//! HTTP/1.1 as a proxy needs it (RFC 9112): where a message's head ends,
//! how its body is framed, and its head rewritten for the next hop.
//!
//! Heads are parsed by `httparse` in place and written on field by field
//! into the next hop's buffer, names as received; bodies are passed through
//! as they came (chunks stay chunks), so the proxy never builds a header map
//! nor copies a body into messages of its own. This is what brought the
//! router's cost per request below nginx's (README, "Benchmarks").
//!
//! Since bodies pass on as they came, what the router accepts is what every
//! reader downstream gets: the framing rules are strict, and each MUST of
//! RFC 9110 §6–8 and RFC 9112 §2–7 that binds an intermediary is listed
//! with where it is enforced and its test in `crates/router/HTTP1.md`
//! (which also says what is not enforced, and why). `fuzz/` checks the
//! parsers against a reference framing.

use std::mem::MaybeUninit;

use thiserror::Error;

/// The largest head accepted, request or response (nginx's default for
/// large client headers is 4 × 8 KiB).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head.
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included, or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// Where `httparse` puts the fields of one head; uninitialised, so free.
pub type Fields<'b> = [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

pub fn fields<'b>() -> Fields<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes its connection (responses only).
    UntilClose,
}

/// Why a head was refused; each maps to the status the client gets.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed message head: {0}")]
    Malformed(httparse::Error),
    #[error("message head larger than {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    TooLarge,
    #[error("invalid or conflicting Content-Length")]
    BadLength,
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndCoding,
    #[error("Transfer-Encoding whose last coding is not chunked, that names chunked twice, or in an HTTP/1.0 request")]
    BadCoding,
    #[error("request target is neither a path nor an absolute http URL")]
    BadTarget,
    #[error("more than one Host")]
    TwoHosts,
    #[error("HTTP/1.1 request without Host")]
    NoHost,
    #[error("Host is not one host[:port]")]
    BadHost,
}

impl HeadError {
    /// The status and reason phrase a client gets for its bad request.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HeadError::TooLarge => (431, "Request Header Fields Too Large"),
            _ => (400, "Bad Request"),
        }
    }
}

fn parsed(result: httparse::Result<usize>, len: usize) -> Result<Option<usize>, HeadError> {
    match result {
        // The limit holds however the head arrived: one that completes in
        // the read that takes it past `MAX_HEAD` is as large as one that
        // does not.
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if len >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// The fields a proxy acts on, found in one pass over a head.
#[derive(Default)]
struct Known {
    /// Fields not passed on: hop-by-hop ones, and those rewritten.
    drop: u128,
    close: bool,
    keep_alive: bool,
    forwarded_proto: bool,
    /// The `X-Forwarded-For` fields, rewritten as one.
    forwarded_for: u128,
    length: Option<u64>,
    bad_length: bool,
    /// `Content-Length` fields.
    length_fields: u128,
    /// Whether the length came as one field of the plain decimal number;
    /// otherwise it is passed on as one (RFC 9110 §8.6).
    length_plain: bool,
    /// `Transfer-Encoding` fields.
    coding: u128,
    /// `Host` fields.
    host_fields: u128,
    /// Whether the last transfer coding named is `chunked`.
    chunked: bool,
    /// How often `chunked` is named: more than once is invalid (RFC 9112
    /// §6.1), and a reader that decodes it twice frames the body otherwise.
    chunked_count: u32,
}

fn bit(i: usize) -> u128 {
    1 << i
}

/// Comma-separated list elements, trimmed, empty ones skipped (RFC 9110 §5.6.1).
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

impl Known {
    fn of(fields: &[httparse::Header<'_>]) -> Known {
        let mut known = Known::default();
        let mut names_others = false;
        for (i, field) in fields.iter().enumerate() {
            let name = field.name;
            let is = |n: &str| name.len() == n.len() && name.eq_ignore_ascii_case(n);
            match name.len() {
                10 if is("connection") => {
                    known.drop |= bit(i);
                    for token in elements(field.value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            known.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            known.keep_alive = true;
                        } else {
                            names_others = true;
                        }
                    }
                }
                10 if is("keep-alive") => known.drop |= bit(i),
                16 if is("proxy-connection") => known.drop |= bit(i),
                2 if is("te") => known.drop |= bit(i),
                7 if is("upgrade") => known.drop |= bit(i),
                4 if is("host") => {
                    known.host_fields |= bit(i);
                }
                14 if is("content-length") => {
                    known.length_fields |= bit(i);
                    for element in elements(field.value) {
                        let n = std::str::from_utf8(element)
                            .ok()
                            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|s| s.parse::<u64>().ok());
                        match (n, known.length) {
                            (Some(n), None) => known.length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => known.bad_length = true,
                        }
                    }
                    // No number at all (``, `,`): the field would go on
                    // as received, and readers downstream disagree on what
                    // it means (found by the fuzzer).
                    if elements(field.value).next().is_none() {
                        known.bad_length = true;
                    }
                }
                17 if is("transfer-encoding") => {
                    known.coding |= bit(i);
                    for coding in elements(field.value) {
                        known.chunked = coding.eq_ignore_ascii_case(b"chunked");
                        known.chunked_count += u32::from(known.chunked);
                    }
                }
                15 if is("x-forwarded-for") => {
                    known.forwarded_for |= bit(i);
                    known.drop |= bit(i);
                }
                17 if is("x-forwarded-proto") => known.forwarded_proto = true,
                _ => {}
            }
        }
        if let Some(n) = known.length {
            known.length_plain = known.length_fields.count_ones() == 1
                && fields.iter().enumerate().any(|(i, f)| {
                    known.length_fields & bit(i) != 0
                        && f.value == itoa::Buffer::new().format(n).as_bytes()
                })
        }
        // `Connection: x-session` makes `X-Session` hop-by-hop too (RFC 9110
        // §7.6.1); rare, so only then a second pass.
        if names_others {
            let named: Vec<&[u8]> = fields
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case("connection"))
                .flat_map(|f| elements(f.value))
                .collect();
            for (i, field) in fields.iter().enumerate() {
                let name = field.name;
                // Not the fields that frame the message or name its target:
                // dropping `Content-Length` because `Connection` names it
                // would let the body be read as the next request.
                let framing = ["content-length", "transfer-encoding", "host"]
                    .iter()
                    .any(|f| name.eq_ignore_ascii_case(f));
                if !framing
                    && named
                        .iter()
                        .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
                {
                    known.drop |= bit(i);
                }
            }
        }
        known
    }
}

impl Known {
    /// A length that came as a list (`5, 5`), in several fields or with
    /// leading zeros is passed on as one field of its number, so that no
    /// reader downstream can make another length of it (RFC 9110 §8.6:
    /// reject, or replace with one value). Its fields are dropped, and the
    /// number returned for `write_length`.
    fn replace_length(&mut self) -> Option<u64> {
        let n = self.length.filter(|_| !self.length_plain)?;
        self.drop |= self.length_fields;
        Some(n)
    }
}

fn write_length(out: &mut Vec<u8>, length: Option<u64>) {
    if let Some(n) = length {
        out.extend_from_slice(b"Content-Length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

fn write_fields(out: &mut Vec<u8>, fields: &[httparse::Header<'_>], drop: u128) {
    for (i, field) in fields.iter().enumerate() {
        if drop & bit(i) == 0 {
            out.extend_from_slice(field.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(field.value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A client's request head, parsed in place.
pub struct Request<'h, 'b> {
    pub method: &'b str,
    /// Path and query, what the endpoint gets (origin form), but for a
    /// leading `/` when `slash`.
    target: &'b str,
    slash: bool,
    /// The host of an absolute-form target, which replaces `Host`.
    authority: Option<&'b str>,
    /// The path alone, what routes match.
    pub path: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Bytes of the buffer the head took.
    pub len: usize,
    pub framing: Framing,
    /// Whether the client wants its connection kept after this exchange.
    pub keep_alive: bool,
    fields: &'h [httparse::Header<'b>],
    known: Known,
    /// The one `Content-Length` written in place of those received.
    length: Option<u64>,
}

/// Parses the request head at the start of `buf`: `None` until it is
/// complete.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut Fields<'b>,
) -> Result<Option<Request<'h, 'b>>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let Some(len) = parsed(req.parse_with_uninit_headers(buf, fields), buf.len())? else {
        return Ok(None);
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed(httparse::Error::Token));
    };
    let fields: &'h [httparse::Header<'b>] = req.headers;
    let mut known = Known::of(fields);
    let (authority, target) = origin_form(target).ok_or(HeadError::BadTarget)?;
    // `http://host?q` has the path `/` and the query `?q`.
    let slash = !target.starts_with('/');
    let path = match target.split(['?', '#']).next() {
        Some(path) if !slash => path,
        _ => "/",
    };
    // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request
    // without Host, with several, or with one that is not a host; the
    // endpoint behind the router would otherwise pick a host of its own.
    match known.host_fields.count_ones() {
        0 if minor == 1 => return Err(HeadError::NoHost),
        0 => {}
        1 => {
            let host = fields
                .iter()
                .enumerate()
                .find(|(i, _)| known.host_fields & bit(*i) != 0)
                .map(|(_, f)| f.value);
            if !host.is_some_and(is_host) {
                return Err(HeadError::BadHost);
            }
        }
        _ => return Err(HeadError::TwoHosts),
    }
    if known.bad_length {
        return Err(HeadError::BadLength);
    }
    // Both lengths at once is how requests are smuggled past proxies:
    // refused rather than resolved (RFC 9112 §6.1 allows either).
    let framing = match (known.coding != 0, known.length) {
        (true, Some(_)) => return Err(HeadError::LengthAndCoding),
        (true, None) if known.chunked && known.chunked_count == 1 && minor == 1 => Framing::Chunked,
        (true, None) => return Err(HeadError::BadCoding),
        (false, Some(0) | None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if minor == 0 {
        known.keep_alive && !known.close
    } else {
        !known.close
    };
    let length = known.replace_length();
    Ok(Some(Request {
        method,
        target,
        slash,
        authority,
        path,
        minor,
        len,
        framing,
        keep_alive,
        fields,
        known,
        length,
    }))
}

/// The authority (for an absolute-form target) and the origin form of a
/// request target (RFC 9112 §3.2): a path as it is; for an absolute
/// `http(s)://` URL its host and what follows it (path and query, either
/// possibly absent).
fn origin_form(target: &str) -> Option<(Option<&str>, &str)> {
    if target.starts_with('/') {
        return Some((None, target));
    }
    // Bytes, not `str` slices: httparse lets non-ASCII bytes into a target,
    // and slicing one inside a character panicked (found by the fuzzer).
    let has_scheme = |scheme: &[u8]| {
        target.len() > scheme.len()
            && target.as_bytes()[..scheme.len()].eq_ignore_ascii_case(scheme)
    };
    let scheme_len = if has_scheme(b"http://") {
        7
    } else if has_scheme(b"https://") {
        8
    } else {
        return None;
    };
    let rest = &target[scheme_len..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // userinfo@host is deprecated and never meant for the endpoint; and
    // the authority becomes the endpoint's `Host`.
    if authority.is_empty() || !is_host(authority.as_bytes()) {
        return None;
    }
    Some((Some(authority), &rest[end..]))
}

/// Whether a `Host` value is `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC
/// 3986 §3.2.2), or empty, as a target without authority has it. A comma
/// is refused too, though a reg-name may hold one: `Host` is a singleton,
/// and a reader that splits lists would see two.
pub fn is_host(value: &[u8]) -> bool {
    let is_sub_delim = |b: u8| b"!$&'()*+;=".contains(&b);
    let is_unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    let (host, port) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|b| *b == b']') else {
            return false;
        };
        let inside = &literal[..end];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|b| is_unreserved(*b) || is_sub_delim(*b) || *b == b':')
        {
            return false;
        }
        (&[][..], &literal[end + 1..])
    } else {
        let end = value.iter().position(|b| *b == b':').unwrap_or(value.len());
        (&value[..end], &value[end..])
    };
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' if host
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3
            }
            b if is_unreserved(b) || is_sub_delim(b) => i += 1,
            _ => return false,
        }
    }
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

impl Request<'_, '_> {
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Writes the head the endpoint gets, all but the `Host` a request
    /// without one gets and the final blank line (`finish_head`): the
    /// endpoint can differ on a retry. Hop-by-hop fields go (RFC 9110
    /// §7.6.1), `X-Forwarded-For` gets `client` appended, and
    /// `X-Forwarded-Proto` says `http` unless a proxy before said otherwise.
    pub fn write_head(&self, client: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        if self.slash {
            out.push(b'/');
        }
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        match self.authority {
            Some(authority) => {
                // The target's authority replaces `Host` (RFC 9112 §3.2.2).
                write_fields(out, self.fields, self.known.drop | self.known.host_fields);
                out.extend_from_slice(b"Host: ");
                out.extend_from_slice(authority.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => write_fields(out, self.fields, self.known.drop),
        }
        write_length(out, self.length);
        out.extend_from_slice(b"X-Forwarded-For: ");
        for (i, field) in self.fields.iter().enumerate() {
            if self.known.forwarded_for & bit(i) != 0 {
                out.extend_from_slice(field.value.trim_ascii());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(client.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !self.known.forwarded_proto {
            out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        }
    }

    pub fn has_host(&self) -> bool {
        self.known.host_fields != 0 || self.authority.is_some()
    }

    /// Whether sending it twice means the same as once (RFC 9110 §9.2.2):
    /// only such a request may go again after a connection failed under it.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }
}

/// Ends a head `Request::write_head` began: `Host: host` if given, then
/// the blank line.
pub fn finish_head(out: &mut Vec<u8>, host: Option<&str>) {
    if let Some(host) = host {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An endpoint's response head, parsed in place.
pub struct Response<'h, 'b> {
    pub status: u16,
    reason: &'b str,
    pub len: usize,
    pub framing: Framing,
    /// Whether the endpoint keeps its connection for another request.
    pub keep_alive: bool,
    fields: &'h [httparse::Header<'b>],
    known: Known,
    /// The one `Content-Length` written in place of those received.
    length: Option<u64>,
}

/// Parses the response head at the start of `buf`: `None` until it is
/// complete. `to_head`: the request was a HEAD (no body follows, whatever
/// the head says).
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut Fields<'b>,
    to_head: bool,
) -> Result<Option<Response<'h, 'b>>, HeadError> {
    let mut res = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let Some(len) = parsed(
        config.parse_response_with_uninit_headers(&mut res, buf, fields),
        buf.len(),
    )?
    else {
        return Ok(None);
    };
    let (Some(status), Some(minor)) = (res.code, res.version) else {
        return Err(HeadError::Malformed(httparse::Error::Status));
    };
    // httparse takes any three digits; the status line the client gets is
    // written from the number, and `000` would go out as `0`, which no
    // client parses (RFC 9110 §15: classes 1xx to 5xx, read as x00 past
    // that). Found by the fuzz check.
    if status < 100 {
        return Err(HeadError::Malformed(httparse::Error::Status));
    }
    let reason = res.reason.unwrap_or("");
    let fields: &'h [httparse::Header<'b>] = res.headers;
    let mut known = Known::of(fields);
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if to_head || bodiless {
        Framing::Empty
    } else if known.coding != 0 {
        if known.chunked_count > 1 {
            return Err(HeadError::BadCoding);
        } else if known.chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if known.bad_length {
        return Err(HeadError::BadLength);
    } else {
        known.length.map_or(Framing::UntilClose, Framing::Length)
    };
    // An HTTP/1.0 message with Transfer-Encoding has faulty framing: its
    // connection closes after it (RFC 9112 §6.1).
    let keep_alive = framing != Framing::UntilClose
        && if minor == 0 {
            known.keep_alive && !known.close && known.coding == 0
        } else {
            !known.close
        };
    // The client's own framing is written by `write_head`.
    known.drop |= known.coding;
    if known.coding != 0 {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
        for (i, f) in fields.iter().enumerate() {
            if f.name.eq_ignore_ascii_case("content-length") {
                known.drop |= bit(i);
            }
        }
    }
    let length = if bodiless {
        // No body, so nothing for them to frame, and a client that reads
        // them anyway would wait for one: a 1xx or 204 MUST NOT carry
        // either (RFC 9110 §8.6, RFC 9112 §6.1), and a 304's would only
        // repeat the 200's, which a client never needs.
        known.drop |= known.length_fields | known.coding;
        known.coding = 0;
        None
    } else if known.bad_length {
        // Answers a HEAD, so frames nothing; conflicting, so it goes.
        known.drop |= known.length_fields;
        None
    } else if known.coding != 0 {
        None
    } else {
        known.replace_length()
    };
    // Not ours to rewrite in a response: an `X-Forwarded-For` goes through.
    known.drop &= !known.forwarded_for;
    Ok(Some(Response {
        status,
        reason,
        len,
        framing,
        keep_alive,
        fields,
        known,
        length,
    }))
}

/// How a response's body reaches the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Chunked from the endpoint to an HTTP/1.0 client: the chunks' data
    /// only, delimited by closing.
    pub dechunk: bool,
    /// The client's connection closes after this response.
    pub close: bool,
}

impl Response<'_, '_> {
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// Writes the head the client gets, for a client speaking HTTP/1.`minor`
    /// that wants its connection kept (`keep_alive`).
    pub fn write_head(&self, minor: u8, keep_alive: bool, out: &mut Vec<u8>) -> Delivery {
        let dechunk = self.framing == Framing::Chunked && minor == 0;
        let close = !keep_alive || dechunk || self.framing == Framing::UntilClose;
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut code = itoa::Buffer::new();
        out.extend_from_slice(code.format(self.status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        write_fields(out, self.fields, self.known.drop);
        write_length(out, self.length);
        if self.is_interim() {
            out.extend_from_slice(b"\r\n");
            return Delivery {
                dechunk: false,
                close: false,
            };
        }
        if self.known.coding != 0 && minor == 1 {
            // The codings as the endpoint listed them: `chunked` stays last.
            for (i, field) in self.fields.iter().enumerate() {
                if self.known.coding & bit(i) != 0 {
                    out.extend_from_slice(b"Transfer-Encoding: ");
                    out.extend_from_slice(field.value);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if minor == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Delivery { dechunk, close }
    }
}

/// A body malformed on the wire.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("chunk size or trailer line longer than {MAX_CHUNK_LINE} bytes")]
    LineTooLong,
    #[error("chunk size or trailer line not ended by CRLF, or holding a control character")]
    LineEnd,
    #[error("trailer line that is not a field line")]
    TrailerField,
}

/// Where a body being passed on stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Body {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// Where a chunked body stands (RFC 9112 §7.1).
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    Size,
    /// This many bytes of chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, up to a blank line.
    Trailer,
    Done,
}

impl Body {
    pub fn new(framing: Framing) -> Body {
        match framing {
            Framing::Empty => Body::Length(0),
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Chunk::Size),
            Framing::UntilClose => Body::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Body::Length(0) | Body::Chunked(Chunk::Done))
    }

    /// Takes from `buf` (what has arrived and not been taken) the bytes that
    /// belong to this body and appends them to `out`: as they are, or the
    /// chunks' data only if `dechunk`. Returns how many bytes it took; what
    /// follows is the next message.
    pub fn take(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
        dechunk: bool,
    ) -> Result<usize, BodyError> {
        match self {
            Body::Length(left) => {
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend_from_slice(&buf[..n]);
                *left -= n as u64;
                Ok(n)
            }
            Body::UntilClose => {
                out.extend_from_slice(buf);
                Ok(buf.len())
            }
            Body::Chunked(chunk) => {
                let n = chunk.scan(buf, |data| {
                    if dechunk {
                        out.extend_from_slice(data)
                    }
                })?;
                if !dechunk {
                    out.extend_from_slice(&buf[..n]);
                }
                Ok(n)
            }
        }
    }
}

impl Chunk {
    /// Scans `buf` for chunked framing, calling `data` for each piece of
    /// chunk data; returns how many bytes belong to the body.
    fn scan(&mut self, buf: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, BodyError> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self {
                Chunk::Done => return Ok(at),
                Chunk::Size => {
                    let Some(n) = framing_line(rest)? else {
                        return Ok(at);
                    };
                    match chunk_size(&rest[..n - 2])? {
                        0 => *self = Chunk::Trailer,
                        size => *self = Chunk::Data(size),
                    }
                    at += n;
                }
                Chunk::Data(left) => {
                    if rest.is_empty() {
                        return Ok(at);
                    }
                    let n = rest.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    data(&rest[..n]);
                    at += n;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunk::DataEnd;
                    }
                }
                Chunk::DataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        at += 2;
                        *self = Chunk::Size;
                    }
                    [] | [b'\r'] => return Ok(at),
                    _ => return Err(BodyError::ChunkEnd),
                },
                Chunk::Trailer => {
                    let Some(n) = framing_line(rest)? else {
                        return Ok(at);
                    };
                    if n == 2 {
                        *self = Chunk::Done;
                    } else if !is_field_line(&rest[..n - 2]) {
                        return Err(BodyError::TrailerField);
                    }
                    at += n;
                }
            }
        }
    }
}

/// The size a chunk-size line (CRLF excluded) gives, if the line is what
/// RFC 9112 §7.1.1 allows and nothing else:
///
/// ```text
/// chunk-size [ chunk-ext ]    chunk-size = 1*HEXDIG
/// chunk-ext  = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// chunk-ext-name = token      chunk-ext-val = token / quoted-string
/// ```
///
/// The line passes on as it came, so whatever an endpoint might read
/// otherwise (whitespace after the size with no extension, no digit at all,
/// a quoted value left open) is refused rather than forwarded.
pub fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::ChunkSize);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(digit))
            .ok_or(BodyError::ChunkSize)?;
    }
    let mut rest = &line[digits..];
    while !rest.is_empty() {
        rest = skip_bws(rest);
        rest = rest.strip_prefix(b";").ok_or(BodyError::ChunkSize)?;
        rest = skip_bws(rest);
        let name = token_len(rest);
        if name == 0 {
            return Err(BodyError::ChunkSize);
        }
        rest = &rest[name..];
        let after_name = skip_bws(rest);
        if let Some(value) = after_name.strip_prefix(b"=") {
            let value = skip_bws(value);
            let len = match value.first() {
                Some(b'"') => quoted_string_len(value).ok_or(BodyError::ChunkSize)?,
                _ => token_len(value),
            };
            if len == 0 {
                return Err(BodyError::ChunkSize);
            }
            rest = &value[len..];
        }
    }
    Ok(size)
}

/// Whether a trailer line (CRLF excluded) is a field line, `field-name ":"
/// OWS field-value OWS` (RFC 9112 §5, §7.1.2). Anything else in a trailer
/// section (a request line, a status line, a name with whitespace before
/// its colon) is a message riding in a body for whoever reads trailers
/// more loosely; control characters are already refused by
/// `framing_line`.
pub fn is_field_line(line: &[u8]) -> bool {
    let name = token_len(line);
    name > 0 && line.get(name) == Some(&b':')
}

/// RFC 9110 §5.6.1: optional whitespace.
fn skip_bws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &s[n..]
}

/// RFC 9110 §5.6.2: `tchar`.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn token_len(s: &[u8]) -> usize {
    s.iter().take_while(|b| is_tchar(**b)).count()
}

/// The length of the quoted-string (RFC 9110 §5.6.4) at the start of `s`,
/// quotes included; `None` if it is not closed.
fn quoted_string_len(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let escaped = *s.get(i + 1)?;
                if escaped.is_ascii_control() && escaped != b'\t' {
                    return None;
                }
                i += 2;
            }
            b if b.is_ascii_control() && b != b'\t' => return None,
            _ => i += 1,
        }
    }
    None
}

/// The length, CRLF included, of the framing line (chunk size or trailer
/// field) at the start of `rest`, once it has come whole. The line must end
/// in CRLF and hold no other control character than HTAB: the body passes
/// on as it came, and a bare LF or CR that the endpoint read as a line end
/// would let it frame the body differently from the router.
fn framing_line(rest: &[u8]) -> Result<Option<usize>, BodyError> {
    let end = rest.iter().position(|b| *b == b'\n');
    let line = &rest[..end.unwrap_or(rest.len())];
    if line.len() > MAX_CHUNK_LINE {
        return Err(BodyError::LineTooLong);
    }
    let (content, complete) = match (end, line.split_last()) {
        (Some(_), Some((b'\r', content))) => (content, true),
        (Some(_), _) => return Err(BodyError::LineEnd),
        // A CR at the end of what has come may be the CRLF's first half.
        (None, Some((b'\r', content))) => (content, false),
        (None, _) => (line, false),
    };
    if content.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Err(BodyError::LineEnd);
    }
    Ok(complete.then_some(line.len() + 1))
}

/// An answer of the router's own, plain text.
pub struct Local {
    pub status: u16,
    pub reason: &'static str,
    pub body: String,
    /// The client's connection closes after it.
    pub close: bool,
    /// The client's HTTP/1.x: an HTTP/1.0 connection that stays open must
    /// be told so.
    pub minor: u8,
}

impl Local {
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(n.format(self.status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ");
        out.extend_from_slice(n.format(self.body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.minor == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Result<Option<(Framing, bool, String, String)>, HeadError> {
        let mut f = fields();
        Ok(parse_request(raw.as_bytes(), &mut f)?.map(|r| {
            let mut out = Vec::new();
            r.write_head("10.0.0.9", &mut out);
            finish_head(&mut out, (!r.has_host()).then_some("10.1.1.1:80"));
            (
                r.framing,
                r.keep_alive,
                r.path.to_owned(),
                String::from_utf8(out).unwrap(),
            )
        }))
    }

    #[test]
    fn a_request_head_is_rewritten_for_the_endpoint() {
        let (framing, keep, path, head) = request(
            "GET http://app/users/7?x=1 HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Hop\r\n\
             X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: x\r\n\
             X-Forwarded-For: 1.2.3.4\r\nx-request-id: abc\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(framing, Framing::Empty);
        assert!(keep);
        assert_eq!(path, "/users/7");
        assert_eq!(
            head,
            "GET /users/7?x=1 HTTP/1.1\r\nx-request-id: abc\r\nHost: app\r\n\
             X-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n\r\n"
        );
    }

    #[test]
    fn a_request_without_host_gets_the_endpoints_and_http_1_0_closes_by_default() {
        let (_, keep, _, head) = request("GET / HTTP/1.0\r\nX-Forwarded-Proto: https\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!keep);
        assert_eq!(
            head,
            "GET / HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 10.0.0.9\r\nHost: 10.1.1.1:80\r\n\r\n"
        );
        let (_, keep, _, _) = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(keep);
        let (_, keep, _, _) = request("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!keep);
    }

    #[test]
    fn request_framing_follows_rfc_9112_and_refuses_ambiguity() {
        let framing = |raw: &str| request(raw).map(|r| r.unwrap().0);
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        let (framing_, _, _, head) = request(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12, 12\r\nContent-Length: 12\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(framing_, Framing::Length(12));
        assert_eq!(head.matches("Content-Length").count(), 1, "{head}");
        assert!(head.contains("\r\nContent-Length: 12\r\n"), "{head}");
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +12\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ,\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: , \r\n\r\n",
        ] {
            assert_eq!(framing(bad), Err(HeadError::BadLength), "{bad}");
        }
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::LengthAndCoding)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Err(HeadError::BadCoding)
        );
        assert_eq!(
            framing("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::BadCoding)
        );
        // Found by the fuzz check (seed-req-chunked-twice): forwarded, a
        // reader that decodes twice frames the body otherwise.
        for twice in [
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(
                framing(&format!("POST / HTTP/1.1\r\nHost: a\r\n{twice}\r\n")),
                Err(HeadError::BadCoding)
            );
            let mut f = fields();
            let head = format!("HTTP/1.1 200 OK\r\n{twice}\r\n");
            assert!(matches!(
                parse_response(head.as_bytes(), &mut f, false),
                Err(HeadError::BadCoding)
            ));
        }
        assert_eq!(
            framing("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HeadError::TwoHosts)
        );
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Err(HeadError::NoHost));
        assert_eq!(
            framing("GET http://app/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::NoHost)
        );
        for bad in [
            "a, b", "a,b", "a b", "a:80x", "a:80:81", "[::1", "a/b", "a@b", "%zz",
        ] {
            assert_eq!(
                framing(&format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n")),
                Err(HeadError::BadHost),
                "{bad}"
            );
        }
        for good in [
            "",
            "a",
            "a.example:8080",
            "10.0.0.1:80",
            "[::1]:80",
            "a%2Db",
            "a:",
        ] {
            assert_eq!(
                framing(&format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n")),
                Ok(Framing::Empty),
                "{good}"
            );
        }
        assert_eq!(
            framing("GET http://a,b/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(HeadError::BadTarget)
        );
        assert_eq!(
            framing("GET foo HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadTarget)
        );
        assert!(matches!(
            framing("GARBAGE\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert_eq!(
            request("GET / HTTP/1.1\r\nHost: a\r\n")
                .unwrap()
                .map(|_| ()),
            None
        );
        let huge = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).err(), Some(HeadError::TooLarge));
        // Whole at once, yet over the limit.
        let whole = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(request(&whole).err(), Some(HeadError::TooLarge));
    }

    fn response(
        raw: &str,
        to_head: bool,
        minor: u8,
        keep: bool,
    ) -> (Framing, bool, Delivery, String) {
        let mut f = fields();
        let r = parse_response(raw.as_bytes(), &mut f, to_head)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let delivery = r.write_head(minor, keep, &mut out);
        (
            r.framing,
            r.keep_alive,
            delivery,
            String::from_utf8(out).unwrap(),
        )
    }

    #[test]
    fn a_response_head_loses_its_hop_by_hop_fields_and_says_how_the_client_connection_goes() {
        let (framing, upstream_keep, delivery, head) = response(
            "HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
             Content-Length: 2\r\nServer: t\r\n\r\nok",
            false,
            1,
            true,
        );
        assert_eq!(framing, Framing::Length(2));
        assert!(upstream_keep);
        assert!(!delivery.close);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: t\r\n\r\n"
        );

        let (_, _, delivery, head) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            false,
            0,
            true,
        );
        assert!(!delivery.close);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let (framing, keep, delivery, head) = response(chunked, false, 1, true);
        assert_eq!(
            (framing, keep, delivery.dechunk, delivery.close),
            (Framing::Chunked, true, false, false)
        );
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        // HTTP/1.0 has no chunks: the data, then close.
        let (_, _, delivery, head) = response(chunked, false, 0, true);
        assert_eq!((delivery.dechunk, delivery.close), (true, true));
        assert_eq!(head, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");

        let (framing, keep, delivery, _) = response("HTTP/1.1 200 OK\r\n\r\n", false, 1, true);
        assert_eq!(
            (framing, keep, delivery.close),
            (Framing::UntilClose, false, true)
        );
        for (raw, to_head) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 100 Continue\r\n\r\n", false),
        ] {
            assert_eq!(response(raw, to_head, 1, true).0, Framing::Empty, "{raw}");
        }
        let (_, keep, _, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
            1,
            true,
        );
        assert!(!keep);
        let (_, keep, _, _) = response(
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
            1,
            true,
        );
        assert!(!keep);
        let mut f = fields();
        assert!(parse_response(b"NOT HTTP\r\n\r\n", &mut f, false).is_err());
        for low in ["000", "099", "007"] {
            let head = format!("HTTP/1.1 {low} OK\r\n\r\n");
            let mut f = fields();
            assert!(
                matches!(
                    parse_response(head.as_bytes(), &mut f, false),
                    Err(HeadError::Malformed(_))
                ),
                "{low}"
            );
        }
    }

    /// Feeds `wire` in pieces of `step` bytes, as reads would deliver it.
    fn pass(wire: &[u8], step: usize, dechunk: bool) -> Result<(Vec<u8>, usize), BodyError> {
        let mut body = Body::new(Framing::Chunked);
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let mut taken = 0;
        for piece in wire.chunks(step) {
            pending.extend_from_slice(piece);
            let n = body.take(&pending, &mut out, dechunk)?;
            pending.drain(..n);
            taken += n;
            if body.is_done() {
                break;
            }
        }
        assert!(body.is_done(), "not done after {taken} bytes");
        Ok((out, taken))
    }

    #[test]
    fn chunked_bodies_end_where_their_framing_says_however_they_arrive() {
        let wire =
            b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\nGET /next";
        let body_len = wire.len() - b"GET /next".len();
        for step in [1, 2, 3, 7, 100] {
            let (raw, taken) = pass(wire, step, false).unwrap();
            assert_eq!(taken, body_len);
            assert_eq!(raw, &wire[..body_len]);
            let (data, _) = pass(wire, step, true).unwrap();
            assert_eq!(data, b"hello0123456789abcdef");
        }
        assert_eq!(pass(b"zz\r\n", 4, false), Err(BodyError::ChunkSize));
        assert_eq!(pass(b"2\r\nabXY", 8, false), Err(BodyError::ChunkEnd));
    }

    #[test]
    fn a_length_body_takes_no_more_than_its_length() {
        let mut body = Body::new(Framing::Length(5));
        let mut out = Vec::new();
        assert_eq!(body.take(b"abc", &mut out, false), Ok(3));
        assert!(!body.is_done());
        assert_eq!(body.take(b"deGET", &mut out, false), Ok(2));
        assert!(body.is_done());
        assert_eq!(out, b"abcde");
    }

    #[test]
    fn smuggling_shaped_request_heads_are_refused() {
        let framing = |raw: &str| request(raw).map(|r| r.unwrap().0);
        for bad in [
            // obs-fold, and whitespace between a name and its colon.
            "POST / HTTP/1.1\r\nHost: a\r\nX-Pad: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n",
        ] {
            assert!(framing(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            framing("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n"),
            Ok(Framing::Length(7))
        );
    }

    #[test]
    fn a_chunk_size_line_is_what_rfc_9112_allows_and_nothing_else() {
        for (line, size) in [
            ("5", 5),
            ("00ff", 255),
            ("5;a", 5),
            ("5 ; a = b", 5),
            ("5;a=\"x;\\\"y\";b;c=d", 5),
            ("ffffffffffffffff", u64::MAX),
        ] {
            assert_eq!(chunk_size(line.as_bytes()), Ok(size), "{line:?}");
        }
        for line in [
            "",
            "5 ",
            "5\t",
            " 5",
            "x",
            "5;",
            "5;a=",
            "5;a=\"b",
            "5;a b",
            "5;=b",
            "5;a=b c",
            "5;a=\"b\"c",
            "5 a",
            "10000000000000000",
            "0x5",
            "+5",
        ] {
            assert_eq!(
                chunk_size(line.as_bytes()),
                Err(BodyError::ChunkSize),
                "{line:?}"
            );
        }
    }

    #[test]
    fn a_trailer_line_must_be_a_field_line() {
        let ok = b"0\r\nX-Sum: 1\r\nEmpty:\r\n\r\n";
        assert_eq!(pass(ok, 3, false).map(|(_, n)| n), Ok(ok.len()));
        for bad in [
            "0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            "0\r\nHTTP/1.1 200 OK\r\n\r\n",
            "0\r\nX-Sum : 1\r\n\r\n",
            "0\r\n: 1\r\n\r\n",
            "0\r\n no-colon\r\n\r\n",
        ] {
            assert_eq!(
                pass(bad.as_bytes(), 100, false),
                Err(BodyError::TrailerField),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_empty_chunk_size_line_is_refused() {
        assert_eq!(
            pass(b"5\r\nhello\r\n\r\n\r\n", 100, false),
            Err(BodyError::ChunkSize)
        );
        assert_eq!(pass(b";ext\r\n\r\n", 100, false), Err(BodyError::ChunkSize));
    }

    #[test]
    fn a_bare_lf_in_chunk_framing_is_refused() {
        let trailer = b"0\r\nX: a\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(pass(trailer, 100, false).is_err());
        let extension = b"2;\nab\r\nxy\r\n0\r\n\r\n";
        assert!(pass(extension, 100, false).is_err());
    }

    #[test]
    fn a_response_keeps_the_framing_a_connection_field_names() {
        let (framing, _, delivery, head) = response(
            "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok",
            false,
            1,
            true,
        );
        assert_eq!(framing, Framing::Length(2));
        // The length goes on (the framing fields are never hop-by-hop), so
        // the client's connection can stay.
        assert!(head.contains("\r\nContent-Length: 2\r\n"), "{head}");
        assert!(!delivery.close, "{head}");
    }

    #[test]
    fn an_absolute_form_target_without_a_path_keeps_its_query() {
        // `http://app?x=1` is a valid absolute-form (RFC 9112 §3.2.2: an
        // empty path is sent as `/`), so it goes on rather than being refused.
        let (_, _, path, head) = request("GET http://app?x=1 HTTP/1.1\r\nHost: app\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(path, "/");
        assert!(head.starts_with("GET /?x=1 HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn a_head_answer_loses_conflicting_lengths_and_keeps_a_plain_one() {
        let (framing, _, _, head) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            true,
            1,
            true,
        );
        assert_eq!(framing, Framing::Empty);
        assert!(!head.contains("Content-Length"), "{head}");
        let (_, _, _, head) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            true,
            1,
            true,
        );
        assert!(head.contains("\r\nContent-Length: 5\r\n"), "{head}");
    }

    #[test]
    fn heads_a_proxy_must_not_pass_on_as_they_came_are_refused() {
        // RFC 9112 §5.1, §5.2, §2.2: whitespace before a colon, obs-fold,
        // whitespace before the first field; RFC 9112 §6.3 item 5: an
        // invalid length in a response is a 502.
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\n Content-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            // Found by the fuzzer: forwarded as received, framed by close.
            "HTTP/1.1 200 OK\r\nContent-Length:,\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n",
        ] {
            let mut f = fields();
            assert!(
                parse_response(head.as_bytes(), &mut f, false).is_err(),
                "{head:?}"
            );
        }
        for head in [
            "GET / HTTP/1.1\r\n Host: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n",
        ] {
            assert!(request(head).is_err(), "{head:?}");
        }
    }

    #[test]
    fn a_target_with_non_ascii_where_a_scheme_would_end_is_refused_not_a_panic() {
        // Found by the fuzzer: `target[..7]` cut a character in two.
        assert_eq!(
            request("GET lamapp\u{35a}xlaml HTTP/1.1\r\nHost: a\r\n\r\n").err(),
            Some(HeadError::BadTarget)
        );
        assert_eq!(
            request("GET http://\u{35a}/ HTTP/1.1\r\nHost: a\r\n\r\n").err(),
            Some(HeadError::BadTarget)
        );
    }

    #[test]
    fn a_head_answer_to_http_1_0_has_no_transfer_encoding() {
        let (_, _, _, head) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
            0,
            true,
        );
        assert!(!head.contains("Transfer-Encoding"), "{head}");
    }
}
