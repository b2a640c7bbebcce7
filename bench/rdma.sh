#!/usr/bin/env bash
# RDMA benchmarks, run inside the soft-RoCE VM (the host kernel has no RDMA),
# every figure a ratio against perftest on the same rxe device in the same run:
#   (a) ib_read_lat -s 4096           one-sided 4 KiB READ round trip
#   (b) local userfaultfd fault       fault -> UFFDIO_COPY -> resume
#   (c) demand fault over RDMA        as the guest thread sees it
#   (d) ib_read_bw -s BATCH           READ bandwidth at our background message size
#   (e) background stream over RDMA   non-zero bytes / time to full copy
# and the source process's CPU time per page (one-sided: should be ~0).
# (c) and (e) run for each install path: copy (READ into a staging buffer,
# UFFDIO_COPY into anonymous RAM) and continue (READ straight into the
# registered, preallocated alias of shared RAM, UFFDIO_CONTINUE; no page copied
# by the CPU), alternated with ib_read_bw. Also runs (c) and (e) over TCP on
# the same veth for context.
#
# (a), (b) and (c) run LAT_ROUNDS times, alternated (a b c-copy c-continue, a b
# ...): each round's c/(a+b) is against its own baselines (the VM's speed drifts
# by +-30% over minutes), and the figure is their median.
#
# Usage: bash bench/rdma.sh        (builds on the host, boots the VM: ~10-15 min)
# Env:   IDLE_SIZE (16M)  COPY_SIZE (256M)  LAT_ITERS (2000)  LAT_ROUNDS (5)  INSTALLS ("copy continue")
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${POSTCOPY_VM:-}" ]; then
    source scripts/lib.sh
    postcopy_build_deps
    swift build -c release --product postcopy >&2
    exec bash scripts/vm/run.sh --timeout 2400 -- bash bench/rdma.sh "$@"
fi

IDLE_SIZE=${IDLE_SIZE:-16M}
COPY_SIZE=${COPY_SIZE:-256M}
LAT_ITERS=${LAT_ITERS:-2000}
LAT_ROUNDS=${LAT_ROUNDS:-5}
INSTALLS=${INSTALLS:-copy continue}
ADDR=${POSTCOPY_RDMA_ADDR:?not inside the soft-RoCE VM}
DEV=${POSTCOPY_RDMA_DEV:-rxe0}
BATCH_PAGES=128
BATCH=$((BATCH_PAGES * 4096))
B=.build/release/postcopy
OUT=bench/results/rdma
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.txt
SMALL=/dev/shm/rdma-bench-small
FULL=/dev/shm/rdma-bench-full
PORT=7391
SRC_PID=
cleanup() { [ -n "$SRC_PID" ] && kill "$SRC_PID" 2>/dev/null; rm -f "$SMALL" "$FULL"; }
trap cleanup EXIT

"$B" make-memory "$SMALL" --size "$IDLE_SIZE" --zero-percent 0 >&2
"$B" make-memory "$FULL" --size "$COPY_SIZE" --zero-percent 10 >&2

# read_lat ROUND: the READ round-trip baseline (a).
read_lat() {
    ib_read_lat -d "$DEV" -s 4096 -n "$LAT_ITERS" -F -p 18515 >/dev/null 2>&1 &
    sleep 2
    ib_read_lat -d "$DEV" -s 4096 -n "$LAT_ITERS" -F -p 18515 "$ADDR" > "$OUT/ib_read_lat-$1.txt"
    wait
}
# ib_read_bw ROUND: the READ bandwidth baseline, alternated with our stream below
# (soft-RoCE under emulation drifts by +-20% over a minute).
read_bw() {
    ib_read_bw -d "$DEV" -s "$BATCH" -n 200 -F --report_gbits -p 18516 >/dev/null 2>&1 &
    sleep 2
    ib_read_bw -d "$DEV" -s "$BATCH" -n 200 -F --report_gbits -p 18516 "$ADDR" > "$OUT/ib_read_bw-$1.txt"
    wait
}

# migrate NAME TRANSPORT MEMORY DEST-ARGS...
source bench/lib.sh
migrate() { local name=$1 transport=$2 mem=$3; shift 3; bench_migrate "$name" "$ADDR" "$transport" "$mem" --batch-pages "$BATCH_PAGES" --no-progress "$@"; }
echo "demand faults, $LAT_ROUNDS rounds alternated with their baselines..." >&2
for i in $(seq "$LAT_ROUNDS"); do
    read_lat "$i"
    "$B" baseline uffd-fault --samples 2000 --json > "$OUT/baseline-uffd-fault-$i.json"
    for inst in $INSTALLS; do
        migrate "idle-rdma-$inst-$i" rdma "$SMALL" --install "$inst" --background off --prefetch off --touch sequential --threads 1
    done
done
echo "streams..." >&2
for i in 1 2 3; do
    read_bw "$i"
    for inst in $INSTALLS; do migrate "copy-rdma-$inst-$i" rdma "$FULL" --install "$inst" --touch none; done
done
migrate idle-tcp tcp "$SMALL" --background off --prefetch off --touch sequential --threads 1
migrate copy-tcp-1 tcp "$FULL" --touch none

python3 - "$OUT" "$BATCH" "$LAT_ROUNDS" $INSTALLS <<'PY'
import json, os, platform, statistics, sys
out, batch, rounds, installs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
ld = lambda n: json.load(open(os.path.join(out, n)))
def perftest(name, col):
    for line in open(os.path.join(out, name)):
        f = line.split()
        if len(f) > col and f[0].isdigit() and f[1].isdigit():
            return float(f[col])
    raise SystemExit(f"no result line in {name}")
lats = [perftest(f"ib_read_lat-{i}.txt", 4) for i in range(1, rounds + 1)]   # t_typical
bws = [perftest(f"ib_read_bw-{i}.txt", 3) for i in (1, 2, 3)]  # BW average [Gb/sec]
bw_gbps = sorted(bws)[1]
uffds = [ld(f"baseline-uffd-fault-{i}.json")["latency"]["p50_ns"] / 1e3 for i in range(1, rounds + 1)]
lat_typical_us, uffd_p50_us = statistics.median(lats), statistics.median(uffds)
res = {"machine": {"kernel": platform.release(), "cores": os.cpu_count(), "vm": "qemu tcg, soft-RoCE (rdma_rxe) on veth"},
       "ib_read_lat_4k_typical_us": lat_typical_us, "ib_read_bw_gbps": bw_gbps, "message_bytes": batch,
       "uffd_fault_p50_us": uffd_p50_us, "ib_read_lat_4k_typical_us_each": lats, "uffd_fault_p50_us_each": uffds}
def idle_round(t):
    # RDMA: the round whose c/(a+b) is the median of the rounds (TCP: its one run).
    if t == "tcp": return ld("dest-idle-tcp.json"), ld("source-idle-tcp.json"), None
    ratios = [ld(f"dest-idle-{t}-{i}.json")["guest_touch_latency"]["p50_ns"] / 1e3 / (lats[i - 1] + uffds[i - 1]) for i in range(1, rounds + 1)]
    k = sorted(range(rounds), key=lambda i: ratios[i])[rounds // 2] + 1
    return ld(f"dest-idle-{t}-{k}.json"), ld(f"source-idle-{t}-{k}.json"), ratios
for t, n in [(f"rdma-{inst}", 3) for inst in installs] + [("tcp", 1)]:
    idle, src_idle, ratios = idle_round(t)
    copies = [ld(f"dest-copy-{t}-{i}.json") for i in range(1, n + 1)]
    srcs = [ld(f"source-copy-{t}-{i}.json") for i in range(1, n + 1)]
    rates = [x["non_zero_pages"] * x["page_size"] * 8 / x["time_to_full_copy_seconds"] / 1e9 for x in copies]
    k = sorted(range(n), key=lambda i: rates[i])[n // 2]   # the median run
    copy, src_copy, gbps = copies[k], srcs[k], rates[k]
    res.setdefault("runs", {})[t] = {"stream_gbps": rates, "demand_p50_over_read_lat_plus_uffd": ratios}
    c = idle["guest_touch_latency"]
    pages_idle = idle["demand_pages"]
    res[t] = {"transport_used": idle["transport"], "install_path": idle.get("install_path", "copy"),
              "pages_copied": sum(x.get("pages_copied", 0) for x in copies + [idle]),
              "pages_received_in_place": sum(x.get("pages_received_in_place", 0) for x in copies + [idle]),
              "demand_p50_us": c["p50_ns"] / 1e3, "demand_p99_us": c["p99_ns"] / 1e3,
              "demand_pages": pages_idle, "digest_match": idle["digest_match"] and all(x["digest_match"] for x in copies)
                  and (t == "tcp" or all(ld(f"dest-idle-{t}-{i}.json")["digest_match"] for i in range(1, rounds + 1))),
              "background_gbps": gbps, "time_to_full_copy_s": copy["time_to_full_copy_seconds"],
              "source_serving_cpu_s_idle_run": src_idle["serving_cpu_seconds"],
              "source_cpu_us_per_demand_page": src_idle["serving_cpu_seconds"] * 1e6 / max(pages_idle, 1),
              "source_cpu_us_per_page_copy_run": src_copy["serving_cpu_seconds"] * 1e6 / max(copy["non_zero_pages"], 1),
              "source_rdma_connections": src_idle.get("rdma_connections", 0),
              # Fixed costs (handshake, zero map, RSS sampling) are the same in both runs:
              # the difference per extra page is what a page costs the source.
              "source_marginal_cpu_us_per_page": (src_copy["serving_cpu_seconds"] - src_idle["serving_cpu_seconds"]) * 1e6
                  / max(copy["non_zero_pages"] - pages_idle, 1),
              "source_pages_served_by_cpu": src_idle["demand_pages"] + src_idle["background_pages"] + src_copy["demand_pages"] + src_copy["background_pages"]}
for inst in installs:
    r = res[f"rdma-{inst}"]
    r["ratio_demand_p50_vs_read_lat_plus_uffd"] = statistics.median(res["runs"][f"rdma-{inst}"]["demand_p50_over_read_lat_plus_uffd"])
    r["ratio_background_vs_ib_read_bw"] = r["background_gbps"] / bw_gbps
json.dump(res, open(os.path.join(out, "rdma.json"), "w"), indent=2)
t = res["tcp"]
lines = [
 f"soft-RoCE in a QEMU TCG VM ({platform.release()}, {os.cpu_count()} vCPUs); everything ~10-50x slower than native: only ratios count",
 f"(a) ib_read_lat -s 4096 typical (median) {lat_typical_us:10.1f} us   rounds: {', '.join(f'{x:.1f}' for x in lats)}",
 f"(b) local userfaultfd fault p50 (median) {uffd_p50_us:10.1f} us   rounds: {', '.join(f'{x:.1f}' for x in uffds)}",
 f"(d) ib_read_bw -s {batch} (median of 3) {bw_gbps:10.3f} Gb/s   runs: {', '.join(f'{x:.3f}' for x in bws)}",
]
for inst in installs:
    r = res[f"rdma-{inst}"]
    lines += [
 f"--- install {inst} ({'READ straight into the registered alias, UFFDIO_CONTINUE' if inst == 'continue' else 'READ into a staging buffer, UFFDIO_COPY'}): "
 f"{r['pages_copied']} pages through UFFDIO_COPY, {r['pages_received_in_place']} READ in place",
 f"(c) demand fault over RDMA p50 (p99)      {r['demand_p50_us']:10.1f} us ({r['demand_p99_us']:.1f})   c/(a+b) = {r['ratio_demand_p50_vs_read_lat_plus_uffd']:.2f} (median; rounds: {', '.join(f'{x:.2f}' for x in res['runs'][f'rdma-{inst}']['demand_p50_over_read_lat_plus_uffd'])})",
 f"(e) background stream over RDMA (median) {r['background_gbps']:10.3f} Gb/s   e/d = {r['ratio_background_vs_ib_read_bw']:.2f}   runs: {', '.join(f'{x:.3f}' for x in res['runs'][f'rdma-{inst}']['stream_gbps'])}",
    ]
r = res[f"rdma-{installs[-1]}"]
lines += [
 f"--- context (last install path: {installs[-1]})",
 f"    demand fault over TCP (same veth) p50 {t['demand_p50_us']:10.1f} us",
 f"    background stream over TCP           {t['background_gbps']:10.3f} Gb/s",
 f"source process CPU while serving, RDMA: {r['source_serving_cpu_s_idle_run']*1e3:.1f} ms for {r['demand_pages']} demand pages = {r['source_cpu_us_per_demand_page']:.2f} us/page, "
 f"{r['source_cpu_us_per_page_copy_run']:.2f} us/page streaming; TCP: {t['source_cpu_us_per_demand_page']:.2f} / {t['source_cpu_us_per_page_copy_run']:.2f} us/page",
 f"source CPU per additional page (stream run minus demand run): RDMA {r['source_marginal_cpu_us_per_page']:.2f} us, TCP {t['source_marginal_cpu_us_per_page']:.2f} us",
 f"pages the source CPU served itself over RDMA: {r['source_pages_served_by_cpu']} (soft-RoCE answers READs in the kernel, rxe; a real RNIC in hardware)",
 f"integrity: rdma {'OK' if r['digest_match'] else 'MISMATCH'}, tcp {'OK' if t['digest_match'] else 'MISMATCH'}",
]
open(os.path.join(out, "rdma.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
ok = t["digest_match"] and all(res[f"rdma-{i}"]["digest_match"] and res[f"rdma-{i}"]["transport_used"].startswith("rdma") for i in installs)
sys.exit(0 if ok else 1)
PY
