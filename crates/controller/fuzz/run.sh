#!/usr/bin/env bash
# Fuzzes the controller's input parsers for a bounded time each,
# coverage-guided, on the stable toolchain: libFuzzer (the libfuzzer-sys
# crate) with the instrumentation flags `cargo fuzz` passes, as
# crates/router/fuzz/run.sh does. The build never compiles the AWS SDK
# (src/lib.rs pulls in the parser modules by path).
#
#   crates/controller/fuzz/run.sh [SECONDS] [TARGET...]   (default 60 s; all targets)
#
# Targets: sqs_body tags config push_lines ack xds_version (checks.rs says
# what each checks). New inputs go to corpus/new/<target>/ (ignored by git);
# a failing input is written to artifacts/<target>/ and the script exits
# non-zero after the other targets ran. libFuzzer's output is kept in
# logs/<target>.log; the last line per target sums it up. To fold what was
# found into the committed corpus, minimised:  MERGE=1 run.sh 0 [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sqs_body tags config push_lines ack xds_version)
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(cd ../../.. && pwd)/target}
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros, as cargo fuzz does.
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$host" "${bins[@]}"
failed=()
for t in "${targets[@]}"; do
    bin="$CARGO_TARGET_DIR/$host/release/$t"
    mkdir -p "corpus/$t" "corpus/new/$t" "artifacts/$t" logs
    if [ "${MERGE:-0}" = 1 ]; then
        # The committed corpus: the seeds and findings, by name, and the
        # fewest other inputs under 2 KB that cover what all of them cover.
        out=$(mktemp -d) small=$(mktemp -d)
        cp corpus/"$t"/seed-* "$out/"
        cp corpus/"$t"/finding-* "$out/" 2>/dev/null || true
        find "corpus/$t" "corpus/new/$t" -type f -size -2k ! -name 'seed-*' ! -name 'finding-*' \
            -exec cp {} "$small/" \;
        "$bin" -set_cover_merge=1 "$out" "$small" 2>"logs/$t.merge.log"
        chmod 755 "$out" && rm -rf "corpus/$t" && mv "$out" "corpus/$t" && rm -rf "$small"
        echo "$t: $(ls "corpus/$t" | wc -l) files in corpus/$t"
        continue
    fi
    # A dictionary-free run; -max_len covers the largest real bodies
    # (an SNS-wrapped EventBridge event is ~1.5 KB).
    if "$bin" -max_total_time="$seconds" -max_len=8192 -timeout=5 -rss_limit_mb=1024 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
        "corpus/new/$t" "corpus/$t" >"logs/$t.log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
    fi
    # libFuzzer's own count and time ("Done N runs in S second(s)"); a
    # failure stops the run early, at its last status line.
    done_line=$(grep -E '^Done [0-9]+ runs' "logs/$t.log" | tail -1 || true)
    if [ -n "$done_line" ]; then
        ran=$(echo "$done_line" | sed -E 's/^Done ([0-9]+) runs in ([0-9]+) .*/\1 execs in \2 s/')
    else
        ran="stopped after $(grep -oE '^#[0-9]+' "logs/$t.log" | tail -1 | tr -d '#') execs"
    fi
    cov=$(grep -oE 'cov: [0-9]+' "logs/$t.log" | tail -1 || true)
    echo "$t: $status, $ran, ${cov:-cov: ?} edges"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (see logs/ and artifacts/)" >&2
    exit 1
fi
