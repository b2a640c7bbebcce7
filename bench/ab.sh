#!/usr/bin/env bash
# Before/after comparison of two postcopy binaries in one sitting: runs
# bench/run.sh for each, alternating (A B A B ...), so that both see the same
# machine, and prints per binary the demand-fault ratio c/(a+b) at p50 (each run
# against its own baselines) and the 1 GiB full-copy time, with the spread over
# the rounds and B's median against A's.
#
# Usage: bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS]     (ROUNDS 2: about 5 minutes)
# Env:   AB_INSTALL (copy; or continue, for binaries that have it)
# To build the old one: git worktree add /tmp/old REV && (cd /tmp/old && swift build -c release --product postcopy)
# Results: bench/results/ab/{A,B}-N/latest.json and bench/results/ab/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,10p "$0" >&2; exit 2; }
A=$(realpath "$1"); B=$(realpath "$2"); ROUNDS=${3:-2}
AB_INSTALL=${AB_INSTALL:-copy}  # the install path both binaries run (copy, or continue)
for b in "$A" "$B"; do [ -x "$b" ] || { echo "error: $b is not an executable" >&2; exit 2; }; done
AB=bench/results/ab
rm -rf "$AB"; mkdir -p "$AB"
for i in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A; [ "$side" = B ] && bin=$B
        echo "== round $i, $side: $bin" >&2
        INSTALLS=$AB_INSTALL POSTCOPY_BIN=$bin OUT="$AB/$side-$i" bash bench/run.sh > "$AB/$side-$i.txt"
        cat "$AB/$side-$i.txt" >&2
    done
done
python3 - "$AB" "$ROUNDS" "$A" "$B" "$AB_INSTALL" <<'PY'
import json, os, statistics, sys
ab, rounds, bins, inst = sys.argv[1], int(sys.argv[2]), {"A": sys.argv[3], "B": sys.argv[4]}, sys.argv[5]
res = {"install": inst}
for side in "AB":
    runs = [json.load(open(os.path.join(ab, f"{side}-{i}", "latest.json")))["installs"][inst] for i in range(1, rounds + 1)]
    ratio = [r["ratio_c_over_a_plus_b_p50"] for r in runs]
    copy = [statistics.median(r["full_copy_seconds"]) for r in runs]
    every = sorted(t for r in runs for t in r["full_copy_seconds"])
    res[side] = {"binary": bins[side], "ratio_p50": ratio, "full_copy_median_s": copy, "full_copy_all_s": every}
    print(f"{side} ({bins[side]})")
    print(f"   demand c/(a+b) p50: " + ", ".join(f"{x:.2f}" for x in ratio) + f"   median {statistics.median(ratio):.2f}")
    print(f"   1 GiB full copy:    " + ", ".join(f"{x:.3f} s" for x in copy) + f"   (medians of each run's copies)")
    print(f"   all {len(every)} copies: min {every[0]:.3f} s, median {statistics.median(every):.3f} s, max {every[-1]:.3f} s")
for key, name in (("ratio_p50", "demand p50 ratio"), ("full_copy_all_s", "full-copy time (median of all copies)")):
    a, b = statistics.median(res["A"][key]), statistics.median(res["B"][key])
    res[f"B_over_A_{key}"] = b / a
    print(f"B / A {name}: {b / a:.3f}")
json.dump(res, open(os.path.join(ab, "summary.json"), "w"), indent=2)
PY
