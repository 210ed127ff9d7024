#!/usr/bin/env bash
# Tests of the emulator harness itself (lifecycle hooks on moto), run with the
# pinned venv's python. Extra arguments go to pytest (e.g. -k heartbeat).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$(bash "$HERE/../emulator.sh" python)"
# pytest is a test-only dependency: installed into the same venv from its own
# pinned list, only when missing or at another version (idempotent).
want="$(sed -n 's/^pytest==//p' "$HERE/requirements.txt")"
if [[ "$("$PY" -c 'import pytest; print(pytest.__version__)' 2>/dev/null)" != "$want" ]]; then
    echo "tests/run.sh: installing $HERE/requirements.txt into the emulator venv" >&2
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --no-input -q -r "$HERE/requirements.txt" >&2
fi
cd "$HERE"
exec "$PY" -m pytest -q -p no:cacheprovider "$@" test_lifecycle_hooks.py
