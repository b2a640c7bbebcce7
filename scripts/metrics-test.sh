#!/usr/bin/env bash
# The daemon's Prometheus endpoint, scraped during a real migration: a source
# guest (256 MiB, key-value work) behind a proxy that cuts the connection 3
# times, the daemon with --metrics-listen, and a task guest with paravirtual
# async page faults resumed through it. /metrics is scraped before, every
# 200 ms during, and after the migration; each scrape must parse with the
# Prometheus text parser (python3-prometheus-client, installed if missing) and
# the counters must move: sessions active then completed, pages by class, bytes
# on the wire, fault service times, reconnects and their duration, APF events,
# the daemon's memory outside guest RAM. Then the source's endpoint (postcopy
# source --metrics-listen): pages served, bytes sent, the session completed.
#
# Usage: bash scripts/metrics-test.sh        (about 20 s)
# Env:   POSTCOPY_BIN (default .build/debug/postcopy)
set -euo pipefail
cd "$(dirname "$0")/.."
B=$(realpath "${POSTCOPY_BIN:-.build/debug/postcopy}")
# The parser: Debian's package, for Debian's python (another python3 may come
# first on PATH).
PY=python3
if ! $PY -c "import prometheus_client" 2>/dev/null; then
    PY=/usr/bin/python3
    if ! $PY -c "import prometheus_client" 2>/dev/null; then
        echo "installing python3-prometheus-client (the test's Prometheus text parser)..." >&2
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-prometheus-client >&2
    fi
fi
work=$(mktemp -d /tmp/postcopy-metrics.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
fail() { echo "metrics test FAILED: $*" >&2; for f in "$work"/*.err; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done; exit 1; }
wait_for() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

key=$work/key
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$key"; echo >> "$key"; chmod 600 "$key"
"$B" guest run --size 256M --workload kv --vcpus 1 --listen 127.0.0.1:0 --key-file "$key" --transport tcp \
    --pause-after 2 --metrics-listen 127.0.0.1:0 --json > "$work/source.json" 2> "$work/source.err" &
pids+=($!)
wait_for "$work/source.json" '"listening"' || fail "the source guest did not start"
src_port=$(python3 -c 'import json,sys; print(next(json.loads(l)["port"] for l in open(sys.argv[1]) if "listening" in l))' "$work/source.json")
guest_metrics_port=$(python3 -c 'import json,sys; print(next(json.loads(l)["metrics_port"] for l in open(sys.argv[1]) if "listening" in l))' "$work/source.json")
"$B" chaos-proxy --to "127.0.0.1:$src_port" --cuts 3 --interval-ms 400 > "$work/proxy.out" 2> "$work/proxy.err" &
pids+=($!)
wait_for "$work/proxy.out" 'listening on port' || fail "the proxy did not start"
proxy_port=$(sed -n 's/listening on port //p' "$work/proxy.out" | head -1)
sock=$work/dest.sock
"$B" dest --handoff "$sock" --connect "127.0.0.1:$proxy_port" --key-file "$key" --transport tcp --once --json \
    --metrics-listen 127.0.0.1:0 --background-rate 64M > "$work/daemon.json" 2> "$work/daemon.err" &
daemon=$!
pids+=($daemon)
wait_for "$work/daemon.json" '"metrics_port"' || fail "the daemon did not start its metrics endpoint"
metrics_port=$(python3 -c 'import json,sys; print(next(json.loads(l)["metrics_port"] for l in open(sys.argv[1]) if "metrics_port" in l))' "$work/daemon.json")

# Scrapes: one before, then every 200 ms until the daemon exits, and none after
# (it exits with --once); each saved for the checks below.
scrape() { curl -sf "http://127.0.0.1:$metrics_port/metrics" -o "$work/scrape-$1.txt"; }
scrape 0 || fail "no /metrics before the migration"
"$B" guest resume --source "127.0.0.1:$src_port" --handoff "$sock" --memory shared --run-for 4 --key-file "$key" \
    --tasks 8 --apf --json > "$work/guest.json" 2> "$work/guest.err" &
guest=$!
pids+=($guest)
n=1
# (The reference guest's page server too, while it serves: it exits once done.)
while kill -0 "$daemon" 2>/dev/null; do
    scrape "$n" && n=$((n + 1))
    curl -sf "http://127.0.0.1:$guest_metrics_port/metrics" -o "$work/guest-scrape.tmp" && mv "$work/guest-scrape.tmp" "$work/guest-scrape.txt"
    sleep 0.2
done
wait "$guest" || fail "the destination guest failed"
wait "$daemon" || fail "the daemon failed"

# The source's endpoint: a memory file served with --metrics-listen, taken
# whole by a destination, scraped after.
"$B" make-memory "$work/mem" --size 64M --zero-percent 25 > /dev/null
"$B" source --memory "$work/mem" --listen 127.0.0.1:0 --key-file "$key" --transport tcp --metrics-listen 127.0.0.1:0 \
    --serve-forever --json > "$work/src2.json" 2> "$work/src2.err" &
src2=$!
pids+=($src2)
wait_for "$work/src2.json" '"metrics_port"' || fail "the source did not start its metrics endpoint"
src2_port=$($PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["port"])' "$work/src2.json")
src2_metrics=$($PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["metrics_port"])' "$work/src2.json")
"$B" dest --connect "127.0.0.1:$src2_port" --key-file "$key" --transport tcp --touch random --json --no-progress \
    > "$work/dest2.json" 2> "$work/dest2.err" || fail "the destination of the source's test failed"
sleep 1.2  # the source's counters are read twice a second
curl -sf "http://127.0.0.1:$src2_metrics/metrics" -o "$work/source-scrape.txt" || fail "no /metrics at the source"
kill "$src2" 2>/dev/null || true

$PY - "$work" "$n" <<'PY' || fail "see above"
import glob, json, os, sys
from prometheus_client.parser import text_string_to_metric_families
work, n = sys.argv[1], int(sys.argv[2])
def parse(path):
    values = {}
    for fam in text_string_to_metric_families(open(path).read()):  # raises on a malformed exposition
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values
scrapes = [parse("%s/scrape-%d.txt" % (work, i)) for i in range(n)]
def v(s, name, **labels): return s.get((name, tuple(sorted(labels.items()))), 0)
first, last = scrapes[0], scrapes[-1]
checks = [
    ("a session was active during the migration", max(v(s, "postcopy_sessions_active") for s in scrapes) >= 1),
    ("pages arrived by demand", v(last, "postcopy_pages_total", **{"class": "demand"}) > v(first, "postcopy_pages_total", **{"class": "demand"})),
    ("pages arrived in the background", v(last, "postcopy_pages_total", **{"class": "background"}) > 0),
    ("bytes came over the wire", v(last, "postcopy_wire_bytes_total", direction="received") > 1 << 20),
    ("bytes were decrypted (encryption on: the default with a key)", v(last, "postcopy_encrypted_bytes_total", direction="received") > 1 << 20),
    ("requests were encrypted", v(last, "postcopy_encrypted_bytes_total", direction="sent") > 0),
    ("faults were served (histogram)", v(last, "postcopy_fault_service_seconds_count") > 0),
    ("the connection was recovered", v(last, "postcopy_reconnects_total") >= 1 and v(last, "postcopy_recovery_seconds_count") >= 1),
    ("async page faults: not present", v(last, "postcopy_apf_events_total", kind="not_present") > 0),
    ("async page faults: ready", v(last, "postcopy_apf_events_total", kind="ready") > 0),
    ("the daemon's own memory is shown", v(last, "postcopy_resident_memory_outside_guest_bytes") > 1 << 20),
    ("the counters moved during the migration", len({v(s, "postcopy_pages_total", **{"class": "background"}) for s in scrapes}) > 2),
]
bad = [c for c, ok in checks if not ok]
for c, ok in checks: print("  %s %s" % ("ok  " if ok else "FAIL", c))
daemon = [json.loads(l) for l in open(work + "/daemon.json") if l.startswith("{")]
session = [e for e in daemon if e.get("event") == "session"]
assert session and session[-1]["completed"], "the migration did not complete"
print("metrics: %d scrapes parsed; pages demand %d, background %d; %d reconnects; %d faults in the histogram" % (
    n, v(last, "postcopy_pages_total", **{"class": "demand"}), v(last, "postcopy_pages_total", **{"class": "background"}),
    v(last, "postcopy_reconnects_total"), v(last, "postcopy_fault_service_seconds_count")))
src = parse(work + "/source-scrape.txt")
src_checks = [
    ("source: pages served by demand", v(src, "postcopy_source_pages_total", **{"class": "demand"}) > 0),
    ("source: pages served in the background", v(src, "postcopy_source_pages_total", **{"class": "background"}) > 0),
    ("source: bytes sent", v(src, "postcopy_source_wire_bytes_total", direction="sent") > 32 << 20),
    ("source: the session completed", v(src, "postcopy_source_sessions_completed_total") == 1),
    ("source: bytes encrypted", v(src, "postcopy_source_encrypted_bytes_total", direction="sent") > 32 << 20),
]
gs = parse(work + "/guest-scrape.txt") if os.path.exists(work + "/guest-scrape.txt") else {}
src_checks += [
    ("reference guest's page server: pages served", v(gs, "postcopy_source_pages_total", **{"class": "demand"}) + v(gs, "postcopy_source_pages_total", **{"class": "background"}) > 0),
]
for c, ok in src_checks: print("  %s %s" % ("ok  " if ok else "FAIL", c))
bad += [c for c, ok in src_checks if not ok]
assert not bad, "counters that did not move: %s" % bad
PY
