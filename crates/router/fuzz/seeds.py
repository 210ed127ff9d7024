#!/usr/bin/env python3
"""Writes the hand-made seeds of the framing corpus (corpus/framing/seed-*):
the shapes the byte-level tests in tests/proxy_http.rs pin, so that the
fuzzer starts from every framing the codec knows. First byte: the mode
(framing_check.rs): 0 request, 1 response, 2 chunked body; 0x40 a response
to HEAD, 0x80 an HTTP/1.0 client; bits 3-7 pick the piece size."""
import os

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "framing")
os.makedirs(here, exist_ok=True)

REQ, RES, BODY = 0, 1, 2
HEAD, OLD = 0x40, 0x80
PIECES = 3 << 3  # pieces of 4 bytes

seeds = {
    "req-get": (REQ, b"GET /a?b HTTP/1.1\r\nHost: app\r\n\r\n"),
    "req-length": (REQ | PIECES, b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloGET"),
    "req-length-list": (REQ, b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5, 5\r\nContent-Length: 005\r\n\r\nhello"),
    "req-chunked": (REQ | PIECES, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=\"y\"\r\nhello\r\n0\r\nT: 1\r\n\r\nGET"),
    "req-chunked-twice": (REQ, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\n0\r\n\r\n\r\n0\r\n\r\n"),
    "req-gzip-chunked": (REQ, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "req-te-cl": (REQ, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "req-connection": (REQ, b"POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length, x-hop\r\nX-Hop: 1\r\nContent-Length: 2\r\n\r\nok"),
    "req-absolute": (REQ, b"GET http://app.example:8080?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"),
    "req-1-0": (REQ, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"),
    "req-no-host": (REQ, b"GET / HTTP/1.1\r\n\r\n"),
    "req-host-list": (REQ, b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n"),
    "req-trailer-smuggle": (REQ, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /s HTTP/1.1\r\n\r\n"),
    "res-length": (RES, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\nok"),
    "res-length-list": (RES, b"HTTP/1.1 200 OK\r\nContent-Length: 2,2\r\ncontent-length: 2\r\n\r\nok"),
    "res-chunked": (RES | PIECES, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    "res-chunked-1-0": (RES | OLD, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    "res-gzip": (RES, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzzz"),
    "res-close": (RES, b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
    "res-head": (RES | HEAD, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "res-head-1-0": (RES | HEAD | OLD, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "res-204": (RES, b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "res-304": (RES, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
    "res-100": (RES, b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n"),
    "res-1-0-chunked": (RES, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "res-trailer-split": (RES, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHTTP/1.1 200 OK\r\n\r\n"),
    "body-ext": (BODY, b"5 ; a = \"x;\\\"y\" ;b\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n"),
    "body-pieces": (BODY | PIECES, b"1\r\na\r\n2;x\r\nbc\r\n0\r\n\r\nGET"),
    "body-space": (BODY, b"5 \r\nhello\r\n0\r\n\r\n"),
    "body-open-quote": (BODY, b"5;a=\"b\r\nhello\r\n0\r\n\r\n"),
    "body-bare-lf": (BODY, b"2;\nab\r\nxy\r\n0\r\n\r\n"),
    "body-trailer-bare-lf": (BODY, b"0\r\nX: a\n\r\nGET /s HTTP/1.1\r\n\r\n"),
    "body-huge-size": (BODY, b"ffffffffffffffff\r\nab"),
    "body-overflow": (BODY, b"10000000000000000\r\n"),
}

for name, (mode, data) in seeds.items():
    with open(os.path.join(here, "seed-" + name), "wb") as f:
        f.write(bytes([mode]) + data)
print(f"{len(seeds)} seeds in {here}")
