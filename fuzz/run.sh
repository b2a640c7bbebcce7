#!/usr/bin/env bash
# Builds the libFuzzer targets (swiftc -sanitize=fuzzer,address, each with the
# exact sources it tests) and runs each over a scratch copy of its seed corpus
# (fuzz/corpus/TARGET, made by the encoders: FUZZ_WRITE_SEEDS=DIR fuzz-TARGET).
#
# Usage: bash fuzz/run.sh [RUNS] [TARGET...]
#   RUNS     inputs per target (default 1000000; CI runs 100000)
#   TARGET   wire (frame decoder), handoff (VMM JSON, memory files, smaps), apf (shared APF rings);
#            default all
# Crashes are written to .build-fuzz/crash-* and make this script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
RUNS=${1:-1000000}
[ $# -gt 0 ] && shift
TARGETS=${*:-wire handoff apf}
OUT=.build-fuzz
mkdir -p "$OUT"

build() {
    local srcs
    case $1 in
        wire) srcs=(Sources/PostcopyWire/*.swift fuzz/wire.swift fuzz/common.swift) ;;
        handoff)
            # HandoffMessage.swift needs only SystemError from PostcopyCore: stubbed.
            # SharedMemoryCheck.swift (no system calls) needs only HandoffMessage.swift and FileID.swift.
            for f in HandoffMessage SharedMemoryCheck FileID; do
                sed '/^import PostcopyCore$/d' Sources/PostcopyHandoff/$f.swift > "$OUT/$f.swift"
            done
            srcs=("$OUT/HandoffMessage.swift" "$OUT/SharedMemoryCheck.swift" "$OUT/FileID.swift" fuzz/stubs-handoff.swift fuzz/handoff.swift fuzz/handoff-inputs.swift fuzz/common.swift) ;;
        apf) srcs=(Sources/PostcopyHandoff/APFRing.swift fuzz/apf.swift fuzz/common.swift) ;;
        *) echo "unknown fuzz target $1 (wire, handoff, apf)" >&2; exit 64 ;;
    esac
    # (ld.gold warns about every ASan helper symbol: kept in the build log)
    swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name "Fuzz$1" "${srcs[@]}" -o "$OUT/fuzz-$1" \
        > "$OUT/build-$1.log" 2>&1 || { cat "$OUT/build-$1.log" >&2; exit 1; }
}

status=0
for t in $TARGETS; do
    echo "fuzz $t: building" >&2
    build "$t"
    corpus="$OUT/corpus-$t"
    rm -rf "$corpus" && mkdir -p "$corpus" && cp fuzz/corpus/"$t"/* "$corpus"/
    start=$(date +%s)
    if "$OUT/fuzz-$t" -runs="$RUNS" -artifact_prefix="$OUT/crash-$t-" -print_final_stats=1 "$corpus" > "$OUT/fuzz-$t.log" 2>&1; then
        done_line=$(grep -E '^Done [0-9]+ runs' "$OUT/fuzz-$t.log" | tail -1)
        cov=$(grep -E '^#[0-9]+' "$OUT/fuzz-$t.log" | tail -1 | grep -oE 'cov: [0-9]+' || true)
        echo "fuzz $t: $done_line ($cov, $(ls "$corpus" | wc -l) corpus inputs, $(( $(date +%s) - start )) s wall)"
    else
        echo "fuzz $t: FAILED, see $OUT/fuzz-$t.log and $OUT/crash-$t-*" >&2
        grep -E 'ERROR|Fatal|precondition|SUMMARY' "$OUT/fuzz-$t.log" | head -5 >&2
        status=1
    fi
done
exit $status
