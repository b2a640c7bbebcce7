#!/usr/bin/env bash
# The background stream of two postcopy binaries in one sitting, against the
# raw loopback TCP stream measured between them: alternates (A B raw, A B raw,
# ...) pure-postcopy migrations of one running guest (shared memory, continue
# install path, stream in clear, as issue 13's stream goal is stated), and
# prints per binary the time to full copy and the stream's bytes per second
# over the raw stream's, each run against the raw run next to it, with the
# spread and the medians. The raw stream runs twice each round: from and into
# one hot 512 KiB buffer (cache-resident), and walking 1 GiB of allocated memory
# at each end (memory to memory, as guest RAM moves); the second is the new
# binary's baseline (`--span`: B runs both baselines).
#
# Usage: bench/stream-ab.sh OLD_BINARY NEW_BINARY [ROUNDS]   (ROUNDS 5: about 2 minutes)
#        bench/stream-ab.sh BINARY BINARY 5                  (one binary: the stream's spread)
# Env:   SIZE (1G), WORKLOAD (kv), VCPUS (2)
# To build the old one: git worktree add /tmp/old REV && (cd /tmp/old && swift build -c release --product postcopy)
# Results: bench/results/stream-ab/{runs.jsonl,summary.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,17p "$0" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2"); ROUNDS=${3:-5}
SIZE=${SIZE:-1G}; WORKLOAD=${WORKLOAD:-kv}; VCPUS=${VCPUS:-2}
for b in "$A" "$B"; do [ -x "$b" ] || { echo "error: $b is not an executable" >&2; exit 2; }; done
OUT=bench/results/stream-ab
rm -rf "$OUT"; mkdir -p "$OUT"
for i in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        echo "== round $i/$ROUNDS, $side: migrate $SIZE $WORKLOAD" >&2
        "$bin" migrate --size "$SIZE" --workload "$WORKLOAD" --vcpus "$VCPUS" --mode postcopy --transport tcp \
            --before 2 --after 1 --encryption off --memory shared --json 2>/dev/null \
            | python3 -c '
import json, sys
side, rnd = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    try: j = json.loads(line)
    except ValueError: continue
    if "downtime_ns" in j and "ok" in j:
        print(json.dumps({"side": side, "round": rnd, "ok": j["ok"], "full_copy_s": j.get("time_to_full_copy_seconds"),
                          "stream_bps": j.get("stream_bytes_per_second"), "bytes": j.get("bytes_received"),
                          "mismatched": j.get("integrity", {}).get("pages_mismatched"),
                          "ops_during": j.get("ops_per_s_during"), "ops_before": j.get("ops_per_s_before"), "faults": j.get("faults")}))
' "$side" "$i" >> "$OUT/runs.jsonl"
    done
    for span in 0 1G; do
        echo "== round $i/$ROUNDS, raw loopback TCP stream (512 KiB writes, span $span)" >&2
        "$B" baseline tcp-stream --write-size 512K --bytes 1G --span "$span" --json \
            | python3 -c 'import json,sys; j=json.load(sys.stdin); print(json.dumps({"side": "raw" if sys.argv[2] == "0" else "raw-memory", "round": int(sys.argv[1]), "stream_bps": j["bytes_per_second"]}))' "$i" "$span" \
            >> "$OUT/runs.jsonl"
    done
done
python3 - "$OUT" "$A" "$B" <<'PY'
import json, statistics, sys
out, bins = sys.argv[1], {"A": sys.argv[2], "B": sys.argv[3]}
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl")]
raw = {r["round"]: r["stream_bps"] for r in runs if r["side"] == "raw"}
mem = {r["round"]: r["stream_bps"] for r in runs if r["side"] == "raw-memory"}
summary = {"raw_bps": sorted(raw.values()), "raw_memory_bps": sorted(mem.values())}
print(f"raw loopback TCP stream, hot buffers:      " + ", ".join(f"{b / 2**30:.2f}" for b in summary["raw_bps"]) + " GiB/s")
print(f"raw loopback TCP stream, memory to memory: " + ", ".join(f"{b / 2**30:.2f}" for b in summary["raw_memory_bps"]) + " GiB/s")
for side in "AB":
    mine = [r for r in runs if r["side"] == side]
    bad = [r for r in mine if not r["ok"] or r["mismatched"]]
    ok = [r for r in mine if r["ok"] and not r["mismatched"] and r["stream_bps"]]
    ratio = sorted(r["stream_bps"] / raw[r["round"]] for r in ok)
    mratio = sorted(r["stream_bps"] / mem[r["round"]] for r in ok)
    copy = sorted(r["full_copy_s"] for r in ok)
    # The guest while postcopy ran: its ops/s over its own ops/s before the pause, and its faults.
    # (each a list of per-interval rates: their means, the last second before the pause)
    during = sorted(statistics.mean(r["ops_during"]) / statistics.mean(r["ops_before"][-10:])
                    for r in ok if r.get("ops_during") and r.get("ops_before"))
    faults = sorted(r["faults"] for r in ok if r.get("faults") is not None)
    summary[side] = {"binary": bins[side], "stream_over_raw": ratio, "stream_over_raw_memory": mratio, "full_copy_s": copy,
                     "guest_ops_during_over_before": during, "faults": faults, "failed": len(bad)}
    if not ok:
        print(f"{side} ({bins[side]}): no run succeeded"); continue
    print(f"{side} ({bins[side]}), {len(ok)} runs" + (f", {len(bad)} FAILED or mismatched" if bad else ", every guest verified"))
    print(f"   stream / raw TCP, hot buffers:      " + ", ".join(f"{x:.2f}" for x in ratio) + f"   median {statistics.median(ratio):.2f}")
    print(f"   stream / raw TCP, memory to memory: " + ", ".join(f"{x:.2f}" for x in mratio) + f"   median {statistics.median(mratio):.2f}")
    print(f"   full copy:                          " + ", ".join(f"{x:.3f}" for x in copy) + f" s   median {statistics.median(copy):.3f} s")
    if during: print(f"   guest ops/s during / before:        " + ", ".join(f"{x:.3f}" for x in during) + f"   median {statistics.median(during):.3f}")
    if faults: print(f"   guest faults:                       " + ", ".join(str(x) for x in faults) + f"   median {statistics.median(faults):.0f}")
if "A" in summary and "B" in summary and summary["A"]["full_copy_s"] and summary["B"]["full_copy_s"]:
    r = statistics.median(summary["B"]["full_copy_s"]) / statistics.median(summary["A"]["full_copy_s"])
    summary["full_copy_B_over_A"] = r
    print(f"B's median full copy over A's: {r:.2f}x")
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
PY
