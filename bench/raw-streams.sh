#!/usr/bin/env bash
# The two raw loopback TCP stream baselines against each other, alternated:
# 1 GiB in 512 KiB writes from and into one hot buffer at each end
# (cache-resident), and the same walking 1 GiB of allocated memory at each end
# (memory to memory, as guest RAM moves). Prints each round's GiB/s and the
# memory-to-memory stream over the hot one, then the median and spread: how far
# raw TCP itself, moving memory, stays from the hot-buffer stream on this
# machine (issue 13's stream bar; bench/README.md, "Install paths").
#
# Usage: bash bench/raw-streams.sh [ROUNDS]     (ROUNDS 10: about a minute)
# Env:   POSTCOPY_BIN (a postcopy binary instead of building this tree's), WRITE_SIZE (512K)
# Results: bench/results/raw-streams.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-10}; W=${WRITE_SIZE:-512K}
if [ -n "${POSTCOPY_BIN:-}" ]; then B=$POSTCOPY_BIN; else
    export PATH="/opt/swift/usr/bin:$PATH"
    swift build -c release --product postcopy >&2
    B=.build/release/postcopy
fi
mkdir -p bench/results
OUT=bench/results/raw-streams.jsonl
: > "$OUT"
for i in $(seq "$ROUNDS"); do
    hot=$("$B" baseline tcp-stream --write-size "$W" --bytes 1G --json)
    mem=$("$B" baseline tcp-stream --write-size "$W" --bytes 1G --span 1G --json)
    printf '{"round": %d, "hot": %s, "memory": %s}\n' "$i" "$hot" "$mem" >> "$OUT"
done
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
gib = lambda j: j["bytes_per_second"] / 2**30
ratios = []
for r in rows:
    h, m = gib(r["hot"]), gib(r["memory"])
    ratios.append(m / h)
    print(f"round {r['round']}: hot {h:.2f} GiB/s, memory to memory {m:.2f} GiB/s, memory/hot {m / h:.2f}")
s = sorted(ratios)
print(f"memory/hot over {len(s)} rounds: median {s[len(s) // 2]:.2f}, range {s[0]:.2f}-{s[-1]:.2f}, "
      f"under 0.8 in {sum(x < 0.8 for x in s)} of {len(s)}")
PY
