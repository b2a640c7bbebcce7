#!/usr/bin/env bash
# Hybrid (precopy → postcopy) against pure postcopy, same script, same machine:
#   1. zipf guest with a written hot set (--write-percent 1), 1 GiB: demand faults,
#      vCPU stall and the guest's first 100 ms at the destination, hybrid vs postcopy;
#   2. a guest writing random pages (random, --write-percent 100), 1 GiB:
#      total migration time ("migrate" to every page in) of --precopy auto
#      against pure postcopy, alternated, and what auto decided;
#   3. integrity: INTEGRITY_RUNS consecutive hybrid migrations of mixed
#      workloads, sizes and policies, each checked page by page against the
#      source's RAM at the pause (and every key-value checksum);
#   4. downtime at DOWNTIME_SIZES, hybrid and pure postcopy (zipf guest), with
#      its breakdown (source stop, device state delivered, restore; the final
#      dirty set's arrival, which is not part of it);
#   1b. (part "thp", not in the default PARTS: it changes a host setting) part 1
#      again with shared memory in huge folios: shmem_enabled set to advise for
#      the run and restored after (needs root); results in hybrid-zipf-thp.json;
#   5. the four modes side by side (postcopy, hybrid, pure precopy,
#      stop-and-copy) for the kv, zipf and random workloads (2 % writes), 1 GiB,
#      with the throughput plot (0 while a guest is paused).
# Results: $OUT/hybrid-*.json (postcopy-bench documents), $OUT/hybrid-integrity.txt,
# $OUT/hybrid-downtime.txt and $OUT/hybrid-modes/*.svg.
#
# Usage: bash bench/hybrid.sh              (about 20 minutes with 8G in the downtime series)
# Env:   PARTS ("zipf writer integrity downtime modes"; also "thp")  REPEAT (3)  WRITER_REPEAT (5)
#        INTEGRITY_RUNS (20)  INTEGRITY_SIZES ("64M 256M 1G")  DOWNTIME_SIZES (1G,4G,8G)
#        OUT (bench/latest)  POSTCOPY_BIN (binaries to use instead of building release ones)
# CI runs a reduced form (scripts/test.sh): PARTS=integrity INTEGRITY_RUNS=3 INTEGRITY_SIZES="32M 64M"
# with the debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-zipf writer integrity downtime modes}
REPEAT=${REPEAT:-3}
WRITER_REPEAT=${WRITER_REPEAT:-5}
INTEGRITY_RUNS=${INTEGRITY_RUNS:-20}
INTEGRITY_SIZES=${INTEGRITY_SIZES:-64M 256M 1G}
DOWNTIME_SIZES=${DOWNTIME_SIZES:-1G,4G,8G}
OUT=${OUT:-bench/latest}
mkdir -p "$OUT"
source scripts/lib.sh
source bench/lib.sh
bench_binaries
has() { [[ " $PARTS " == *" $1 "* ]]; }
# One migration's JSON in, one line out; exit 1 unless every check held.
CHECK=$(mktemp)
trap 'rm -f "$CHECK"' EXIT
cat > "$CHECK" <<'PY'
import json, sys
d = json.load(sys.stdin)
i = d["integrity"]
sp = d.get("source_precopy", {})
ok = d["ok"] and i.get("pages_mismatched") == 0 and i.get("kv_slots_failed", 0) == 0
print("%s %s %d MiB precopy %s: %d passes, final set %s pages, %s pages verified, %s differ, %s kv checksums, downtime %.2f ms (%s)" % (
    "OK" if ok else "FAILED", d["workload"], d["memory_bytes"] >> 20, d["precopy"], len(sp.get("passes", [])), sp.get("final_dirty_pages"),
    i.get("pages_verified"), i.get("pages_mismatched"), i.get("kv_slots_verified", 0), d["downtime_ns"] / 1e6, d["pause_reason"]))
sys.exit(0 if ok else 1)
PY

if has zipf; then
    echo "== 1. zipf guest, 1 % writes, 1 GiB: hybrid vs postcopy, $REPEAT runs each" >&2
    $BENCH --sizes 1G --workloads zipf --write-percent 1 --modes postcopy,hybrid --repeat "$REPEAT" \
        --stream-write-sizes 512K --output "$OUT/hybrid-zipf.json" | grep -E "^modes side|^  [a-z-]+:|^  hybrid total|^  demand faults|^tcp"
fi
if has thp; then
    echo "== 1b. as 1, with shared memory in huge folios (shmem_enabled set to advise for this part)" >&2
    with_shmem_thp advise $BENCH --sizes 1G --workloads zipf --write-percent 1 --modes postcopy,hybrid --repeat "$REPEAT" \
        --stream-write-sizes 512K --output "$OUT/hybrid-zipf-thp.json" > "$OUT/.hybrid-thp.out"
    grep -E "^modes side|^  [a-z-]+:|^  hybrid total|^  demand faults|^tcp" "$OUT/.hybrid-thp.out"
    rm -f "$OUT/.hybrid-thp.out"
fi
if has writer; then
    echo "== 2. random writer (every operation writes a random page), 1 GiB: --precopy auto vs postcopy, $WRITER_REPEAT runs each" >&2
    $BENCH --sizes 1G --workloads random --write-percent 100 --modes postcopy,hybrid --repeat "$WRITER_REPEAT" \
        --stream-write-sizes 512K --output "$OUT/hybrid-writer.json" | grep -E "^modes side|^  [a-z-]+:|^  hybrid total|^  demand faults|^tcp"
    python3 - "$OUT/hybrid-writer.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for s in d["hybrid_summary"]:
    print("auto's decisions:", "; ".join(sorted(set(s["hybrid"]["decisions"]))))
PY
fi
if has integrity; then
    echo "== 3. integrity: $INTEGRITY_RUNS consecutive hybrid migrations (sizes: $INTEGRITY_SIZES)" >&2
    read -r -a sizes <<< "$INTEGRITY_SIZES"
    workloads=(kv zipf random)
    writes=(10 2 20)
    policies=(auto 2 4)
    : > "$OUT/hybrid-integrity.txt"
    failed=0
    for i in $(seq 1 "$INTEGRITY_RUNS"); do
        w=${workloads[$(( i % 3 ))]}; wp=${writes[$(( i % 3 ))]}; p=${policies[$(( (i / 3) % 3 ))]}; s=${sizes[$(( i % ${#sizes[@]} ))]}
        if line=$($B migrate --size "$s" --workload "$w" --write-percent "$wp" --precopy "$p" --before 1 --after 1 --json 2>"$OUT/.hybrid-integrity.err" \
            | python3 "$CHECK"); then
            echo "run $i: $line" | tee -a "$OUT/hybrid-integrity.txt"
        else
            echo "run $i: ${line:-FAILED $w $s $p}: $(tail -3 "$OUT/.hybrid-integrity.err")" | tee -a "$OUT/hybrid-integrity.txt"
            failed=$((failed + 1))
        fi
    done
    rm -f "$OUT/.hybrid-integrity.err"
    echo "integrity: $((INTEGRITY_RUNS - failed)) of $INTEGRITY_RUNS hybrid migrations verified" | tee -a "$OUT/hybrid-integrity.txt"
    [ "$failed" -eq 0 ] || exit 1
fi
if has downtime; then
    echo "== 4. downtime at $DOWNTIME_SIZES, hybrid and pure postcopy (zipf, 1 % writes)" >&2
    $BENCH --sizes "$DOWNTIME_SIZES" --workloads zipf --write-percent 1 --modes postcopy,hybrid --repeat 1 \
        --stream-write-sizes 512K --output "$OUT/hybrid-downtime.json" | grep -E "^modes side|^  [a-z-]+:|^  hybrid total|^  demand faults|^tcp"
    python3 - "$OUT/hybrid-downtime.json" <<'PY' | tee "$OUT/hybrid-downtime.txt"
import json, sys
d = json.load(open(sys.argv[1]))
print("downtime breakdown (ms after the pause; kernel %s, %s cores)" % (d["machine"]["kernel"], d["machine"]["cores"]))
print("%-5s %-9s %9s %12s %14s %9s %16s" % ("size", "mode", "downtime", "source stop", "state arrived", "restore", "final set in"))
for r in d["runs"]:
    c, b = r["config"], r.get("downtime_breakdown_ns", {})
    fin = r.get("final_set_received_after_pause_ns", 0)
    print("%-5s %-9s %9.2f %12.2f %14.2f %9.2f %16s" % (c["size"], c["mode"], r["downtime_ns"] / 1e6, b.get("source_stop", 0) / 1e6,
          b.get("device_state_received", 0) / 1e6, b.get("restore", 0) / 1e6, "%.2f" % (fin / 1e6) if fin else "-"))
worst = max(r["downtime_ns"] for r in d["runs"]) / 1e6
print("worst downtime %.2f ms (goal <= 2 ms)" % worst)
PY
fi
if has modes; then
    echo "== 5. the four modes side by side, 1 GiB, kv / zipf / random with 2 % writes" >&2
    $BENCH --sizes 1G --workloads kv,zipf,random --write-percent 2 --modes postcopy,hybrid,precopy,stop-and-copy --repeat 1 \
        --stream-write-sizes 512K --output "$OUT/hybrid-modes.json" --plot "$OUT/hybrid-modes" | grep -E "^modes side|^  [a-z-]+:|^  hybrid total|^  demand faults|^tcp"
fi
