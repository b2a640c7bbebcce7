#!/usr/bin/env bash
# The size series: postcopy of the running reference guest (key-value work, 2
# vCPUs) at each size in one run: downtime, time to full copy and per GiB, the
# destination daemon's memory outside guest memory, the source's CPU; a table
# (size-series.txt), every run (size-series.json) and a plot of each cost over its
# value at the smallest size (size-series.svg).
#
# Usage: bash bench/sizes.sh              (about 6 minutes)
# Env:   SIZES (1G,2G,4G,8G: 8 GiB needs about 17 GiB free, one copy at each side)
#        REPEAT (3)  OUT (bench/latest/sizes)  POSTCOPY_BIN (a postcopy binary instead of building)
# CI runs a reduced form (SIZES=64M,128M REPEAT=1, a debug build): the series and its summary line must come out.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-1G,2G,4G,8G}
REPEAT=${REPEAT:-3}
OUT=${OUT:-bench/latest/sizes}
mkdir -p "$OUT"
source bench/lib.sh
bench_binaries
$BENCH --sizes "$SIZES" --workloads kv --modes postcopy --repeat "$REPEAT" --after 4 \
    --plot "$OUT" --output "$OUT/size-series.json" | tee "$OUT/size-series.txt"
grep -q "^size series " "$OUT/size-series.txt" || { echo "no size series summary (every size must migrate)" >&2; exit 1; }
