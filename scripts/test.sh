#!/usr/bin/env bash
# Sets up and runs the whole test suite. Needs the Swift 6 toolchain (swift on PATH)
# and root (or access to /dev/userfaultfd) for the integration tests; without
# userfaultfd those tests are skipped and say why. Installs the packages it needs
# (libibverbs/librdmacm to build; QEMU, a Debian kernel with rdma_rxe, busybox and
# rdma-core for the soft-RoCE VM) when they are missing.
#
# Env: POSTCOPY_SKIP_VM=1 skips the RDMA suite in the VM (it says so).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
postcopy_build_deps
swift build --build-tests
# A hung test (a guest thread parked on a fault nobody serves) must fail CI, not stall it.
timeout --signal=KILL 1200 swift test
# The shared-memory suites again with shared memory in huge folios
# (shmem_enabled=advise, as a host that enables THP for shmem has it): punching
# part of a huge folio unmaps all of it, which the daemon must map again. The
# host's setting is restored afterwards.
rc=0
with_shmem_thp advise timeout --signal=KILL 600 swift test --skip-build \
    --filter 'SharedHandoffTests|HandoffTests|PrecopyTests|HostilePrecopy|ContinueTests|postcopy migrate' || rc=$?
if [ "$rc" -eq 3 ]; then
    echo "SKIP: shared-memory suites with huge folios (shmem_enabled is not writable here)"
elif [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
# Hybrid (precopy → postcopy) integrity, reduced: 3 consecutive migrations of
# mixed workloads and policies, each verified page by page (`bench/hybrid.sh`
# runs 20, and the benchmarks).
PARTS=integrity INTEGRITY_RUNS=3 INTEGRITY_SIZES="32M 64M" OUT=.build/hybrid-ci POSTCOPY_BIN=.build/debug/postcopy bash bench/hybrid.sh
# Two hosts: a migration between two network namespaces joined by a veth pair,
# set up as README's "Between two hosts" says (TCP, nothing on loopback).
POSTCOPY_BIN=.build/debug/postcopy bash scripts/two-hosts-test.sh
# The daemon's Prometheus endpoint scraped during a migration with cuts and
# async page faults: every scrape parses, every counter moves.
POSTCOPY_BIN=.build/debug/postcopy bash scripts/metrics-test.sh
# One daemon, many VMMs misbehaving at once (one killed, one cut 5 times, one
# with a wrong key, a malformed handoff), reduced (`bash bench/soak.sh`: 8 x 256 MiB, 6 rounds).
N=4 SIZE=64M ROUNDS=2 OUT=.build/soak-ci POSTCOPY_BIN=.build/debug/postcopy bash bench/soak.sh
# The size series, reduced (`bash bench/sizes.sh` runs 1 to 8 GiB).
SIZES=64M,128M REPEAT=1 OUT=.build/sizes-ci POSTCOPY_BIN=.build/debug/postcopy bash bench/sizes.sh > /dev/null
echo "size series (64M, 128M): OK"
# Encrypted against clear streams, reduced (`bash bench/encryption.sh`: 1 GiB,
# 5 pairs per install path): each run byte-exact and encrypted only when asked.
SIZE=128M OUT=.build/encryption-ci POSTCOPY_BIN=.build/debug/postcopy bash bench/encryption.sh 1 > /dev/null
echo "encrypted and clear streams (128M, both install paths): OK"
# The host suite again under AddressSanitizer and ThreadSanitizer.
if [ -n "${POSTCOPY_SKIP_SANITIZERS:-}" ]; then
    echo "SKIP: sanitizer runs (POSTCOPY_SKIP_SANITIZERS is set)"
else
    bash scripts/sanitizers.sh
fi
# A short fuzz run of the wire decoder, the handoff JSON and the APF rings
# (libFuzzer + AddressSanitizer); `bash fuzz/run.sh` alone runs 1,000,000 each.
bash fuzz/run.sh 200000
# The host kernel has no RDMA: the RDMA suite runs again inside a QEMU VM with soft-RoCE.
if [ -n "${POSTCOPY_SKIP_VM:-}" ]; then
    echo "SKIP: RDMA suite in the soft-RoCE VM (POSTCOPY_SKIP_VM is set)"
else
    bash scripts/vm/rdma-tests.sh
fi
