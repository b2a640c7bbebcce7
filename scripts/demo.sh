#!/usr/bin/env bash
# Live-migrates a running guest by postcopy on this machine (loopback TCP): the
# reference guest runs a key-value workload at the source; after 3 s it pauses,
# its device state goes over and it resumes at once at the destination on empty
# memory, handed by the guest (a Firecracker-style VMM) to the page-fault daemon
# over a Unix socket. Prints downtime, time to full copy, guest ops/s before,
# during and after, the fault-latency percentiles and the integrity check.
#
# Usage: scripts/demo.sh [postcopy migrate flags]
#   e.g. scripts/demo.sh --size 4G --vcpus 2 --workload zipf --after 10
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
postcopy_build_deps
swift build -c release --product postcopy
exec .build/release/postcopy migrate "$@"
