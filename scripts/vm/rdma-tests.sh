#!/usr/bin/env bash
# Runs the RDMA test suite (Tests/PostcopyIntegrationTests/RDMATests.swift) inside
# the soft-RoCE VM: the host kernel has no RDMA. Builds the tests on the host; the
# VM runs the very same test binary through its 9p view of the host's root.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
postcopy_build_deps
swift build --build-tests >&2
BIN=$(swift build --show-bin-path)/postcopyPackageTests.xctest
exec bash scripts/vm/run.sh --timeout "${RDMA_TEST_TIMEOUT:-2400}" -- "$BIN" --testing-library swift-testing --filter RDMATests "$@"
