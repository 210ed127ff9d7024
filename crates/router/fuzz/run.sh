#!/usr/bin/env bash
# Fuzzes the router's HTTP/1.1 codec for a bounded time, coverage-guided, on
# the stable toolchain: libFuzzer (the libfuzzer-sys crate) with the
# instrumentation flags `cargo fuzz` passes, which are all stable codegen
# options. No sanitizer: the code under test is safe Rust, and the check
# (framing_check.rs) panics on every property it holds.
#
#   crates/router/fuzz/run.sh [SECONDS]        (default 60)
#
# New inputs go to corpus/new/ (ignored by git); a failing input is written
# to artifacts/ and the script exits non-zero. To fold what was found into
# the committed corpus, minimised:  MERGE=1 crates/router/fuzz/run.sh 0
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
target=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd ../../.. && pwd)/target}
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros, as cargo fuzz does.
cargo build --release --locked --target "$target" --bin framing
bin="$CARGO_TARGET_DIR/$target/release/framing"
mkdir -p corpus/new artifacts
if [ "${MERGE:-0}" = 1 ]; then
    # The committed corpus: the seeds and findings, by name, and the fewest
    # other inputs under 400 bytes that cover what those inputs cover
    # (longer ones added 2 edges of 1,367 and tripled the size).
    out=$(mktemp -d) small=$(mktemp -d)
    cp corpus/framing/seed-* corpus/framing/finding-* "$out/"
    find corpus/framing corpus/new -type f -size -400c ! -name 'seed-*' ! -name 'finding-*' \
        -exec cp {} "$small/" \;
    "$bin" -set_cover_merge=1 "$out" "$small"
    chmod 755 "$out" && rm -rf corpus/framing && mv "$out" corpus/framing && rm -rf "$small"
    exit 0
fi
"$bin" -max_total_time="$seconds" -max_len=4096 -timeout=5 \
    -artifact_prefix=artifacts/ -print_final_stats=1 \
    corpus/new corpus/framing
