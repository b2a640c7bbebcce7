#!/usr/bin/env bash
# The standard postcopy-bench suite (a few minutes): live migrations of the
# reference guest (key-value workload, 2 vCPUs) of 1 GiB and 4 GiB, by postcopy and
# by stop-and-copy, over loopback TCP, next to the raw TCP round-trip and local
# userfaultfd baselines measured in the same run.
# Writes bench/results/suite.json, bench/results/suite.txt and SVG charts in
# bench/results/plots/. Extra arguments go to postcopy-bench (e.g. --repeat 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
swift build -c release --product postcopy >&2
swift build -c release --product postcopy-bench >&2
mkdir -p bench/results
.build/release/postcopy-bench --sizes 1G,4G --workloads kv --modes postcopy,stop-and-copy --transports tcp \
    --before 2 --after 3 --plot bench/results/plots --output bench/results/suite.json "$@" | tee bench/results/suite.txt
