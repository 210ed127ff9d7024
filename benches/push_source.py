#!/usr/bin/env python3
"""A static push source for router benchmarks: serves one snapshot line of
the wire protocol (service "app" on route "/", N healthy endpoints at
127.0.0.1:FIRST_PORT.., one port each) on /v1/watch, holds the stream open
with a ping every 5 s, and takes acks. The router's proxy path is then
measured alone, without a controller.

    push_source.py LISTEN_PORT N [FIRST_PORT]
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, n = int(sys.argv[1]), int(sys.argv[2])
first = int(sys.argv[3]) if len(sys.argv) > 3 else 19001
snapshot = {"type": "snapshot", "protocol": 2, "epoch": 1, "revision": 1, "services": [{
    "name": "app", "route": "/", "endpoints": [
        {"instance": f"i-{i}", "address": "127.0.0.1", "port": first + i,
         "zone": "a", "state": "healthy"} for i in range(n)]}]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write((json.dumps(snapshot) + "\n").encode())
        self.wfile.flush()
        # Pings, as a controller sends them: a silent stream would make the
        # router reconnect every 15 s in the middle of a measurement.
        while True:
            time.sleep(5)
            self.wfile.write(b'{"type":"ping","revision":1}\n')
            self.wfile.flush()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
