#!/usr/bin/env bash
# Sets up and runs the whole test suite. Needs the Swift 6 toolchain (swift on PATH)
# and root (or access to /dev/userfaultfd) for the integration tests; without
# userfaultfd those tests are skipped and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
# The TCP core needs no system packages beyond the toolchain.
swift build --build-tests
# A hung test (a guest thread parked on a fault nobody serves) must fail CI, not stall it.
timeout --signal=KILL 1200 swift test
