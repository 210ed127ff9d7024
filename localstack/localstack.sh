#!/usr/bin/env bash
# LocalStack harness for signpost's SQS/EventBridge/IAM tests: the free
# edition, pinned, in its own virtualenv, run on the host (no Docker). The
# sibling of emulator.sh (moto), with the same subcommands; see README.md here
# for which service runs on which emulator and why.
#
#   localstack.sh install            create/refresh the venv (idempotent, fast when done)
#   localstack.sh bin                print the server executable (localstack_server here:
#                                    `-p PORT -d STATE_DIR`); installs LocalStack if needed
#   localstack.sh python             print the venv's python path (installs if needed)
#   localstack.sh start [--port N]   start LocalStack in the background, print `export ...` lines
#   localstack.sh endpoint           print the running LocalStack's URL
#   localstack.sh reset              wipe all its state (a restart on the same port: the
#                                    free edition has no reset call)
#   localstack.sh stop               stop it and remove its state dir
#
# Env: SIGNPOST_CACHE (default ~/.cache/signpost) holds localstack-venv/;
#      SIGNPOST_STATE (default $SIGNPOST_CACHE/localstack-state) holds pid, endpoint,
#      localstack.log and LocalStack's own files;
#      SIGNPOST_PYTHON (default python3; the pins are checked with 3.11) makes the venv;
#      SIGNPOST_LOCALSTACK_START_TIMEOUT (default 60) seconds `start` waits for it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
VENV="$CACHE/localstack-venv"
STATE_DIR="${SIGNPOST_STATE:-$CACHE/localstack-state}"
REQS="$HERE/localstack-requirements.txt"
PY="$VENV/bin/python"
SERVER="$HERE/localstack_server"
PYTHON="${SIGNPOST_PYTHON:-python3}"

log() { echo "localstack: $*" >&2; }
die() { log "$*"; exit 1; }

# As in emulator.sh: the venv counts only with a stamp of exactly this
# requirements file and interpreter, written last.
want_stamp() {
    { sha256sum "$REQS" | cut -d' ' -f1; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1
}

install() {
    mkdir -p "$CACHE"
    local want; want="$(want_stamp)"
    [[ -x "$PY" && "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" == "$want" ]] && return 0
    exec 9>"$CACHE/localstack-install.lock"
    flock 9
    if [[ ! -x "$PY" || "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" != "$want" ]]; then
        log "installing LocalStack into $VENV (about two minutes)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" >&2 \
            || die "$PYTHON -m venv failed (on Debian: apt-get install python3-venv)"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --no-input -q -r "$REQS" >&2 \
            || die "pip could not install $REQS into $VENV (pinned and checked with Python 3.11; 4.14 and later need 3.12)"
        echo "$want" >"$VENV/.signpost-stamp"
        log "installed localstack-core $("$PY" -c 'import importlib.metadata as m; print(m.version("localstack-core"))')"
    fi
    exec 9>&-
}

# Is LocalStack up at $1? Its health endpoint answers once the gateway runs.
answers() {
    "$PY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/_localstack/health", timeout=1)
PYEOF
}

our_pid() {
    local pid
    pid="$(cat "$STATE_DIR/pid" 2>/dev/null)" && grep -qs localstack.runtime.main "/proc/$pid/cmdline" && echo "$pid"
}

running_endpoint() {
    local ep
    our_pid >/dev/null && ep="$(cat "$STATE_DIR/endpoint" 2>/dev/null)" && answers "$ep" && echo "$ep"
}

print_exports() {
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
    local asked="${port:-0}"
    # SO_REUSEADDR as LocalStack's server has it: a port that `reset` just
    # closed (TIME_WAIT) is free for it.
    port="$("$PY" -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])' "$asked" 2>/dev/null)" \
        || die "port $asked on 127.0.0.1 is in use"
    ep="http://127.0.0.1:$port"
    rm -rf "$STATE_DIR/files"
    mkdir -p "$STATE_DIR/files"
    setsid "$SERVER" -p "$port" -d "$STATE_DIR/files" </dev/null >"$STATE_DIR/localstack.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$STATE_DIR/pid"
    echo "$ep" >"$STATE_DIR/endpoint"
    local deadline=$((SECONDS + ${SIGNPOST_LOCALSTACK_START_TIMEOUT:-60}))
    until answers "$ep"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
            kill -9 "$pid" 2>/dev/null || true
            tail -20 "$STATE_DIR/localstack.log" >&2 || true
            rm -f "$STATE_DIR/pid" "$STATE_DIR/endpoint"
            die "LocalStack did not come up on $ep (log: $STATE_DIR/localstack.log)"
        fi
        sleep 0.2
    done
    log "LocalStack pid $pid on $ep (log: $STATE_DIR/localstack.log)"
    print_exports "$ep"
}

stop_it() {
    local pid
    if pid="$(our_pid)"; then
        kill "$pid"
        # Its shutdown takes a few seconds; past 10 it is not coming.
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped LocalStack pid $pid"
    fi
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
        stop_it
        start --port "${ep##*:}" >/dev/null
        log "reset $ep" ;;
    stop)     stop_it; rm -rf "$STATE_DIR" ;;
    *) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
