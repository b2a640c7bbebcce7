#!/usr/bin/env bash
# Fetching before the fault, same script, same machine:
#   1. (part "prefetch") adaptive prefetch against none, alternated, 1 GiB guest,
#      scan, zipf and random workloads, REPEAT runs each: demand faults, pages
#      the guest touched until every page was in, summed vCPU stall, fault
#      latency p50/p99, time to full copy, guest ops/s during postcopy, pages
#      prefetched and shown used (postcopy-bench --prefetch off,adaptive);
#   2. (part "restore") one paused 1 GiB guest restored through the VMM handoff
#      again and again (postcopy restore): once recording its working set, then
#      RESTORES times without it and RESTORES times with it replayed, alternated;
#      time from the resume to the guest's first WORK_OPS operations (each
#      amount of work in the list), stall, integrity of every restore; for the
#      kv and zipf workloads.
# Results: $OUT/prefetch.json (postcopy-bench document), $OUT/prefetch.txt,
# $OUT/restore-*.json and $OUT/restore.txt.
#
# Usage: bash bench/prefetch.sh            (about 12 minutes)
# Env:   PARTS ("prefetch restore")  REPEAT (5)  RESTORES (5)  WORK_OPS ("20000 100000")
#        RECORD_SECONDS (3: the longest the recording lasts; it ends when the
#        recording guest has done its first WORK_OPS)  OUT (bench/latest)  POSTCOPY_BIN (a postcopy binary instead of building)
# CI runs the tests only (the prefetch and restore tests in `swift test`).
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-prefetch restore}
REPEAT=${REPEAT:-5}
RESTORES=${RESTORES:-5}
WORK_OPS=${WORK_OPS:-20000 100000}
RECORD_SECONDS=${RECORD_SECONDS:-3}
OUT=${OUT:-bench/latest}
mkdir -p "$OUT"
source bench/lib.sh
bench_binaries
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has prefetch; then
    echo "== 1. prefetch off vs adaptive, 1 GiB, scan / zipf / random, $REPEAT runs each (alternated)" >&2
    $BENCH --sizes 1G --workloads scan,zipf,random --modes postcopy --prefetch off,adaptive --repeat "$REPEAT" \
        --stream-write-sizes 512K --after 2 --output "$OUT/prefetch.json" > /dev/null
    python3 - "$OUT/prefetch.json" <<'PY' | tee "$OUT/prefetch.txt"
import json, sys
d = json.load(open(sys.argv[1]))
m = d["machine"]
print("prefetch off vs adaptive (kernel %s, %s cores, %d GiB; %s runs each, alternated)" % (m["kernel"], m["cores"], m["memory_bytes"] >> 30, d["config"]["repeat"]))
for s in d["prefetch_summary"]:
    print(s["line"])
    def med(k, setting): return s[k][setting]["median"]
    r = s["adaptive_over_off"]
    w = s["workload"]
    if w == "scan":
        per = med("demand_per_touched", "adaptive")
        print("  goal scan: demand faults <= 5 %% of touched pages: %.2f %% -> %s" % (per * 100, "holds" if per <= 0.05 else "MISSED"))
    if "pooled_demand_request_p99_us" in r:
        print("  goal %s: p99 of the faults answered by a demand request <= 1.2x off, pooled over every such fault of the runs: %.2fx -> %s (median of per-run p99s %.2fx; every fault, pooled: %.2fx)" % (
            w, r["pooled_demand_request_p99_us"], "holds" if r["pooled_demand_request_p99_us"] <= 1.2 else "MISSED",
            r.get("demand_request_p99_us", float("nan")), r.get("pooled_fault_p99_us", float("nan"))))
    if w == "zipf":
        print("  goal zipf: demand faults <= 0.5x off: %.2fx -> %s; stall <= 0.7x off: %.2fx -> %s" % (
            r["demand_faults"], "holds" if r["demand_faults"] <= 0.5 else "MISSED", r["stall_seconds"], "holds" if r["stall_seconds"] <= 0.7 else "MISSED"))
    if w == "random":
        p50 = r.get("pooled_fault_p50_us", r["fault_p50_us"])
        ok = abs(p50 - 1) <= 0.1 and abs(r["full_copy_seconds"] - 1) <= 0.1
        print("  goal random: fault p50 (pooled over every fault) %.2fx and full copy %.2fx within 10 %% of off -> %s (median of per-run p50s %.2fx)" % (
            p50, r["full_copy_seconds"], "holds" if ok else "MISSED", r["fault_p50_us"]))
PY
fi
if has restore; then
    : > "$OUT/restore.txt"
    for w in kv zipf; do
      for ops in $WORK_OPS; do
        echo "== 2. restore: 1 GiB $w snapshot, recorded once, then $RESTORES restores without and $RESTORES with the working set (first $ops ops)" >&2
        $B restore --size 1G --workload "$w" --restores "$RESTORES" --work-ops "$ops" --record-seconds "$RECORD_SECONDS" --json \
            > "$OUT/restore-$w-$ops.json"
        python3 - "$OUT/restore-$w-$ops.json" <<'PY' | tee -a "$OUT/restore.txt"
import json, sys
d = json.load(open(sys.argv[1]))
runs = d["runs"]
def spread(kind, key, scale):
    v = sorted(r[key] / scale for r in runs if r["working_set"] == kind and r[key] >= 0)
    return "%.1f (%.1f-%.1f)" % (v[len(v) // 2], v[0], v[-1]) if v else "-"
print("restore %s 1 GiB, first %d ops after the resume, median (range) of %d: without the working set %s ms, replayed %s ms = %.2fx faster; %d pages recorded, replayed %s (all requested %s ms after the resume); over each whole %g s run: stall %s vs %s ms, demand faults %s vs %s; integrity %s" % (
    d["workload"], d["work_ops"], len([r for r in runs if r["working_set"] == "off"]),
    spread("off", "time_to_work_ns", 1e6), spread("replay", "time_to_work_ns", 1e6), d["replay_speedup"] or 0,
    d["recorded_pages"], spread("replay", "replay_pages", 1), spread("replay", "replay_requested_after_resume_ns", 1e6),
    d.get("run_for", 3), spread("off", "stall_seconds", 1e-3), spread("replay", "stall_seconds", 1e-3),
    spread("off", "demand_pages", 1), spread("replay", "demand_pages", 1),
    "OK on every restore" if d["ok"] else "FAILED"))
print("  goal: replayed at least 3x faster (median) -> %s" % ("holds" if (d["replay_speedup"] or 0) >= 3 else "MISSED"))
PY
      done
    done
fi
