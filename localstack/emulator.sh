#!/usr/bin/env bash
# AWS emulator harness for signpost's tests and demo: a pinned moto_server in
# its own virtualenv (see README.md here for why moto and not LocalStack).
#
#   emulator.sh install            create/refresh the venv (idempotent, fast when done)
#   emulator.sh bin                print the emulator executable: moto_server with lifecycle
#                                  hooks (moto_server_hooks here; installs moto if needed)
#   emulator.sh python             print the venv's python path (installs if needed)
#   emulator.sh start [--port N]   start moto in the background, print `export ...` lines
#   emulator.sh endpoint           print the running emulator's URL
#   emulator.sh reset              wipe all emulated state (POST /moto-api/reset)
#   emulator.sh stop               stop it and remove its state dir
#   emulator.sh seed ARGS...       run seed.py against it
#   emulator.sh backends ARGS...   run backends.py against it (foreground)
#
# Env: SIGNPOST_CACHE (default ~/.cache/signpost) holds moto-venv/;
#      SIGNPOST_STATE (default $SIGNPOST_CACHE/state) holds pid, endpoint, moto.log;
#      SIGNPOST_PYTHON (default python3) is the interpreter the venv is made from.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
VENV="$CACHE/moto-venv"
STATE_DIR="${SIGNPOST_STATE:-$CACHE/state}"
REQS="$HERE/requirements.txt"
PY="$VENV/bin/python"
# moto_server plus lifecycle hooks (lifecycle_hooks.py); same arguments as moto_server.
SERVER="$HERE/moto_server_hooks"

log() { echo "emulator: $*" >&2; }
die() { log "$*"; exit 1; }

# The venv is valid when it was built from exactly this requirements.txt with
# this interpreter; the stamp is written last, so a half-finished install never
# counts as done.
want_stamp() {
    { sha256sum "$REQS" | cut -d' ' -f1; "${SIGNPOST_PYTHON:-python3}" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1
}

install() {
    mkdir -p "$CACHE"
    local want; want="$(want_stamp)"
    [[ -x "$VENV/bin/moto_server" && "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" == "$want" ]] && return 0
    # Tests running in parallel may all call `bin` at once: one installs, the
    # others wait on the lock and then find the stamp in place.
    exec 9>"$CACHE/install.lock"
    flock 9
    if [[ ! -x "$VENV/bin/moto_server" || "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" != "$want" ]]; then
        log "installing moto into $VENV (about a minute)"
        rm -rf "$VENV"
        "${SIGNPOST_PYTHON:-python3}" -m venv "$VENV" >&2 \
            || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --no-input -q -r "$REQS" >&2
        echo "$want" >"$VENV/.signpost-stamp"
        log "installed moto $("$PY" -c 'import moto; print(moto.__version__)')"
    fi
    exec 9>&-
}

# Does something answer HTTP at $1? Any status counts (moto answers 200 on
# /moto-api/); only a refused/timed-out connection means "not up".
answers() {
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=1)
except urllib.error.HTTPError:
    pass
EOF
}

# Is the recorded pid still our emulator (and not a reused pid)? Its command
# line is the venv's python running moto_with_hooks.py.
our_pid() {
    local pid
    pid="$(cat "$STATE_DIR/pid" 2>/dev/null)" && grep -qs -e moto_with_hooks -e moto_server "/proc/$pid/cmdline" && echo "$pid"
}

# Prints the endpoint if our recorded moto is alive and answering, else fails.
running_endpoint() {
    local ep
    our_pid >/dev/null && ep="$(cat "$STATE_DIR/endpoint" 2>/dev/null)" && answers "$ep" && echo "$ep"
}

print_exports() {
    # AWS_REGION is what the Rust SDK reads; AWS_DEFAULT_REGION is boto3's.
    echo "export AWS_ENDPOINT_URL=$1 AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test"
}

start() {
    local port=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) port="$2"; shift 2 ;;
            --port=*) port="${1#*=}"; shift ;;
            *) die "start: unknown argument $1" ;;
        esac
    done
    install
    local ep
    if ep="$(running_endpoint)"; then print_exports "$ep"; return 0; fi
    # Never assume 5000/4566 are free: let the kernel hand out a free port
    # (small race between closing this socket and moto binding it; acceptable).
    # A given port is checked too, or the readiness poll below would take
    # whatever already listens there for our moto.
    local asked="${port:-0}"
    port="$("$PY" -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])' "$asked" 2>/dev/null)" \
        || die "port $asked on 127.0.0.1 is in use"
    ep="http://127.0.0.1:$port"
    mkdir -p "$STATE_DIR"
    # setsid + all fds redirected: the server outlives this script and does not
    # hold the stdout of `eval "$(emulator.sh start)"` open.
    setsid "$SERVER" -H 127.0.0.1 -p "$port" </dev/null >"$STATE_DIR/moto.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$STATE_DIR/pid"
    echo "$ep" >"$STATE_DIR/endpoint"
    local deadline=$((SECONDS + 30))
    until answers "$ep"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
            kill "$pid" 2>/dev/null || true
            tail -20 "$STATE_DIR/moto.log" >&2 || true
            rm -f "$STATE_DIR/pid" "$STATE_DIR/endpoint"
            die "moto_server did not come up on $ep (log: $STATE_DIR/moto.log)"
        fi
        sleep 0.2
    done
    log "moto_server pid $pid on $ep (log: $STATE_DIR/moto.log)"
    print_exports "$ep"
}

stop() {
    local pid
    if pid="$(our_pid)"; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped moto_server pid $pid"
    fi
    rm -rf "$STATE_DIR"
}

# seed/backends talk to the emulator started here; with none running they
# fall back to whatever AWS_ENDPOINT_URL already says (e.g. LocalStack Pro).
run_py() {
    local script="$1"; shift
    install
    local ep
    if ep="$(running_endpoint)"; then
        export AWS_ENDPOINT_URL="$ep"
    elif [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
        die "no emulator running (emulator.sh start) and AWS_ENDPOINT_URL unset"
    fi
    export AWS_REGION="${AWS_REGION:-us-east-1}" AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
    exec "$PY" "$HERE/$script" "$@"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    install)  install ;;
    bin)      install; echo "$SERVER" ;;
    python)   install; echo "$PY" ;;
    start)    start "$@" ;;
    endpoint) running_endpoint || die "not running" ;;
    reset)
        ep="$(running_endpoint)" || die "not running"
        "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/moto-api/reset", method="POST"), timeout=10)' "$ep"
        log "reset $ep" ;;
    stop)     stop ;;
    seed)     run_py seed.py "$@" ;;
    backends) run_py backends.py "$@" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
