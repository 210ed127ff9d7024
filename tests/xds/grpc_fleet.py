"""Real gRPC (grpcio) on both sides of signpost's xDS server, for tests/xds_grpc.rs.

  grpc_fleet.py servers   the instances' applications: one gRPC server per
                          instance address, each with the standard health
                          service (grpc.health.v1) and signpost.test.Echo/Who,
                          which answers "instance=<id>" after 100 ms (so that
                          calls are in flight when an instance goes). Driven
                          on stdin:
                            start <id> <ip> <port>  ->  "started <ip>"
                            stop <ip>               ->  "stopped <ip>"
                          A stopped server cuts its calls in flight, as a
                          terminated instance would.

  grpc_fleet.py client TARGET PER_SECOND
                          a proxyless client: a channel to TARGET (xds:///echo;
                          GRPC_XDS_BOOTSTRAP names the bootstrap) calling Who
                          PER_SECOND times a second, each call checked. Prints a
                          JSON line a second {"sent", "ok", "failed", "by_instance",
                          "last_failure"}
                          and, when stdin closes, waits for the calls in flight
                          and prints the last line with "done": true and every
                          failure.
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "signpost.test.Echo"
METHOD = f"/{SERVICE}/Who"


def who(instance):
    answer = f"instance={instance}".encode()

    def handle(_request, _context):
        time.sleep(0.1)
        return answer

    return handle


def servers():
    running = {}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "start":
            instance, ip, port = words[1], words[2], int(words[3])
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        SERVICE,
                        {"Who": grpc.unary_unary_rpc_method_handler(who(instance))},
                    ),
                )
            )
            checks = health.HealthServicer()
            checks.set("", health_pb2.HealthCheckResponse.SERVING)
            checks.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(checks, server)
            if server.add_insecure_port(f"{ip}:{port}") == 0:
                print(f"failed {ip}: cannot bind {ip}:{port}", flush=True)
                continue
            server.start()
            running[ip] = server
            print(f"started {ip}", flush=True)
        elif words[0] == "stop":
            ip = words[1]
            server = running.pop(ip, None)
            if server is not None:
                server.stop(grace=None).wait()
            print(f"stopped {ip}", flush=True)
    for server in running.values():
        server.stop(grace=None)


def client(target, per_second):
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(METHOD)
    lock = threading.Lock()
    state = {"sent": 0, "ok": 0, "failed": 0, "by_instance": {}, "failures": []}
    in_flight = []

    def done(call, started):
        try:
            answer = call.result().decode()
            if not answer.startswith("instance="):
                raise ValueError(f"unexpected answer {answer!r}")
            instance = answer.split("=", 1)[1]
            with lock:
                state["ok"] += 1
                state["by_instance"][instance] = state["by_instance"].get(instance, 0) + 1
        except Exception as e:  # every failed call is recorded, whatever it was
            detail = f"{e.code()}: {e.details()}" if isinstance(e, grpc.RpcError) else repr(e)
            at = time.strftime("%H:%M:%S", time.gmtime(started)) + f".{int(started * 1000) % 1000:03d}"
            with lock:
                state["failed"] += 1
                state["failures"].append(f"{at}: {detail}")

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    def report(last=False):
        with lock:
            line = {k: v for k, v in state.items() if k != "failures"}
            line["last_failure"] = state["failures"][-1] if state["failures"] else None
            if last:
                line["done"] = True
                line["failures"] = state["failures"]
        print(json.dumps(line), flush=True)

    period = 1.0 / per_second
    next_call = next_report = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_call:
            started = time.time()
            # Not wait_for_ready: a call with no ready endpoint fails at once
            # and is counted, rather than queueing until one appears.
            call = who.future(b"", timeout=5)
            call.add_done_callback(lambda c, s=started: done(c, s))
            in_flight.append(call)
            with lock:
                state["sent"] += 1
            next_call += period
        if now >= next_report:
            report()
            in_flight = [c for c in in_flight if not c.done()]
            next_report += 1.0
        time.sleep(max(0.0, min(next_call, next_report) - time.monotonic()))
    for call in in_flight:
        try:
            call.result()
        except Exception:
            pass
    # Callbacks run on gRPC's threads: wait until each finished call is counted.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if state["ok"] + state["failed"] == state["sent"]:
                break
        time.sleep(0.01)
    report(last=True)
    channel.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["servers"]:
        servers()
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 4:
        client(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
