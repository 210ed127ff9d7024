#!/usr/bin/env python3
"""The emulated instances' application: a real HTTP server per instance.

  backends.py --group web --group api      follow these Auto Scaling groups
  backends.py --all-tagged                 follow every group tagged signpost:service

moto's instances are only records; this gives each one a live server, so the
controller's health checks and routed requests hit something real. Every 0.5 s
it reads the groups (DescribeAutoScalingGroups) and their instances
(DescribeInstances); each instance that is `running` with a private IP gets a
server bound to that IP and the group's `signpost:port` tag. The seeded VPC is
127.42.0.0/16, so those IPs are loopback addresses on Linux (all of
127.0.0.0/8 is) and binding them needs no setup. An instance that leaves its
group or stops running loses its server.

Each server answers GET /health with 200 "ok", and any other GET with 200 and
"instance=<id> ip=<ip> service=<service> path=<path>", plus an X-Instance-Id
header. One log line per server start/stop goes to stderr.
"""
import argparse
import functools
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
from botocore.config import Config

for k, v in (("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
             ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
    os.environ.setdefault(k, v)


def log(msg):
    print(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {msg}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    def __init__(self, instance_id, ip, service, log_requests, *args, **kwargs):
        self.instance_id, self.ip, self.service, self.log_requests = instance_id, ip, service, log_requests
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.path == "/health":
            body = b"ok\n"
        else:
            body = (f"instance={self.instance_id} ip={self.ip} service={self.service} "
                    f"path={self.path}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance-Id", self.instance_id)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # per-request lines only when asked for
        if self.log_requests:
            log(f"{self.instance_id} {self.ip} " + fmt % args)


class Backend:
    """One instance's server, serving from its own thread."""

    def __init__(self, instance_id, ip, port, service, log_requests):
        self.key = (ip, port, service)
        handler = functools.partial(Handler, instance_id, ip, service, log_requests)
        ThreadingHTTPServer.allow_reuse_address = True  # rebinding a reused IP at once
        ThreadingHTTPServer.request_queue_size = 64  # default 5 drops bursts of connections
        self.server = ThreadingHTTPServer((ip, port), handler)
        self.server.daemon_threads = True
        # Short poll so shutdown() returns quickly when many stop at once.
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def wanted_instances(asg, ec2, groups, all_tagged):
    """{instance_id: (ip, port, service)} for running instances of followed groups."""
    pages = asg.get_paginator("describe_auto_scaling_groups").paginate(
        **({"AutoScalingGroupNames": groups} if groups else {}))
    members = {}  # instance id -> (port, service)
    for page in pages:
        for g in page["AutoScalingGroups"]:
            tags = {t["Key"]: t["Value"] for t in g.get("Tags", [])}
            if "signpost:service" not in tags and all_tagged:
                continue
            if "signpost:port" not in tags:
                continue  # nothing to serve on; the controller would skip it too
            for i in g["Instances"]:
                members[i["InstanceId"]] = (int(tags["signpost:port"]),
                                            tags.get("signpost:service", g["AutoScalingGroupName"]))
    want = {}
    if members:
        # A Filter, not InstanceIds=: an id that vanished must not fail the call.
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-id", "Values": sorted(members)}])
        for page in pages:
            for r in page["Reservations"]:
                for i in r["Instances"]:
                    ip = i.get("PrivateIpAddress")
                    if i["State"]["Name"] == "running" and ip:
                        port, service = members[i["InstanceId"]]
                        want[i["InstanceId"]] = (ip, port, service)
    return want


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", action="append", default=[], metavar="NAME")
    p.add_argument("--all-tagged", action="store_true")
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--log-requests", action="store_true")
    a = p.parse_args()
    if bool(a.group) == a.all_tagged:
        p.error("give --group NAME (repeatable) or --all-tagged")

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    # No SDK retries and short timeouts: the loop itself retries every interval,
    # and a dead emulator must not delay a SIGTERM by botocore's backoff.
    cfg = Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5)
    asg, ec2 = boto3.client("autoscaling", config=cfg), boto3.client("ec2", config=cfg)
    running = {}  # instance id -> Backend
    bind_failed = set()  # instance ids whose bind error was already logged
    last_error = None
    log(f"backends following {'all tagged groups' if a.all_tagged else ', '.join(a.group)} "
        f"at {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}")
    while not stopping.is_set():
        try:
            want = wanted_instances(asg, ec2, a.group, a.all_tagged)
            last_error = None
        except Exception as e:  # emulator restarting/reset: keep what runs, say it once
            if str(e) != last_error:
                log(f"poll failed: {e}")
                last_error = str(e)
            stopping.wait(a.interval)
            continue
        # Stop first, then start: a freed IP may be handed to a new instance.
        for iid in [i for i, b in running.items() if want.get(i) != b.key]:
            b = running.pop(iid)
            b.stop()
            log(f"backend down {iid} {b.key[0]}:{b.key[1]}")
        for iid, (ip, port, service) in want.items():
            if iid in running:
                continue
            try:
                running[iid] = Backend(iid, ip, port, service, a.log_requests)
                log(f"backend up {iid} {ip}:{port} service={service}")
            except OSError as e:  # e.g. port taken; retried next poll, logged once
                if iid not in bind_failed:
                    log(f"backend {iid} cannot bind {ip}:{port}: {e}")
                bind_failed.add(iid)
        stopping.wait(a.interval)

    for iid, b in running.items():
        b.stop()
        log(f"backend down {iid} {b.key[0]}:{b.key[1]}")
    log("backends stopped")


if __name__ == "__main__":
    main()
