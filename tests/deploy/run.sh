#!/usr/bin/env bash
# Runs the deploy tests (IAM policy under an IAM-enforcing emulator, policy
# lint, Helm chart render/lint/schema/manifest validation, setup script).
#
#   tests/deploy/run.sh [PYTEST ARGS...]
#
# Creates, once, a virtualenv under ${SIGNPOST_CACHE:-~/.cache/signpost}/deploy-venv
# from requirements.txt here (rebuilt when that file or the interpreter
# changes), then runs pytest -q on this folder. pytest's exit code is ours.
# Env: SIGNPOST_BIN (default target/debug/signpost, built with `cargo build`
# when missing), SIGNPOST_PYTHON (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
VENV="$CACHE/deploy-venv"
REQS="$HERE/requirements.txt"

want_stamp() {
    { sha256sum "$REQS" | cut -d' ' -f1; "${SIGNPOST_PYTHON:-python3}" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1
}

install() {
    mkdir -p "$CACHE"
    local want; want="$(want_stamp)"
    [[ -x "$VENV/bin/pytest" && "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" == "$want" ]] && return 0
    exec 9>"$CACHE/deploy-install.lock"
    flock 9
    if [[ ! -x "$VENV/bin/pytest" || "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" != "$want" ]]; then
        echo "deploy tests: installing tools into $VENV (about a minute)" >&2
        rm -rf "$VENV"
        "${SIGNPOST_PYTHON:-python3}" -m venv "$VENV" >&2 \
            || { echo "python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --no-input -q -r "$REQS" >&2
        echo "$want" >"$VENV/.signpost-stamp"
    fi
    exec 9>&-
}

install
cd "$HERE"
# -p no:cacheprovider: no .pytest_cache written into the source tree.
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" "$HERE"
