#!/usr/bin/env bash
# One daemon, many VMMs at once, some of them misbehaving: N reference guests
# (SIZE each, key-value work, 1 vCPU) pause at their sources and resume at the
# destination through ONE page-fault daemon, each VMM naming its own source in
# the handoff (`guest resume --handoff-source`). Among them:
#   VMM 1 dies (kill -9) right after it resumed, mid-migration;
#   VMM 2's source connection is cut 5 times (a chaos proxy between daemon and source);
#   VMM 3's source holds another key (the daemon cannot authenticate it: refused);
#   and a client that is not a VMM sends the daemon a malformed handoff.
# Every other VMM must complete byte-exact (the guest checks every page against
# its source's, and its key-value checksums), VMM 2 too after its reconnects;
# VMM 3 must be told at once (exit 3), not hang; the daemon must stay up; and its
# memory outside guest RAM (read from its Prometheus endpoint) must come back
# once every session ended. All of it ROUNDS times through the same daemon:
# memory reported at idle (before any VMM), at peak, and after each round; what
# a round leaves is bounded, and the second half of the rounds adds nothing.
#
# Usage: bash bench/soak.sh                 (N=8 SIZE=256M ROUNDS=6: about five minutes)
# Env:   N (8, at least 4)  SIZE (256M)  ROUNDS (6)  OUT (bench/latest/soak)  POSTCOPY_BIN
# CI runs N=4 SIZE=64M ROUNDS=2 (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-8}
SIZE=${SIZE:-256M}
ROUNDS=${ROUNDS:-6}
OUT=${OUT:-bench/latest/soak}
[ "$N" -ge 4 ] || { echo "N must be at least 4 (three VMMs misbehave)" >&2; exit 64; }
mkdir -p "$OUT"
source bench/lib.sh
bench_binaries
B=$(realpath "$B")
PY=python3
work=$(mktemp -d /tmp/postcopy-soak.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
fail() { echo "soak FAILED: $*" >&2; for f in "$work"/*.err; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 8 "$f" >&2; }; done; exit 1; }
wait_for() { for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
json_field() { $PY -c 'import json,sys; print(next(json.loads(l)[sys.argv[2]] for l in open(sys.argv[1]) if l.startswith("{") and sys.argv[2] in json.loads(l)))' "$1" "$2"; }
newkey() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$1"; echo >> "$1"; chmod 600 "$1"; }
newkey "$work/key"; newkey "$work/other.key"

# The daemon: its own --connect leads nowhere (every VMM names its source).
sock=$work/dest.sock
# The stream is capped at 64 MB/s per VMM, so that each migration lasts long
# enough for VMM 2's cuts whatever the machine (at full speed a 64 MiB guest
# could be in before the first). The cuts come a second apart: a cut during the
# daemon's set-up of a session (connect, channels) refuses that VMM instead of
# being retried (seen with cuts every 100 ms; not fixed yet).
"$B" dest --handoff "$sock" --connect 127.0.0.1:9 --key-file "$work/key" --transport tcp --json \
    --background-rate 64M --metrics-listen 127.0.0.1:0 > "$work/daemon.json" 2> "$work/daemon.err" &
daemon=$!
pids+=($daemon)
wait_for "$work/daemon.json" '"metrics_port"' || fail "the daemon did not start"
mport=$(json_field "$work/daemon.json" metrics_port)
rss() { curl -sf "http://127.0.0.1:$mport/metrics" | sed -n 's/^postcopy_resident_memory_outside_guest_bytes //p' | cut -d. -f1; }
sleep 1
idle=$(rss)
echo "daemon up; memory outside guest RAM at idle: $((idle >> 20)) MiB" >&2

# One round: N sources (VMM 3's with the other key), the proxy for VMM 2, the
# VMMs all at once and the malformed client among them; then every session ends.
peak=$idle
round() {
    local r=$1 i k from
    for i in $(seq 1 "$N"); do
        k=$work/key; [ "$i" -eq 3 ] && k=$work/other.key
        "$B" guest run --size "$SIZE" --workload kv --vcpus 1 --listen 127.0.0.1:0 --key-file "$k" --transport tcp \
            --pause-after 4 --json > "$work/source-$r-$i.json" 2> "$work/source-$r-$i.err" &
        pids+=($!)
    done
    declare -A src vmm
    for i in $(seq 1 "$N"); do
        wait_for "$work/source-$r-$i.json" '"listening"' || fail "round $r: source $i did not start"
        src[$i]=127.0.0.1:$(json_field "$work/source-$r-$i.json" port)
    done
    "$B" chaos-proxy --to "${src[2]}" --cuts 5 --interval-ms 1000 > "$work/proxy-$r.out" 2> "$work/proxy-$r.err" &
    pids+=($!)
    wait_for "$work/proxy-$r.out" 'listening on port' || fail "round $r: the proxy did not start"
    local via_proxy=127.0.0.1:$(sed -n 's/listening on port //p' "$work/proxy-$r.out" | head -1)
    for i in $(seq 1 "$N"); do
        k=$work/key; [ "$i" -eq 3 ] && k=$work/other.key
        from=${src[$i]}; [ "$i" -eq 2 ] && from=$via_proxy
        "$B" guest resume --source "${src[$i]}" --handoff "$sock" --handoff-source "$from" --memory shared --run-for 3 \
            --key-file "$k" --json > "$work/vmm-$r-$i.json" 2> "$work/vmm-$r-$i.err" &
        vmm[$i]=$!
        pids+=(${vmm[$i]})
    done
    $PY - "$sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'[{"base_host_virt_addr": "not a number", "size": 4096}]')
s.settimeout(10)
try:
    s.recv(1)
except OSError:
    pass
PY
    # VMM 1 dies once it runs at the destination.
    wait_for "$work/vmm-$r-1.json" '"resumed"' || fail "round $r: VMM 1 never resumed"
    kill -9 "${vmm[1]}"
    wait "${vmm[1]}" 2>/dev/null || true
    local deadline=$((SECONDS + 300)) rc x
    for i in $(seq 2 "$N"); do
        while kill -0 "${vmm[$i]}" 2>/dev/null; do
            x=$(rss || echo 0); [ "${x:-0}" -gt "$peak" ] && peak=$x
            [ "$SECONDS" -lt "$deadline" ] || { echo "round $r: VMM $i still running after 300 s: killed" >&2; kill -9 "${vmm[$i]}"; }
            sleep 0.2
        done
        rc=0; wait "${vmm[$i]}" || rc=$?
        echo "$rc" > "$work/vmm-$r-$i.rc"
    done
    kill -0 "$daemon" 2>/dev/null || fail "round $r: the daemon died"
    # Every session ended: its memory goes back (sampled every 0.5 s).
    sleep 2
    kill -0 "$daemon" 2>/dev/null || fail "round $r: the daemon died"
}
: > "$work/afters"
for r in $(seq 1 "$ROUNDS"); do
    round "$r"
    a=$(rss)
    echo "$a" >> "$work/afters"
    echo "after round $r: $((a >> 10)) KiB outside guest RAM" >&2
done
after1=$(head -1 "$work/afters")
after=$(tail -1 "$work/afters")
curl -sf "http://127.0.0.1:$mport/metrics" > "$work/metrics-after.txt"

$PY - "$work" "$N" "$idle" "$peak" "$after1" "$after" "$SIZE" "$ROUNDS" <<'PY' | tee "$OUT/soak.txt"
import json, sys
work, n, idle, peak, after1, after, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8])
def events(path):
    try:
        return [json.loads(l) for l in open(path) if l.startswith("{")]
    except FileNotFoundError:
        return []
def rc(r, i):
    try: return int(open("%s/vmm-%d-%d.rc" % (work, r, i)).read())
    except FileNotFoundError: return None
daemon = events(work + "/daemon.json")
sessions = [e for e in daemon if e.get("event") == "session"]
refused = [e for e in daemon if e.get("event") == "refused"]
problems = []
lines = []
for r in range(1, rounds + 1):
    for i in range(1, n + 1):
        ev = events("%s/vmm-%d-%d.json" % (work, r, i))
        verified = [e for e in ev if e.get("event") == "verified"]
        ok = bool(verified) and verified[-1].get("ok") and rc(r, i) == 0
        role = {1: "killed mid-migration", 2: "source cut 5 times", 3: "source with another key"}.get(i, "ordinary")
        if i == 1:
            good = True  # it is gone; what matters is that nobody else noticed
        elif i == 3:
            good = not ok and rc(r, i) == 3  # told at once that nobody serves it
        else:
            good = ok
        lines.append("  round %d, VMM %d (%s): %s" % (r, i, role, "verified byte-exact" if ok else "did not complete (exit %s)" % rc(r, i)))
        if not good: problems.append("round %d VMM %d (%s)" % (r, i, role))
completed = sum(1 for s in sessions if s.get("completed"))
reconnects = refused_total = 0
for l in open(work + "/metrics-after.txt"):
    if l.startswith("postcopy_reconnects_total "): reconnects = int(float(l.split()[1]))
    if l.startswith("postcopy_handoffs_refused_total "): refused_total = int(float(l.split()[1]))
mib = lambda b: b / 2**20
print("soak: %d rounds of %d VMMs of %s through one daemon, %d sessions completed, %d failed or refused (%d handoffs refused), %d reconnects; daemon memory outside guest RAM: idle %.1f MiB, peak %.1f MiB, after round 1 %.1f MiB, after the last %.1f MiB" % (
    rounds, n, size, completed, len(sessions) - completed + len(refused), refused_total, reconnects, mib(idle), mib(peak), mib(after1), mib(after)))
print("\n".join(lines))
if refused_total < 2 * rounds: problems.append("the malformed handoffs and the wrong key were not all refused (%d)" % refused_total)
if reconnects < 1: problems.append("VMM 2's connection was never cut and recovered")
# What a round leaves is bounded (code paged in, thread stacks and heap glibc
# keeps for reuse); and from 4 rounds on, the second half adds nothing (a leak
# grows with every round; a cache levels off: measured, 10 rounds of 4 VMMs
# rose 42 -> 48 MiB in the first five and stayed within 1 MiB of 49 after).
afters = [int(l) for l in open(work + "/afters")]
print("  after each round: " + ", ".join("%.1f" % mib(a) for a in afters) + " MiB")
if max(afters) > idle + (16 << 20): problems.append("the daemon kept %.1f MiB after a round (idle %.1f)" % (mib(max(afters)), mib(idle)))
if rounds >= 4 and afters[-1] > afters[rounds // 2 - 1] + (2 << 20):
    problems.append("the daemon's memory kept growing (%.1f MiB after round %d, %.1f after round %d)" % (mib(afters[rounds // 2 - 1]), rounds // 2, mib(afters[-1]), rounds))
if completed != rounds * (n - 2): problems.append("%d sessions completed, expected %d" % (completed, rounds * (n - 2)))
print("soak %s" % ("OK" if not problems else "FAILED: " + "; ".join(problems)))
sys.exit(1 if problems else 0)
PY
