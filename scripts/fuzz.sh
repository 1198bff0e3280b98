#!/bin/sh
# Runs hubnat's fuzz targets (the cargo-fuzz crate in fuzz/) for a bounded time each and prints
# one summary line per target. NOT run in CI: it needs nightly and cargo-fuzz, and its worth
# is in long runs. Run it by hand before a release, or after changing a parser.
#
#   scripts/fuzz.sh                     every target, FUZZ_SECONDS each
#   scripts/fuzz.sh frame dhcp          the targets named
#   FUZZ_SECONDS=600 scripts/fuzz.sh    ten minutes each
#
# Targets (fuzz/fuzz_targets/, each says what it feeds where):
#   frame        any bytes as one frame into VirtualHost::handle_frame
#   frames       arbitrary sequences of frames, host-socket events, clock steps, settings
#                changes, policy verdicts and restarts against one host on a fake clock
#   dhcp         DHCP messages from several clients through the whole core
#   dns_answer   upstream DNS answers into the forwarder after a real query
#   hub_framing  a hub peer's byte stream through the socket's frame splitter
#   config       any text as the configuration file through Config::load
#
# Environment:
#   FUZZ_SECONDS  seconds per target (default 60)
#   FUZZ_TIMEOUT  seconds one input may take before it counts as a hang (default 10)
#   FUZZ_ARGS     more libFuzzer arguments, e.g. "-jobs=2 -workers=2" (default: one process)
#
# Requirements: `rustup toolchain install nightly` and `cargo install cargo-fuzz --locked`.
# The first build compiles every dependency with coverage instrumentation (long: wasmtime).
#
# Corpora: the seeds in fuzz/corpus/<target>/ (from real captures: fuzz/README.md) are read,
# never written; what a run discovers goes to fuzz/target/corpus/<target>/ (not committed), which
# the next run starts from. A crash is written to fuzz/artifacts/<target>/ and makes the script
# exit 1 after the other targets ran; reproduce it with
#   cd fuzz && cargo +nightly fuzz run $BUILD_FLAGS <target> artifacts/<target>/<file>
# minimise it with `cargo +nightly fuzz tmin $BUILD_FLAGS <target> <file>`, fix it, and add the
# input as a regression test in the crate that owns the code (see README, Fuzzing).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT/fuzz"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
TIMEOUT=${FUZZ_TIMEOUT:-10}
EXTRA=${FUZZ_ARGS:-}
# Safe Rust: panics are what is looked for, so no address sanitizer (faster); debug assertions
# and overflow checks stay on (cargo-fuzz's default).
BUILD_FLAGS="-s none --codegen-units 16"
ALL="frame frames dhcp dns_answer hub_framing config"
TARGETS=${*:-$ALL}

# Longest input per target: a jumbo frame, a hub peer's two largest frames, a UDP datagram.
max_len() {
    case $1 in
        frame) echo 9100 ;;
        frames) echo 16384 ;;
        dns_answer) echo 65527 ;;
        hub_framing) echo 140000 ;;
        *) echo 8192 ;;
    esac
}

for t in $TARGETS; do
    case " $ALL " in *" $t "*) ;; *) echo "unknown target $t (targets: $ALL)" >&2; exit 2 ;; esac
done

# shellcheck disable=SC2086
cargo +nightly fuzz build $BUILD_FLAGS

failed=""
LOGS=$ROOT/fuzz/target/logs
mkdir -p "$LOGS"
for t in $TARGETS; do
    work="$ROOT/fuzz/target/corpus/$t"
    mkdir -p "$work" "$ROOT/fuzz/corpus/$t" "$ROOT/fuzz/artifacts/$t"
    log="$LOGS/$t.log"
    set +e
    # shellcheck disable=SC2086
    cargo +nightly fuzz run $BUILD_FLAGS "$t" "$work" "$ROOT/fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT" -max_len="$(max_len "$t")" \
        -print_final_stats=1 $EXTRA >"$log" 2>&1
    rc=$?
    set -e
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -n "$runs" ] || runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -1)
    cov0=$(sed -n 's/.*INITED cov: \([0-9]*\).*/\1/p' "$log" | head -1)
    cov1=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' "$log" | tail -1)
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' "$log" | tail -1)
    new=$(( ${cov1:-0} - ${cov0:-0} ))
    if [ $rc -eq 0 ]; then
        verdict="no crash"
    else
        unit=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        verdict="CRASH (exit $rc): ${unit:-see $log}"
        failed="$failed $t"
    fi
    printf '%-12s %6ss  runs %-10s cov %s (+%s new)  corpus %-6s %s\n' "$t" \
        "$SECONDS_PER_TARGET" "${runs:-?}" "${cov1:-?}" "$new" "${corp:-?}" "$verdict"
done

if [ -n "$failed" ]; then
    echo "crashed:$failed (logs in $LOGS)" >&2
    exit 1
fi
