#!/usr/bin/env bash
# Postcopy migration demo on loopback: a source serves a guest memory file, a
# destination resumes at once on empty memory, 4 guest threads touch every page in
# random order (demand faults) while the rest streams in the background, and both
# sides verify the RAM digest at the end.
#
# Usage: scripts/demo.sh [SIZE] [THREADS]     (defaults: 1G 4)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1G}
THREADS=${2:-4}
PORT=${PORT:-7070}
# A fresh machine of this project's kind has the toolchain in /opt/swift.
[ -x /opt/swift/usr/bin/swift ] && ! command -v swift >/dev/null && export PATH="/opt/swift/usr/bin:$PATH"
if ! command -v swift >/dev/null; then
    echo "error: swift (6.0 or newer) is not on PATH" >&2
    exit 2
fi
swift build -c release --product postcopy
B=.build/release/postcopy
MEM=/dev/shm/postcopy-demo.$$.ram
SRC_OUT=$(mktemp)
SRC_PID=
cleanup() { [ -n "$SRC_PID" ] && kill "$SRC_PID" 2>/dev/null; rm -f "$MEM" "$SRC_OUT"; }
trap cleanup EXIT

"$B" make-memory "$MEM" --size "$SIZE" --zero-percent 10
"$B" source --memory "$MEM" --listen "127.0.0.1:$PORT" --transport tcp > "$SRC_OUT" &
SRC_PID=$!
for _ in $(seq 100); do grep -q "listening on port" "$SRC_OUT" 2>/dev/null && break; sleep 0.1; done
echo "source: $(head -1 "$SRC_OUT")"
echo
"$B" dest --connect "127.0.0.1:$PORT" --transport auto --touch random --threads "$THREADS"
wait "$SRC_PID"; SRC_PID=
echo
tail -n +2 "$SRC_OUT"
