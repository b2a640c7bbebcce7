#!/usr/bin/env bash
# Two hosts on one machine: a migration between two network namespaces joined
# by a veth pair (TCP over 10.77.0.0/24, no loopback anywhere), set up as
# README's "Between two hosts" says, step by step where a namespace can stand
# in for a host:
#   source host (netns pc-src, 10.77.0.1): the reference guest runs a key-value
#     workload and serves its RAM on 10.77.0.1:7000; it pauses by itself after
#     PAUSE_AFTER seconds (an operator would type "migrate");
#   destination host (netns pc-dst, 10.77.0.2): the page-fault daemon (as the
#     systemd unit in contrib/ starts it) and the VMM (the reference guest's
#     resume side: shared memory handed over the daemon's socket).
# Passes when the daemon's session completed, its digest matched the source's,
# and the resumed guest verified every page against the source. Needs root
# (ip netns); cleans up after itself.
#
# Usage: bash scripts/two-hosts-test.sh [SIZE]      (default 256M; about 30 s)
# Env:   POSTCOPY_BIN (default .build/debug/postcopy)  PAUSE_AFTER (3)  RUN_FOR (4)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-256M}
B=$(realpath "${POSTCOPY_BIN:-.build/debug/postcopy}")
PAUSE_AFTER=${PAUSE_AFTER:-3}
RUN_FOR=${RUN_FOR:-4}
tag=$$
SRC=pc-src-$tag DST=pc-dst-$tag
work=$(mktemp -d /tmp/postcopy-two-hosts.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$SRC" 2>/dev/null || true
    ip netns del "$DST" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "two-hosts test FAILED: $*" >&2; for f in "$work"/*.err; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }

if ! ip netns add "$SRC" 2>/dev/null; then
    echo "SKIP: two-hosts test (cannot create network namespaces here: not root, or no netns support)"
    exit 0
fi
ip netns add "$DST"
ip link add "vs$tag" type veth peer name "vd$tag"
ip link set "vs$tag" netns "$SRC"
ip link set "vd$tag" netns "$DST"
ip -n "$SRC" addr add 10.77.0.1/24 dev "vs$tag"
ip -n "$DST" addr add 10.77.0.2/24 dev "vd$tag"
for ns in "$SRC" "$DST"; do ip -n "$ns" link set lo up; done
ip -n "$SRC" link set "vs$tag" up
ip -n "$DST" link set "vd$tag" up

# The shared key: made once, copied to both hosts (here: one file).
key=$work/key
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$key"; echo >> "$key"
chmod 600 "$key"

# Source host.
ip netns exec "$SRC" "$B" guest run --size "$SIZE" --workload kv --vcpus 2 --listen 10.77.0.1:7000 \
    --key-file "$key" --transport tcp --pause-after "$PAUSE_AFTER" --json > "$work/source.json" 2> "$work/source.err" &
pids+=($!)
for _ in $(seq 300); do grep -q '"listening"' "$work/source.json" 2>/dev/null && break; sleep 0.1; done
grep -q '"listening"' "$work/source.json" || fail "the source guest did not start"

# Destination host: the daemon, then the VMM handing its memory over.
sock=$work/dest.sock
ip netns exec "$DST" "$B" dest --handoff "$sock" --connect 10.77.0.1:7000 --key-file "$key" --transport auto \
    --once --json > "$work/daemon.json" 2> "$work/daemon.err" &
daemon=$!
pids+=($daemon)
for _ in $(seq 300); do grep -q '"listening"' "$work/daemon.json" 2>/dev/null && break; sleep 0.1; done
grep -q '"listening"' "$work/daemon.json" || fail "the daemon did not start"
ip netns exec "$DST" "$B" guest resume --source 10.77.0.1:7000 --handoff "$sock" --memory shared \
    --run-for "$RUN_FOR" --key-file "$key" --json > "$work/guest.json" 2> "$work/guest.err" || fail "the destination guest failed"
wait "$daemon" || fail "the daemon exited with $?"

python3 - "$work/daemon.json" "$work/guest.json" <<'PY' || fail "see above"
import json, sys
def events(path):
    out = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out
daemon, guest = events(sys.argv[1]), events(sys.argv[2])
sessions = [e for e in daemon if e.get("event") == "session"]
verified = [e for e in guest if e.get("event") == "verified"]
assert sessions, "no session report from the daemon"
s = sessions[-1]
assert s.get("completed"), "the daemon's session did not complete: %s" % s.get("error")
assert s.get("transport", "").startswith("tcp"), "transport %s" % s.get("transport")
assert verified and verified[-1].get("ok"), "the guest did not verify its memory: %s" % verified
print("two hosts (netns + veth, TCP 10.77.0.1 -> 10.77.0.2): %s migrated over %s, %d demand + %d background pages, time to full copy %.3f s, every page verified" % (
    "guest", s["transport"], s["demand_pages"], s["background_pages"], s.get("time_to_full_copy_seconds") or -1))
PY
