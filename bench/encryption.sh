#!/usr/bin/env bash
# Encrypted against clear TCP in one sitting: one 1 GiB memory file streamed
# from `postcopy source` to `postcopy dest --touch none` (the background stream
# alone, no guest), with the shared key and --encryption on, then off, then on
# ... ROUNDS times per install path, alternating so that both modes see the
# same machine. Prints per install path the background throughput of each mode,
# the ratio on/off (median and spread of the pairs), and the CPU the cipher
# costs per GiB at the destination and the source (on minus off, median), next
# to the cipher alone on one core (`postcopy baseline aes-gcm`, same sitting).
#
# Usage: bash bench/encryption.sh [ROUNDS]      (ROUNDS 5: about 3 minutes)
# Memory is compacted before each run (root).
# Env:   SIZE (1G), INSTALLS ("copy continue"), POSTCOPY_BIN (a built binary)
# Results: bench/results/encryption/{summary.json,summary.txt} and each run's reports.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source bench/lib.sh
postcopy_build_deps
ROUNDS=${1:-5}
SIZE=${SIZE:-1G}
INSTALLS=${INSTALLS:-copy continue}
OUT=${OUT:-bench/results/encryption}
PORT=${PORT:-7311}
rm -rf "$OUT"; mkdir -p "$OUT"
bench_binaries
MEM=/dev/shm/postcopy-bench-enc-$$.ram
KEY=$(mktemp); chmod 600 "$KEY"; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$KEY"
SRC_PID=
trap 'rm -f "$MEM" "$KEY"; [ -n "$SRC_PID" ] && kill "$SRC_PID" 2>/dev/null || true' EXIT
"$B" make-memory "$MEM" --size "$SIZE" --zero-percent 10 >&2
# Baselines in the same sitting: the stream's cipher alone on one core (the
# 4 KiB records of demand pages, the 512 KiB of a stream batch), and Debian's
# OpenSSL for reference.
for w in 4K 512K; do "$B" baseline aes-gcm --write-size "$w" --json > "$OUT/cipher-$w.json"; done
openssl speed -seconds 2 -bytes 16384 -evp aes-256-gcm 2>/dev/null | grep -i "aes-256-gcm" | tail -1 > "$OUT/openssl-speed.txt" || true
for inst in $INSTALLS; do
    for i in $(seq "$ROUNDS"); do
        for mode in on off; do
            name=$inst-$mode-$i
            # The copy path allocates every page in the window: start each run
            # from compacted memory, or it drifts run after run (measured: the
            # destination's system time 0.5 -> 2 s per GiB over six runs).
            [ -w /proc/sys/vm/compact_memory ] && echo 1 > /proc/sys/vm/compact_memory
            "$B" source --memory "$MEM" --listen "127.0.0.1:$PORT" --transport tcp --key-file "$KEY" --encryption "$mode" --json > "$OUT/.src.$name" &
            SRC_PID=$!
            for _ in $(seq 300); do grep -q '"listening"' "$OUT/.src.$name" 2>/dev/null && break; sleep 0.1; done
            "$B" dest --connect "127.0.0.1:$PORT" --transport tcp --key-file "$KEY" --encryption "$mode" --install "$inst" \
                --touch none --json --no-progress > "$OUT/dest-$name.json"
            wait "$SRC_PID"; SRC_PID=
            tail -n +2 "$OUT/.src.$name" > "$OUT/source-$name.json"; rm -f "$OUT/.src.$name"
            echo "  $name done" >&2
        done
    done
done
python3 - "$OUT" "$ROUNDS" "$INSTALLS" "$SIZE" <<'PY'
import json, os, statistics, sys
out, rounds, installs, size = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
speed = open(os.path.join(out, "openssl-speed.txt")).read().split()
def load(kind, name): return json.load(open(os.path.join(out, f"{kind}-{name}.json")))
import platform, subprocess
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
machine = f"{os.cpu_count()} cores ({cpu}), kernel {platform.release()}, commit {rev}"
lines, res = [f"machine: {machine}"], {"size": size, "rounds": rounds, "machine": machine, "openssl_speed_aes_256_gcm_16k": " ".join(speed)}
for w in ("4K", "512K"):
    c = json.load(open(os.path.join(out, f"cipher-{w}.json")))
    res[f"cipher_alone_{w}"] = c
    lines.append(f"cipher alone ({c['library']}, {w} records, one core): seal {c['seal_bytes_per_second'] / 1e9:.2f} GB/s, "
                 f"open {c['open_bytes_per_second'] / 1e9:.2f} GB/s ({c['seal_seconds_per_gib']:.3f} and {c['open_seconds_per_gib']:.3f} s per GiB)")
try: lines.append(f"openssl speed -evp aes-256-gcm (Debian's OpenSSL, 16 KiB blocks, one core; for reference, the stream uses BoringSSL): {float(speed[-1].rstrip('k')) * 1000 / 1e9:.2f} GB/s")
except Exception: pass
for inst in installs:
    r = {"on": [], "off": []}
    for i in range(1, rounds + 1):
        for mode in ("on", "off"):
            d, s = load("dest", f"{inst}-{mode}-{i}"), load("source", f"{inst}-{mode}-{i}")
            assert d["digest_match"] and d["source_confirmed_digest"], f"{inst}-{mode}-{i}: digest mismatch"
            assert d["encrypted"] == (mode == "on"), f"{inst}-{mode}-{i}: encrypted={d['encrypted']}"
            gib = d["guest_bytes"] / 2**30
            r[mode].append({"gb_per_s": d["guest_bytes"] / d["time_to_full_copy_seconds"] / 1e9,
                            "dest_cpu_s_per_gib": d["cpu_seconds_to_full_copy"] / gib,
                            "source_cpu_s_per_gib": s["serving_cpu_seconds"] / gib,
                            "bytes_decrypted": d["bytes_decrypted"], "bytes_received": d["bytes_received"]})
    ratios = [a["gb_per_s"] / b["gb_per_s"] for a, b in zip(r["on"], r["off"])]
    med = lambda mode, k: statistics.median(x[k] for x in r[mode])
    dcpu = med("on", "dest_cpu_s_per_gib") - med("off", "dest_cpu_s_per_gib")
    scpu = med("on", "source_cpu_s_per_gib") - med("off", "source_cpu_s_per_gib")
    res[inst] = {"runs": r, "ratio_on_over_off": ratios, "ratio_median": statistics.median(ratios),
                 "cipher_dest_cpu_s_per_gib": dcpu, "cipher_source_cpu_s_per_gib": scpu}
    lines.append(f"install {inst}: background stream of {size}, {rounds} pairs (on, off alternated)")
    for mode in ("on", "off"):
        v = sorted(x["gb_per_s"] for x in r[mode])
        lines.append(f"  encryption {mode:3}: {', '.join(f'{x:.2f}' for x in v)} GB/s (median {statistics.median(v):.2f}); "
                     f"dest CPU {med(mode, 'dest_cpu_s_per_gib'):.3f} s/GiB, source CPU {med(mode, 'source_cpu_s_per_gib'):.3f} s/GiB")
    lines.append(f"  on / off throughput: {', '.join(f'{x:.2f}' for x in sorted(ratios))} (median {statistics.median(ratios):.2f}, min {min(ratios):.2f})")
    lines.append(f"  the cipher's CPU: +{dcpu:.3f} s/GiB at the destination, +{scpu:.3f} s/GiB at the source (medians, on minus off)")
json.dump(res, open(os.path.join(out, "summary.json"), "w"), indent=2)
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
