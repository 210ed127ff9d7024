# Sourced by emulator.sh (moto) and localstack.sh (LocalStack): a pinned
# Python server in its own virtualenv, started in the background on a free
# loopback port, with its pid and endpoint under a state directory. The
# sourcing script sets, before sourcing:
#   NAME           log prefix                  LABEL       the server's name in messages
#   VENV REQS      the venv and its pins       SERVER      the executable started
#   STATE_DIR      pid, endpoint, $LOG         LOG         the server's log file name
#   INSTALLED      the file whose presence (with the stamp) means installed
#   INSTALL_TIME   how long an install takes, said while it runs
#   PID_PATTERNS   words one of which is in our server's command line
#   START_TIMEOUT  seconds `start` waits for it   STOP_TENTHS  tenths `stop` waits
# and defines: answers URL (is it up?), version (printed after an install),
# launch PORT (exec the server in the foreground on PORT).
# shellcheck shell=bash

CACHE="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
PYTHON="${SIGNPOST_PYTHON:-python3}"
PY="$VENV/bin/python"

log() { echo "$NAME: $*" >&2; }
die() { log "$*"; exit 1; }

# The venv is valid when it was built from exactly these pins with this
# interpreter; the stamp is written last, so a half-finished install never
# counts as done.
want_stamp() {
    { sha256sum "$REQS" | cut -d' ' -f1; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1
}

installed() {
    [[ -x "$INSTALLED" && "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" == "$1" ]]
}

install() {
    mkdir -p "$CACHE"
    local want; want="$(want_stamp)"
    installed "$want" && return 0
    # Tests running in parallel may all call `bin` at once: one installs, the
    # others wait on the lock and then find the stamp in place.
    exec 9>"$CACHE/$NAME-install.lock"
    flock 9
    if ! installed "$want"; then
        log "installing $LABEL into $VENV ($INSTALL_TIME)"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" >&2 \
            || die "$PYTHON -m venv failed (on Debian: apt-get install python3-venv)"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --no-input -q -r "$REQS" >&2 \
            || die "pip could not install $REQS into $VENV (the pins are checked with Python 3.11)"
        echo "$want" >"$VENV/.signpost-stamp"
        log "installed $(version)"
    fi
    exec 9>&-
}

# Is the recorded pid still our server (and not a reused pid)?
our_pid() {
    local pid word
    pid="$(cat "$STATE_DIR/pid" 2>/dev/null)" || return 1
    for word in $PID_PATTERNS; do
        grep -qs "$word" "/proc/$pid/cmdline" && { echo "$pid"; return 0; }
    done
    return 1
}

# Prints the endpoint if our recorded server is alive and answering, else fails.
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
    # (small race between closing this socket and the server binding it;
    # acceptable). A given port is checked too, or the readiness poll below
    # would take whatever already listens there for ours. SO_REUSEADDR as the
    # servers have it: a port that `reset` just closed (TIME_WAIT) is free.
    local asked="${port:-0}"
    port="$("$PY" -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); print(s.getsockname()[1])' "$asked" 2>/dev/null)" \
        || die "port $asked on 127.0.0.1 is in use"
    ep="http://127.0.0.1:$port"
    mkdir -p "$STATE_DIR"
    # setsid + all fds redirected: the server outlives this script and does not
    # hold the stdout of `eval "$(... start)"` open.
    (launch "$port") </dev/null >"$STATE_DIR/$LOG" 2>&1 &
    local pid=$!
    echo "$pid" >"$STATE_DIR/pid"
    echo "$ep" >"$STATE_DIR/endpoint"
    local deadline=$((SECONDS + START_TIMEOUT))
    until answers "$ep"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
            kill -9 "$pid" 2>/dev/null || true
            tail -20 "$STATE_DIR/$LOG" >&2 || true
            rm -f "$STATE_DIR/pid" "$STATE_DIR/endpoint"
            die "$LABEL did not come up on $ep (log: $STATE_DIR/$LOG)"
        fi
        sleep 0.2
    done
    log "$LABEL pid $pid on $ep (log: $STATE_DIR/$LOG)"
    print_exports "$ep"
}

stop_server() {
    local pid
    if pid="$(our_pid)"; then
        kill "$pid"
        for _ in $(seq "$STOP_TENTHS"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $LABEL pid $pid"
    fi
}
