# Shared by the bench scripts. bench_migrate (bench/run.sh, bench/rdma.sh) needs B
# (the postcopy binary), OUT (results folder) and PORT; sets SRC_PID while a
# source runs (for traps). bench_binaries picks the binaries.

# bench_migrate NAME ADDR TRANSPORT MEMORY DEST-ARGS...: one source and one
# destination; keeps the destination's JSON report and the source's.
bench_migrate() {
    local name=$1 addr=$2 transport=$3 mem=$4; shift 4
    "$B" source --memory "$mem" --listen "$addr:$PORT" --transport "$transport" --json > "$OUT/.src.$name" &
    SRC_PID=$!
    for _ in $(seq 300); do grep -q '"listening"' "$OUT/.src.$name" 2>/dev/null && break; sleep 0.1; done
    "$B" dest --connect "$addr:$PORT" --transport "$transport" --json "$@" > "$OUT/dest-$name.json"
    wait "$SRC_PID"; SRC_PID=
    tail -n +2 "$OUT/.src.$name" > "$OUT/source-$name.json"
    rm -f "$OUT/.src.$name"
    echo "  $name done" >&2
}

# bench_binaries: sets B and BENCH (postcopy and postcopy-bench): those next to
# POSTCOPY_BIN when it is set, else this tree's, built in release mode.
bench_binaries() {
    if [ -n "${POSTCOPY_BIN:-}" ]; then
        B=$POSTCOPY_BIN
        BENCH=$(dirname "$B")/postcopy-bench
    else
        swift build -c release --product postcopy >&2
        swift build -c release --product postcopy-bench >&2
        B=.build/release/postcopy
        BENCH=.build/release/postcopy-bench
    fi
}
