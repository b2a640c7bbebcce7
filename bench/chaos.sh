#!/usr/bin/env bash
# Recovery under fire: a 1 GiB postcopy migration over TCP through a proxy that
# cuts every connection CUTS times (default 20, every 100 ms), while two guest
# threads fault at random and the background stream runs. Prints each cut, each
# reconnect's recovery time, and the integrity check (xxh64 of every 1 MiB chunk,
# destination against source). Results: bench/results/chaos/.
#
# Usage: bash bench/chaos.sh            Env: SIZE (1G) CUTS (20) INTERVAL_MS (100)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
postcopy_build_deps
SIZE=${SIZE:-1G}; CUTS=${CUTS:-20}; INTERVAL_MS=${INTERVAL_MS:-100}
swift build -c release --product postcopy >&2
B=.build/release/postcopy
OUT=bench/results/chaos
mkdir -p "$OUT"
MEM=/dev/shm/postcopy-chaos.$$
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$MEM"; }
trap cleanup EXIT
"$B" make-memory "$MEM" --size "$SIZE" --zero-percent 10 >&2
"$B" source --memory "$MEM" --listen 127.0.0.1:0 --transport tcp --json > "$OUT/source.jsonl" 2> "$OUT/source.log" &
PIDS+=($!)
for _ in $(seq 300); do grep -q '"listening"' "$OUT/source.jsonl" 2>/dev/null && break; sleep 0.1; done
SPORT=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['port'])" "$OUT/source.jsonl")
"$B" chaos-proxy --to "127.0.0.1:$SPORT" --cuts "$CUTS" --interval-ms "$INTERVAL_MS" > "$OUT/proxy.out" 2> "$OUT/proxy.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q listening "$OUT/proxy.out" 2>/dev/null && break; sleep 0.1; done
PPORT=$(awk '{print $NF}' "$OUT/proxy.out")
# Throttled stream and thinking guest threads: the migration outlasts the cuts.
"$B" dest --connect "127.0.0.1:$PPORT" --transport tcp --touch random --threads 2 --think-us 50 \
    --background-rate 200M --verify-against "$MEM" --json --no-progress > "$OUT/dest.json" 2> "$OUT/dest.log" || true
python3 - "$OUT" "$CUTS" <<'PY'
import json, os, sys
out, cuts = sys.argv[1], int(sys.argv[2])
d = json.load(open(os.path.join(out, "dest.json")))
cut_lines = [l.strip() for l in open(os.path.join(out, "proxy.log")) if l.startswith("cut ")]
rec = d.get("recovery_ns", [])
lines = [f"{d['guest_bytes'] / 2**30:.2f} GiB over TCP through {len(cut_lines)} cuts (proxy: {', '.join(l.split(': ')[1] for l in cut_lines)})",
         f"reconnects: {len(rec)}; recovery time per reconnect (ms): " + ", ".join(f"{x / 1e6:.2f}" for x in rec),
         f"recovery p50 {sorted(rec)[len(rec) // 2] / 1e6:.2f} ms, max {max(rec) / 1e6:.2f} ms" if rec else "no reconnects",
         f"time to full copy {d['time_to_full_copy_seconds']:.2f} s, {d['demand_pages']} demand + {d['background_pages']} background pages, "
         f"{d['pages_sent_twice']} pages sent twice (re-requested after a cut)",
         f"integrity: {'OK' if d['digest_match'] and d['source_confirmed_digest'] else 'MISMATCH'} (xxh64 of every 1 MiB chunk, source confirmed); "
         f"byte for byte against the source's file: {d.get('verified_bytes')} bytes, " + ("all equal" if d.get("first_different_byte") is None and d.get("verified_bytes") else f"first difference at {d.get('first_different_byte')}")]
open(os.path.join(out, "chaos.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
ok = d["digest_match"] and d["source_confirmed_digest"] and len(cut_lines) == cuts and len(rec) >= 1 \
    and d.get("verified_bytes") == d["guest_bytes"] and d.get("first_different_byte") is None
sys.exit(0 if ok else 1)
PY
