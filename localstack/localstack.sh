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

NAME=localstack
LABEL=LocalStack
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SIGNPOST_CACHE:-$HOME/.cache/signpost}/localstack-venv"
STATE_DIR="${SIGNPOST_STATE:-${SIGNPOST_CACHE:-$HOME/.cache/signpost}/localstack-state}"
REQS="$DIR/localstack-requirements.txt"
SERVER="$DIR/localstack_server"
LOG=localstack.log
INSTALLED="$VENV/bin/python"
INSTALL_TIME="about two minutes; 4.14 and later need Python 3.12"
PID_PATTERNS="localstack.runtime.main"
START_TIMEOUT="${SIGNPOST_LOCALSTACK_START_TIMEOUT:-60}"
# Its shutdown takes a few seconds; past 10 it is not coming.
STOP_TENTHS=100

# Is LocalStack up at $1? Its health endpoint answers once the gateway runs.
answers() {
    "$PY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/_localstack/health", timeout=1)
PYEOF
}

version() { echo "localstack-core $("$PY" -c 'import importlib.metadata as m; print(m.version("localstack-core"))')"; }

# Its own files start empty: the free edition has no reset call.
launch() {
    rm -rf "$STATE_DIR/files"
    mkdir -p "$STATE_DIR/files"
    exec setsid "$SERVER" -p "$1" -d "$STATE_DIR/files"
}

# shellcheck source=server.sh
source "$DIR/server.sh"

cmd="${1:-}"; shift || true
case "$cmd" in
    install)  install ;;
    bin)      install; echo "$SERVER" ;;
    python)   install; echo "$PY" ;;
    start)    start "$@" ;;
    endpoint) running_endpoint || die "not running" ;;
    reset)
        ep="$(running_endpoint)" || die "not running"
        stop_server
        start --port "${ep##*:}" >/dev/null
        log "reset $ep" ;;
    stop)     stop_server; rm -rf "$STATE_DIR" ;;
    *) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
