#!/usr/bin/env bash
# Demand-fault latency and full-copy benchmarks of the postcopy core, each as a
# ratio against baselines measured in the same run:
#   (a) raw loopback TCP 4 KiB request/response round trip
#   (b) local userfaultfd fault service (fault -> UFFDIO_COPY from memory -> resume)
#   (c) this project's demand fault over TCP, as the guest thread sees it
#   (d) a raw loopback TCP stream at the background batch's write size (512 KiB)
# Prints c/(a+b) at p50, the demand p99 while the background stream runs
# against the idle demand p50, and the full copy's stream against (d); for
# each install path (copy: anonymous RAM + UFFDIO_COPY; continue: shared RAM
# preallocated, received in place, UFFDIO_CONTINUE), side by side.
# Results: bench/results/latest.json.
#
# Usage: bench/run.sh            (about two minutes)
# Env:   IDLE_SIZE (64M)  BG_SIZE (1G)  COPY_RUNS (3)  PORT (7390)
#        INSTALLS ("copy continue": passed to the destinations as --install)
#        POSTCOPY_BIN (a postcopy binary to measure instead of building this tree's)
#        OUT (results folder, bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE_SIZE=${IDLE_SIZE:-64M}
BG_SIZE=${BG_SIZE:-1G}
COPY_RUNS=${COPY_RUNS:-3}
INSTALLS=${INSTALLS:-${INSTALL:-copy continue}}
PORT=${PORT:-7390}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if [ -n "${POSTCOPY_BIN:-}" ]; then
    B=$POSTCOPY_BIN
else
    source scripts/lib.sh
    swift build -c release --product postcopy >&2
    B=.build/release/postcopy
fi
SMALL=/dev/shm/postcopy-bench-small.$$
BIG=/dev/shm/postcopy-bench-big.$$
FULL=/dev/shm/postcopy-bench-full.$$
SRC_PID=
cleanup() { [ -n "$SRC_PID" ] && kill "$SRC_PID" 2>/dev/null; rm -f "$SMALL" "$BIG" "$FULL" "$OUT"/.src.*; }
trap cleanup EXIT

"$B" make-memory "$SMALL" --size "$IDLE_SIZE" --zero-percent 0 >&2
"$B" make-memory "$BIG" --size "$BG_SIZE" --zero-percent 10 >&2
"$B" make-memory "$FULL" --size "$BG_SIZE" --zero-percent 0 >&2

# migrate NAME MEMORY DEST-ARGS...: one source + one destination over loopback TCP, JSON of both kept.
source bench/lib.sh
migrate() { local name=$1 mem=$2; shift 2; bench_migrate "$name-$INSTALL" 127.0.0.1 tcp "$mem" --install "$INSTALL" "$@"; }

echo "baselines..." >&2
"$B" baseline tcp-rtt --samples 20000 --json > "$OUT/baseline-tcp-rtt.json"
"$B" baseline uffd-fault --samples 20000 --json > "$OUT/baseline-uffd-fault.json"
# (an older binary, as bench/ab.sh may measure, has no tcp-stream baseline)
"$B" baseline tcp-stream --write-size 512K --bytes 1G --json > "$OUT/baseline-tcp-stream.json" 2>/dev/null \
    || echo '{"write_size": 524288, "bytes_per_second": null, "receiver_cpu_seconds_per_gib": null}' > "$OUT/baseline-tcp-stream.json"
for INSTALL in $INSTALLS; do
echo "migrations ($INSTALL)..." >&2
# (c) idle: no background stream, one guest thread, every page a demand fault.
migrate idle "$SMALL" --background off --prefetch off --touch sequential --threads 1 --no-progress
# demand under an unthrottled background stream: one guest thread touching at
# random with 20 µs of compute between touches (as a running vCPU would), so the
# stream keeps most of its speed while the guest faults.
migrate background "$BIG" --touch random --threads 1 --think-us 20 --no-progress
# the acceptance run: 4 guest threads, random order.
migrate random4 "$BIG" --touch random --threads 4 --no-progress
# full copy with no guest activity: background stream alone.
for i in $(seq "$COPY_RUNS"); do migrate "copy$i" "$FULL" --touch none --no-progress; done
done

python3 - "$OUT" "$COPY_RUNS" $INSTALLS <<'PY'
import json, os, platform, sys, statistics
out, runs, installs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ld = lambda n: json.load(open(os.path.join(out, n)))
a = ld("baseline-tcp-rtt.json")["latency"]; b = ld("baseline-uffd-fault.json")["latency"]
st = ld("baseline-tcp-stream.json")
us = lambda ns: ns / 1000.0
res = {"machine": {"kernel": platform.release(), "cores": os.cpu_count()},
       "baseline_tcp_rtt": a, "baseline_uffd_fault": b, "baseline_tcp_stream": st, "installs": {}}
print(f"kernel {platform.release()}, {os.cpu_count()} cores")
print(f"(a) raw TCP 4 KiB round trip    p50 {us(a['p50_ns']):8.1f} µs   p99 {us(a['p99_ns']):8.1f} µs")
print(f"(b) local uffd fault service    p50 {us(b['p50_ns']):8.1f} µs   p99 {us(b['p99_ns']):8.1f} µs")
if st["bytes_per_second"]:
    print(f"(d) raw TCP stream, {st['write_size']//1024} KiB writes {st['bytes_per_second']/2**30:6.2f} GiB/s, receiver CPU {st['receiver_cpu_seconds_per_gib']:.3f} s/GiB")
ok = True
for inst in installs:
    d = lambda n: ld(f"dest-{n}-{inst}.json")
    idle, bg, r4, s4 = d("idle"), d("background"), d("random4"), ld(f"source-random4-{inst}.json")
    copies = [d(f"copy{i}") for i in range(1, runs + 1)]
    c = idle["guest_touch_latency"]; cb = bg["guest_touch_latency"]
    ratio_p50 = c["p50_ns"] / (a["p50_ns"] + b["p50_ns"])
    bg_ratio = cb["p99_ns"] / c["p50_ns"]
    copy_times = [x["time_to_full_copy_seconds"] for x in copies]
    nonzero = copies[0]["non_zero_pages"] * copies[0]["page_size"]
    rates = [x["bytes_received"] / x["time_to_full_copy_seconds"] for x in copies]
    cpu_gib = [x["cpu_seconds"] / (x["bytes_received"] / 2**30) for x in copies]
    cpu_window = [x.get("cpu_seconds_to_full_copy", 0) / (x["bytes_received"] / 2**30) for x in copies]
    guest = r4["guest_bytes"]
    rss_limit = 64 * 2**20 + guest // 1000
    res["installs"][inst] = {
      "demand_idle_guest_latency": c, "demand_under_background_guest_latency": cb,
      "background_run": {"background_pages": bg["background_pages"], "demand_pages": bg["demand_pages"],
                         "time_to_full_copy_seconds": bg["time_to_full_copy_seconds"]},
      "ratio_c_over_a_plus_b_p50": ratio_p50, "ratio_bg_p99_over_idle_p50": bg_ratio,
      "full_copy_seconds": copy_times, "full_copy_non_zero_gib": nonzero / 2**30,
      "stream_bytes_per_second": rates, "stream_over_raw_tcp_stream": [r / st["bytes_per_second"] for r in rates] if st["bytes_per_second"] else None,
      "dest_cpu_seconds_per_gib": cpu_gib, "dest_cpu_seconds_per_gib_to_full_copy": cpu_window, "preallocation_seconds": [x.get("preallocation_seconds", 0) for x in copies],
      "pages_copied": [x.get("pages_copied", 0) for x in copies], "pages_received_in_place": [x.get("pages_received_in_place", 0) for x in copies],
      "random4": {"digest_match": r4["digest_match"], "wire_overhead": r4["wire_overhead"],
                  "dest_rss_outside_guest_max_bytes": r4["rss_outside_guest_max_bytes"],
                  "source_rss_outside_guest_max_bytes": s4["rss_outside_guest_max_bytes"],
                  "rss_limit_bytes": rss_limit, "time_to_full_copy_seconds": r4["time_to_full_copy_seconds"],
                  "demand_pages": r4["demand_pages"], "background_pages": r4["background_pages"],
                  "source_cpu_seconds": s4["cpu_seconds"], "dest_cpu_seconds": r4["cpu_seconds"]},
    }
    print(f"--- install {inst}")
    print(f"(c) demand fault over TCP, idle p50 {us(c['p50_ns']):8.1f} µs   p99 {us(c['p99_ns']):8.1f} µs   ({c['count']} faults)")
    print(f"    demand fault under bg stream p50 {us(cb['p50_ns']):8.1f} µs   p99 {us(cb['p99_ns']):8.1f} µs   ({cb['count']} faults, "
          f"{bg['background_pages']} pages streamed meanwhile in {bg['time_to_full_copy_seconds']:.3f} s)")
    print(f"c / (a + b) at p50:                {ratio_p50:.2f}")
    print(f"demand p99 under bg / idle p50:    {bg_ratio:.2f}")
    print(f"full copy of {nonzero/2**30:.2f} GiB non-zero, no guest activity: " + ", ".join(f"{t:.3f} s" for t in copy_times)
          + f"  (median {statistics.median(copy_times):.3f} s)")
    if st["bytes_per_second"]:
        print("    stream " + ", ".join(f"{r/st['bytes_per_second']:.2f}" for r in rates) + " x raw TCP stream")
    print("    destination CPU per GiB received, engine start to full copy: " + ", ".join(f"{x:.3f}" for x in cpu_window)
          + " s (whole run, preallocation and digest included: " + ", ".join(f"{x:.3f}" for x in cpu_gib) + " s); preallocation "
          + ", ".join(f"{x.get('preallocation_seconds', 0):.3f}" for x in copies) + " s")
    print(f"1 GiB, 4 threads random: digest {'match' if r4['digest_match'] else 'MISMATCH'}, wire {r4['wire_overhead']:.4f} x non-zero RAM, "
          f"RSS outside guest RAM: dest {r4['rss_outside_guest_max_bytes']/2**20:.1f} MiB, source {s4['rss_outside_guest_max_bytes']/2**20:.1f} MiB (limit {rss_limit/2**20:.1f} MiB)")
    ok = ok and r4["digest_match"] and idle["digest_match"] and bg["digest_match"] and all(x["digest_match"] for x in copies)
json.dump(res, open(os.path.join(out, "latest.json"), "w"), indent=2)
sys.exit(0 if ok else 3)
PY
