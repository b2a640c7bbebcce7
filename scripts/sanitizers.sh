#!/usr/bin/env bash
# Runs the host test suite under AddressSanitizer and ThreadSanitizer (separate
# build folders, .build-asan and .build-tsan). Leak detection is off: Swift's
# runtime and this project's long-lived threads keep allocations until exit,
# which LeakSanitizer reports from every child process; memory errors (overflow,
# use after free) and data races still fail the run, but for the reference
# guest's own writes racing precopy's reads by design (scripts/tsan-suppressions.txt).
#
# Usage: bash scripts/sanitizers.sh [address] [thread]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
postcopy_build_deps
KINDS=${*:-address thread}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1 suppressions=$PWD/scripts/tsan-suppressions.txt}
for kind in $KINDS; do
    dir=.build-${kind:0:1}san
    echo "== $kind sanitizer: building in $dir" >&2
    mkdir -p "$dir"
    swift build --build-tests --sanitize="$kind" --scratch-path "$dir" > "$dir/sanitizer-build.log" 2>&1 \
        || { tail -40 "$dir/sanitizer-build.log" >&2; exit 1; }
    echo "== $kind sanitizer: testing" >&2
    timeout --signal=KILL 1800 swift test --skip-build --sanitize="$kind" --scratch-path "$dir" 2>&1 | tee "$dir/sanitizer-test.log" \
        | grep -E '✘|Test run with|SUMMARY|WARNING: ThreadSanitizer|ERROR: AddressSanitizer' || true
    grep -q 'Test run with .* passed' "$dir/sanitizer-test.log" || { echo "$kind sanitizer run failed (log: $dir/sanitizer-test.log)" >&2; exit 1; }
done
