#!/usr/bin/env python3
"""Change-to-applied latency of one subscriber (an agent): serves a snapshot
(service "app" on route "/", N healthy endpoints at 127.0.0.1:FIRST_PORT..),
then, once the subscriber acked it, CHANGES deltas one at a time, each
turning endpoint i-0 draining or back to healthy, and times each from the
moment its line is written to the ack of its revision. Prints
"p50 p99 max" in milliseconds and exits.

    agent_changes.py LISTEN_PORT N CHANGES [FIRST_PORT] [PAUSE_MS]
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, n, changes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
first = int(sys.argv[4]) if len(sys.argv) > 4 else 19001
pause = (int(sys.argv[5]) if len(sys.argv) > 5 else 300) / 1000


def endpoint(i, state="healthy"):
    return {"instance": f"i-{i}", "address": "127.0.0.1", "port": first + i,
            "zone": "a", "state": state}


snapshot = {"type": "snapshot", "protocol": 2, "epoch": 1, "revision": 1, "services": [{
    "name": "app", "route": "/", "endpoints": [endpoint(i) for i in range(n)]}]}
acked = 0
cond = threading.Condition()
latencies = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def line(self, message):
        self.wfile.write((json.dumps(message) + "\n").encode())
        self.wfile.flush()

    def wait_acked(self, revision, limit=30):
        with cond:
            return cond.wait_for(lambda: acked >= revision, timeout=limit)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        self.line(snapshot)
        if not self.wait_acked(1):
            print("the snapshot was never acked", file=sys.stderr)
            sys.exit(1)
        for r in range(2, changes + 2):
            time.sleep(pause)
            state = "draining" if r % 2 == 0 else "healthy"
            sent = time.monotonic()
            self.line({"type": "delta", "protocol": 2, "epoch": 1, "revision": r, "base": r - 1,
                       "changes": [{"op": "put_endpoint", "service": "app", "endpoint": endpoint(0, state)}]})
            if not self.wait_acked(r):
                print(f"revision {r} not acked within 30 s", file=sys.stderr)
                break
            latencies.append((time.monotonic() - sent) * 1000)
        done.set()
        while True:
            time.sleep(5)
            self.line({"type": "ping", "revision": changes + 1})

    def do_POST(self):
        global acked
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with cond:
            acked = max(acked, body["revision"])
            cond.notify_all()
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


done = threading.Event()
server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
done.wait()
latencies.sort()
pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
print(f"{pick(0.5):.1f} {pick(0.99):.1f} {latencies[-1]:.1f} {len(latencies)}")
