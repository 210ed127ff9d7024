#!/usr/bin/env bash
# Runs every test signpost has: Rust unit tests, the integration tests against
# the AWS emulators (moto, installed once into a cached virtualenv by
# localstack/emulator.sh, and for SQS/EventBridge LocalStack, likewise by
# localstack/localstack.sh), the emulator's own tests, and the deployment
# tests (chart, IAM).
set -euo pipefail
cd "$(dirname "$0")/.."

# Install the pinned emulator once, up front, rather than from inside a test.
SIGNPOST_MOTO_SERVER="$(bash localstack/emulator.sh bin)"
SIGNPOST_LOCALSTACK_SERVER="$(bash localstack/localstack.sh bin)"
export SIGNPOST_MOTO_SERVER SIGNPOST_LOCALSTACK_SERVER
# Real Envoy and grpcio for the xDS tests, likewise (tests/xds/env.sh).
SIGNPOST_ENVOY="$(bash tests/xds/env.sh envoy)"
SIGNPOST_XDS_PYTHON="$(bash tests/xds/env.sh python)"
export SIGNPOST_ENVOY SIGNPOST_XDS_PYTHON
# Real HAProxy and nginx for the agents' tests: Debian packages, installed
# if missing (tests/proxies/env.sh).
SIGNPOST_HAPROXY="$(bash tests/proxies/env.sh haproxy)"
SIGNPOST_NGINX="$(bash tests/proxies/env.sh nginx)"
export SIGNPOST_HAPROXY SIGNPOST_NGINX

# --no-fail-fast: one run shows every failing test binary, not the first.
cargo test --workspace --locked --no-fail-fast

# The emulator's lifecycle-hook extension, tested on its own.
localstack/tests/run.sh

tests/deploy/run.sh
