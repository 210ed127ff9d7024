//! The property the fuzz target (`fuzz_targets/framing.rs`) checks on every
//! input, and `tests/fuzz_corpus.rs` on the committed corpus: **what the
//! codec would forward frames the same under an independent reader.**
//!
//! The reader is `httparse` for heads (strict by default) plus the framing
//! functions below, written from RFC 9112 §6 and §7.1 and not from the
//! codec: a message the codec passes on must be one whose body every
//! careful recipient delimits exactly where the codec did, or a request
//! (or response) could ride inside another.
//!
//! The first byte of an input picks what the rest is:
//!
//! | `mode % 3` | rest of the input                          |
//! |------------|--------------------------------------------|
//! | 0          | a request head and what follows it         |
//! | 1          | a response head and what follows it        |
//! | 2          | a chunked body                             |
//!
//! and its other bits the variants: a response to HEAD, an HTTP/1.0 client,
//! and the size of the pieces bodies arrive in.

use signpost_router::http1::{self, Body, Framing};

/// How the reference reads a body's end (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delimited {
    Length(u64),
    Chunked,
    Close,
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Pieces of 1 to 16 bytes, or all at once.
    let step = match (mode >> 3) & 0x1f {
        0 => rest.len().max(1),
        n => usize::from(n % 16) + 1,
    };
    match mode % 3 {
        0 => request(rest, step),
        1 => response(rest, mode & 0x40 != 0, mode & 0x80 != 0, step),
        _ => {
            chunked(rest, step, false);
        }
    }
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn as_delimited(framing: Framing) -> Delimited {
    match framing {
        Framing::Empty => Delimited::Length(0),
        Framing::Length(n) => Delimited::Length(n),
        Framing::Chunked => Delimited::Chunked,
        Framing::UntilClose => Delimited::Close,
    }
}

// ---------------------------------------------------------------------------
// Heads

fn request(input: &[u8], step: usize) {
    let mut fields = http1::fields();
    let Ok(Some(req)) = http1::parse_request(input, &mut fields) else {
        return;
    };
    let mut head = Vec::new();
    req.write_head("192.0.2.1", &mut head);
    http1::finish_head(&mut head, (!req.has_host()).then_some("10.0.0.1:80"));

    let mut parsed = [httparse::EMPTY_HEADER; 2 * http1::MAX_HEADERS];
    let mut r = httparse::Request::new(&mut parsed);
    match r.parse(&head) {
        Ok(httparse::Status::Complete(n)) => {
            assert_eq!(
                n,
                head.len(),
                "the forwarded head ends early:\n{}",
                show(&head)
            )
        }
        other => panic!(
            "the forwarded head does not parse ({other:?}):\n{}",
            show(&head)
        ),
    }
    assert!(
        r.path.is_some_and(|p| p.starts_with('/')),
        "target not in origin form:\n{}",
        show(&head)
    );
    let hosts = r
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("host"))
        .count();
    assert_eq!(hosts, 1, "not one Host:\n{}", show(&head));
    let codec = as_delimited(req.framing);
    assert_ne!(codec, Delimited::Close, "a request framed by close");
    assert_eq!(
        request_framing(r.headers),
        Ok(codec),
        "the endpoint frames the forwarded request otherwise:\n{}",
        show(&head)
    );
    body(req.framing, &input[req.len..], step, false);
}

fn response(input: &[u8], to_head: bool, http_1_0: bool, step: usize) {
    let mut fields = http1::fields();
    let Ok(Some(res)) = http1::parse_response(input, &mut fields, to_head) else {
        return;
    };
    let minor = u8::from(!http_1_0);
    let mut head = Vec::new();
    let delivery = res.write_head(minor, true, &mut head);

    let mut parsed = [httparse::EMPTY_HEADER; 2 * http1::MAX_HEADERS];
    let mut r = httparse::Response::new(&mut parsed);
    match r.parse(&head) {
        Ok(httparse::Status::Complete(n)) => {
            assert_eq!(
                n,
                head.len(),
                "the forwarded head ends early:\n{}",
                show(&head)
            )
        }
        other => panic!(
            "the forwarded head does not parse ({other:?}):\n{}",
            show(&head)
        ),
    }
    let status = r.code.unwrap_or(0);
    let has = |name: &str| r.headers.iter().any(|f| f.name.eq_ignore_ascii_case(name));
    if (100..200).contains(&status) || status == 204 {
        // RFC 9110 §8.6, RFC 9112 §6.1: MUST NOT.
        assert!(
            !has("content-length") && !has("transfer-encoding"),
            "a {status} with framing fields:\n{}",
            show(&head)
        );
    }
    if http_1_0 {
        // RFC 9112 §6.1: no Transfer-Encoding to an HTTP/1.0 recipient.
        assert!(
            !has("transfer-encoding"),
            "chunks to HTTP/1.0:\n{}",
            show(&head)
        );
    }
    let codec = if delivery.dechunk {
        Delimited::Close
    } else {
        as_delimited(res.framing)
    };
    assert_eq!(
        response_framing(status, to_head, r.headers),
        Ok(codec),
        "the client frames the forwarded response otherwise:\n{}",
        show(&head)
    );
    if codec == Delimited::Close && !res.is_interim() {
        assert!(
            delivery.close,
            "a body ended by close on a connection kept open"
        );
    }
    if !res.is_interim() {
        body(res.framing, &input[res.len..], step, delivery.dechunk);
    }
}

/// The elements of every `name` field's list (RFC 9110 §5.6.1), trimmed;
/// empty elements are dropped, as a recipient may.
fn elements<'a>(fields: &'a [httparse::Header<'a>], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(name))
        .flat_map(|f| f.value.split(|b| *b == b','))
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
        .collect()
}

fn has_field(fields: &[httparse::Header<'_>], name: &str) -> bool {
    fields.iter().any(|f| f.name.eq_ignore_ascii_case(name))
}

/// RFC 9112 §6.3 item 5: one length, however often it is repeated.
fn content_length(fields: &[httparse::Header<'_>]) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for element in elements(fields, "content-length") {
        if !element.iter().all(u8::is_ascii_digit) {
            return Err("Content-Length not digits");
        }
        let n: u64 = std::str::from_utf8(element)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("Content-Length too large")?;
        if length.is_some_and(|m| m != n) {
            return Err("two different lengths");
        }
        length = Some(n);
    }
    if length.is_none() && has_field(fields, "content-length") {
        return Err("empty Content-Length");
    }
    Ok(length)
}

/// Whether `chunked` is the final coding; applied twice, the message is
/// invalid (RFC 9112 §6.1: a sender MUST NOT).
fn chunked_last(fields: &[httparse::Header<'_>]) -> Result<bool, &'static str> {
    let codings = elements(fields, "transfer-encoding");
    let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    match codings.iter().filter(|c| chunked(c)).count() {
        0 | 1 => Ok(codings.last().is_some_and(|c| chunked(c))),
        _ => Err("chunked applied twice"),
    }
}

/// RFC 9112 §6.3 for a request a server receives.
pub fn request_framing(fields: &[httparse::Header<'_>]) -> Result<Delimited, &'static str> {
    if has_field(fields, "transfer-encoding") {
        if has_field(fields, "content-length") {
            return Err("Transfer-Encoding and Content-Length");
        }
        // Item 4: a request whose final coding is not chunked is refused.
        return match chunked_last(fields)? {
            true => Ok(Delimited::Chunked),
            false => Err("request coding not ending in chunked"),
        };
    }
    Ok(Delimited::Length(content_length(fields)?.unwrap_or(0)))
}

/// RFC 9112 §6.3 for a response a client receives.
pub fn response_framing(
    status: u16,
    to_head: bool,
    fields: &[httparse::Header<'_>],
) -> Result<Delimited, &'static str> {
    // Item 1.
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Delimited::Length(0));
    }
    if has_field(fields, "transfer-encoding") {
        // A sender MUST NOT send both (§6.2); a recipient may not agree on
        // which wins.
        if has_field(fields, "content-length") {
            return Err("Transfer-Encoding and Content-Length");
        }
        // Item 4.
        return Ok(match chunked_last(fields)? {
            true => Delimited::Chunked,
            false => Delimited::Close,
        });
    }
    // Items 5 and 8.
    Ok(content_length(fields)?.map_or(Delimited::Close, Delimited::Length))
}

// ---------------------------------------------------------------------------
// Bodies

fn body(framing: Framing, input: &[u8], step: usize, dechunk: bool) {
    match framing {
        Framing::Chunked => {
            chunked(input, step, dechunk);
        }
        Framing::Length(n) => {
            let (out, done) = pass(Framing::Length(n), input, step, false).expect("a length body");
            let want = input.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            assert_eq!(out, &input[..want], "a length body passed on otherwise");
            assert_eq!(done, want as u64 == n);
        }
        Framing::Empty | Framing::UntilClose => {}
    }
}

/// Feeds `input` to the codec in pieces of `step` bytes, as reads would:
/// what it passed on and whether the body ended, or `None` if it refused
/// the body (what it passed on before then is returned too, in `Err`).
fn pass(
    framing: Framing,
    input: &[u8],
    step: usize,
    dechunk: bool,
) -> Result<(Vec<u8>, bool), Vec<u8>> {
    let mut body = Body::new(framing);
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for piece in input.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        let mut batch = Vec::new();
        match body.take(&pending, &mut batch, dechunk) {
            Ok(n) => {
                pending.drain(..n);
                out.extend_from_slice(&batch);
            }
            // A batch refused is not passed on (`proxy.rs` writes only
            // what `take` accepted).
            Err(_) => return Err(out),
        }
        if body.is_done() {
            return Ok((out, true));
        }
    }
    Ok((out, body.is_done()))
}

/// Checks a chunked body: whatever the codec passes on is a valid chunked
/// body, or a prefix of one, that ends where the codec says it ends; and
/// the pieces it arrives in change nothing.
fn chunked(input: &[u8], step: usize, dechunk: bool) {
    let whole = pass(Framing::Chunked, input, input.len().max(1), false);
    let pieces = pass(Framing::Chunked, input, step, false);
    match (&whole, &pieces) {
        (Ok((a, true)), Ok((b, true))) => assert_eq!(a, b, "pieces change the body"),
        (Ok((_, true)), Err(_)) | (Err(_), Ok((_, true))) => {
            panic!("ended read whole, refused in pieces of {step}, or the reverse")
        }
        _ => {}
    }
    for (passed, done) in [whole, pieces].into_iter().map(|r| match r {
        Ok((out, done)) => (out, done),
        Err(out) => (out, false),
    }) {
        match reference_chunked(&passed) {
            Chunked::Complete { len, .. } => {
                assert!(
                    done,
                    "the reader sees an end the codec did not:\n{}",
                    show(&passed)
                );
                assert_eq!(len, passed.len(), "bytes after the end:\n{}", show(&passed));
            }
            Chunked::Incomplete => {
                assert!(
                    !done,
                    "the codec ended a body the reader has not:\n{}",
                    show(&passed)
                )
            }
            Chunked::Invalid(why) => {
                panic!(
                    "passed on a chunked body the reader refuses ({why}):\n{}",
                    show(&passed)
                )
            }
        }
    }
    if dechunk {
        // The data alone, as an HTTP/1.0 client gets it.
        if let (Ok((data, true)), Chunked::Complete { data: want, .. }) = (
            pass(Framing::Chunked, input, step, true),
            reference_chunked(input),
        ) {
            assert_eq!(data, want, "the chunks' data passed on otherwise");
        }
    }
}

/// What the reference reader makes of a chunked body.
#[derive(Debug)]
pub enum Chunked {
    /// It ends after `len` bytes, with this data.
    Complete {
        len: usize,
        data: Vec<u8>,
    },
    /// Valid so far, not ended.
    Incomplete,
    Invalid(&'static str),
}

/// The next line of `b`, without its CRLF, and where the one after starts.
/// `Err(None)`: not ended yet; `Err(Some(why))`: not a line of HTTP/1.1.
fn line(b: &[u8]) -> Result<(&[u8], usize), Option<&'static str>> {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\r' => {
                return match b.get(i + 1) {
                    Some(b'\n') => Ok((&b[..i], i + 2)),
                    Some(_) => Err(Some("CR without LF")),
                    None => Err(None),
                }
            }
            b'\n' => return Err(Some("LF without CR")),
            b'\t' => {}
            c if c < 0x20 || c == 0x7f => return Err(Some("control character")),
            _ => {}
        }
    }
    Err(None)
}

fn tchar(c: u8) -> bool {
    matches!(
        c,
        b'!' | b'#'
            | b'$'
            | b'%'
            | b'&'
            | b'\''
            | b'*'
            | b'+'
            | b'-'
            | b'.'
            | b'^'
            | b'_'
            | b'`'
            | b'|'
            | b'~'
    ) || c.is_ascii_alphanumeric()
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1.1), as a small state machine.
fn size_line(l: &[u8]) -> Result<u64, &'static str> {
    #[derive(PartialEq)]
    enum S {
        Size,
        BeforeSemi,
        BeforeName,
        Name,
        AfterName,
        BeforeValue,
        Token,
        Quoted,
        Escaped,
        AfterQuote,
    }
    let mut s = S::Size;
    let mut size: u64 = 0;
    let mut digits = 0;
    for &c in l {
        let ws = c == b' ' || c == b'\t';
        s = match s {
            S::Size if c.is_ascii_hexdigit() => {
                digits += 1;
                // Leading zeros are digits too (1*HEXDIG): only the value
                // is bounded.
                if size >> 60 != 0 {
                    return Err("size over 64 bits");
                }
                size = size * 16 + u64::from((c as char).to_digit(16).unwrap());
                S::Size
            }
            S::AfterName if ws => S::AfterName,
            S::Size | S::BeforeSemi | S::Token | S::AfterQuote if ws => S::BeforeSemi,
            S::Size | S::BeforeSemi | S::Name | S::AfterName | S::Token | S::AfterQuote
                if c == b';' =>
            {
                S::BeforeName
            }
            S::BeforeName if ws => S::BeforeName,
            S::BeforeName | S::Name if tchar(c) => S::Name,
            S::Name if ws => S::AfterName,
            S::Name | S::AfterName if c == b'=' => S::BeforeValue,
            S::BeforeValue if ws => S::BeforeValue,
            S::BeforeValue if c == b'"' => S::Quoted,
            S::BeforeValue | S::Token if tchar(c) => S::Token,
            S::Quoted if c == b'"' => S::AfterQuote,
            S::Quoted if c == b'\\' => S::Escaped,
            S::Quoted | S::Escaped => S::Quoted,
            _ => return Err("not chunk-size [ chunk-ext ]"),
        };
        if digits == 0 {
            return Err("no size");
        }
    }
    if digits == 0 {
        return Err("no size");
    }
    match s {
        S::Size | S::Name | S::Token | S::AfterQuote => Ok(size),
        // Whitespace is allowed only before a `;` (BWS), not at the end.
        _ => Err("chunk-size line ends mid-extension or in whitespace"),
    }
}

/// A chunked body read by RFC 9112 §7.1 to the letter.
pub fn reference_chunked(b: &[u8]) -> Chunked {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let (l, next) = match line(&b[at..]) {
            Ok(found) => found,
            Err(None) => return Chunked::Incomplete,
            Err(Some(why)) => return Chunked::Invalid(why),
        };
        let size = match size_line(l) {
            Ok(size) => size,
            Err(why) => return Chunked::Invalid(why),
        };
        at += next;
        if size == 0 {
            // Trailer section: field lines up to an empty line (§7.1.2).
            loop {
                let (l, next) = match line(&b[at..]) {
                    Ok(found) => found,
                    Err(None) => return Chunked::Incomplete,
                    Err(Some(why)) => return Chunked::Invalid(why),
                };
                at += next;
                if l.is_empty() {
                    return Chunked::Complete { len: at, data };
                }
                let name = l.iter().take_while(|c| tchar(**c)).count();
                if name == 0 || l.get(name) != Some(&b':') {
                    return Chunked::Invalid("trailer line not a field line");
                }
            }
        }
        let left = b.len() - at;
        if (left as u64) < size {
            return Chunked::Incomplete;
        }
        let size = size as usize;
        data.extend_from_slice(&b[at..at + size]);
        at += size;
        match &b[at..] {
            [] | [b'\r'] => return Chunked::Incomplete,
            [b'\r', b'\n', ..] => at += 2,
            _ => return Chunked::Invalid("chunk data not followed by CRLF"),
        }
    }
}
