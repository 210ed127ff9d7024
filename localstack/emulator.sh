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

NAME=emulator
LABEL=moto_server
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SIGNPOST_CACHE:-$HOME/.cache/signpost}/moto-venv"
STATE_DIR="${SIGNPOST_STATE:-${SIGNPOST_CACHE:-$HOME/.cache/signpost}/state}"
REQS="$DIR/requirements.txt"
# moto_server plus lifecycle hooks (lifecycle_hooks.py); same arguments as moto_server.
SERVER="$DIR/moto_server_hooks"
LOG=moto.log
INSTALLED="$VENV/bin/moto_server"
INSTALL_TIME="about a minute"
# Its command line is the venv's python running moto_with_hooks.py.
PID_PATTERNS="moto_with_hooks moto_server"
START_TIMEOUT=30
STOP_TENTHS=50

# Does something answer HTTP at $1? Any status counts (moto answers 200 on
# /moto-api/); only a refused/timed-out connection means "not up".
answers() {
    "$PY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=1)
except urllib.error.HTTPError:
    pass
PYEOF
}

version() { echo "moto $("$PY" -c 'import moto; print(moto.__version__)')"; }

launch() { exec setsid "$SERVER" -H 127.0.0.1 -p "$1"; }

# shellcheck source=server.sh
source "$DIR/server.sh"

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
    exec "$PY" "$DIR/$script" "$@"
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
    stop)     stop_server; rm -rf "$STATE_DIR" ;;
    seed)     run_py seed.py "$@" ;;
    backends) run_py backends.py "$@" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
