#!/usr/bin/env bash
# Instructions per proxied request, signpost router beside nginx, under
# callgrind: a cost that background load does not change, unlike
# requests/s (benches/router.sh).
#
#   benches/router-instructions.sh      # about 2 minutes after the build
#
# Each proxy runs alone under `valgrind --tool=callgrind` with 2 backends
# (one nginx worker answering a static "ok"): wrk warms it for 5 s, the
# counters are zeroed, wrk runs SECONDS (20) at -c64, the counters are
# dumped, and the total is divided by wrk's request count. nginx is the
# same upstream set-up as in router.sh, with one worker and no master.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_RUN=${SECONDS_RUN:-20}
CONNECTIONS=${CONNECTIONS:-64}

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v valgrind >/dev/null \
    || ! command -v curl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light valgrind curl >/dev/null
  fi
fi
for tool in wrk nginx valgrind callgrind_control curl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (Debian: wrk nginx-light valgrind curl)" >&2; exit 1; }
done

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

nginx_run() { # dir config [wrapper...]
  local dir=$1 conf=$2; shift 2
  mkdir -p "$WORK/$dir"
  printf '%s\n' "$conf" > "$WORK/$dir/nginx.conf"
  "$@" nginx -p "$WORK/$dir" -c "$WORK/$dir/nginx.conf" -e "$WORK/$dir/error.log" \
    -g "daemon off; pid $WORK/$dir/nginx.pid; error_log $WORK/$dir/error.log warn;" 2>"$WORK/$dir.stderr" &
  PIDS+=($!)
}

wait_url() {
  for _ in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "nothing answers at $1" >&2; exit 1
}

# Zeroes the counters of callgrind process $1 after a warm-up against $2,
# loads it, and prints instructions per request.
measure() { # pid url label
  wrk -t2 -c"$CONNECTIONS" -d5s "$2" >/dev/null
  callgrind_control -z "$1" >/dev/null
  wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_RUN}s" "$2" > "$WORK/wrk.txt"
  callgrind_control -d "$1" >/dev/null
  sleep 1
  local requests total out
  requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
  out=$(ls -t "$WORK"/cg."$1".out* | head -1)
  total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "| $3 | $requests | $((total / requests)) |"
}

nginx_run backends "worker_processes 1; events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:19001; keepalive_requests 1000000; location / { return 200 \"ok\\n\"; } }
  server { listen 127.0.0.1:19002; keepalive_requests 1000000; location / { return 200 \"ok\\n\"; } } }"
wait_url http://127.0.0.1:19001/
wait_url http://127.0.0.1:19002/

# The routes, from a static push source (as in router.sh).
python3 benches/push_source.py 19090 2 &
PIDS+=($!)

ROWS=()
SIGNPOST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p.out" \
  "$SIGNPOST" router --id instructions --controller http://127.0.0.1:19090 \
  --listen 127.0.0.1:19080 --admin-listen 127.0.0.1:19081 2>"$WORK/router.stderr" &
ROUTER=$!; PIDS+=($ROUTER)
wait_url http://127.0.0.1:19081/readyz
ROWS+=("$(measure "$ROUTER" http://127.0.0.1:19080/ "signpost router")")
kill "$ROUTER"

nginx_run proxy "master_process off; worker_processes 1; events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream app { server 127.0.0.1:19001; server 127.0.0.1:19002; keepalive 64; }
  server { listen 127.0.0.1:19180;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }" \
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p.out"
NGINX=${PIDS[-1]}
wait_url http://127.0.0.1:19180/
ROWS+=("$(measure "$NGINX" http://127.0.0.1:19180/ "nginx ($(nginx -v 2>&1 | sed 's/.*nginx\///'), one worker)")")

echo
echo "Instructions per proxied request: callgrind, wrk -t2 -c$CONNECTIONS -d${SECONDS_RUN}s, 2 backends"
echo
echo "| proxy | requests | instructions per request |"
echo "| --- | ---: | ---: |"
printf '%s\n' "${ROWS[@]}"
