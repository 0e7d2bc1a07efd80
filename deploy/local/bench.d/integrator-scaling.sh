#!/usr/bin/env bash
# crm-integrator replica scaling: 1, 2 and 4 integrators (release build, adaptive concurrency, real
# NATS from .run/env) draining the same pre-filled ingest stream into a CRM capped at 200 concurrent
# requests with 20 ms latency (crm-mock --latency-ms 20 --max-concurrency 200: 429 with
# Retry-After: 1 beyond the cap), no other faults. Per run: creates/s and how many 429s the fleet
# drew; the fleet should reach the CRM's capacity (200 / 0.020 s = 10,000/s) without 429 storms.
# Prints one Markdown section on stdout; progress on stderr.
#   COUNT=50000 REPLICAS="1 2 4" deploy/local/bench.d/integrator-scaling.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
COUNT=${COUNT:-50000}
REPLICAS=${REPLICAS:-"1 2 4"}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-600}
MOCK_FLAGS="--latency-ms 20 --max-concurrency 200"
CAPACITY=10000
log() { echo "[integrator-scaling bench] $*" >&2; }
RUN_ID="$(date +%s)_$$"
WORK=$(mktemp -d)
PIDS=()
NAMESPACES=()

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bench_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${NAMESPACES[@]}"; do
    target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --delete >&2 || true
  done
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # with integrator-bench-fill; --workspace: one feature set

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
ROWS=()
for n in $REPLICAS; do
  ns="bench_scale_${n}_$RUN_ID"
  NAMESPACES+=("$ns")
  log "filling $ns with $COUNT records"
  target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --count "$COUNT" >&2
  port=$(free_port)
  # shellcheck disable=SC2086
  target/release/crm-mock --listen "127.0.0.1:$port" $MOCK_FLAGS >"$WORK/mock-$n.log" 2>&1 &
  mock=$!
  PIDS+=("$mock")
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
  log "draining with $n integrator(s)"
  replicas=()
  metrics=()
  for i in $(seq 1 "$n"); do
    metrics+=("$(free_port)")
    SYNC_NAMESPACE="$ns" CRM_URL="http://127.0.0.1:$port" RUST_LOG=warn \
      target/release/crm-integrator --metrics-addr "127.0.0.1:${metrics[-1]}" 2>"$WORK/integrator-$n-$i.log" &
    replicas+=($!)
    PIDS+=($!)
  done
  secs=$(target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --wait-drained --timeout-secs "$DRAIN_TIMEOUT")
  stats=$(curl -fs "http://127.0.0.1:$port/stats")
  created=$(jq -r .created <<<"$stats")
  limited=$(jq -r .injected.concurrency_limited <<<"$stats")
  duplicates=$(jq -r .duplicate_effects <<<"$stats")
  peak=$(jq -r '.concurrency_peak // "n/a"' <<<"$stats")
  pauses=0
  for m in "${metrics[@]}"; do
    p=$(curl -fs "http://127.0.0.1:$m/metrics" | awk '/^crm_integrator_pauses_total / {print $2}')
    pauses=$((pauses + ${p:-0}))
  done
  rate=$(echo "scale=0; $created / $secs" | bc -l)
  ratio=$(echo "scale=2; $rate / $CAPACITY" | bc -l)
  ROWS+=("| $n | $COUNT | $secs | $rate | $ratio | $limited | $pauses | $peak | $duplicates |")
  for pid in "${replicas[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${replicas[@]}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "$mock" 2>/dev/null || true
  wait "$mock" 2>/dev/null || true
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

cat <<MD
## integrator-scaling: crm-integrator replicas against a capped CRM

Integrator replicas (release build, adaptive concurrency) sharing one durable consumer, each run
draining $COUNT pre-filled records of a fresh namespace on the local nats-server into a fresh
\`crm-mock $MOCK_FLAGS\` (capacity 200 / 0.020 s = $CAPACITY creates/s; beyond 200 concurrent
requests it answers 429 with \`Retry-After: 1\`, which pauses the whole fleet). Everything shares this
machine's $(nproc) cores. Load average before/after: $LOAD_BEFORE / $LOAD_AFTER.

| integrators | records | seconds | creates/s | of capacity | 429s (cap) | fleet pauses called | CRM concurrency peak | duplicates |
|---|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${ROWS[@]}")

- 429s are crm-mock's own count of requests over the cap; "fleet pauses called" adds up the
  replicas' \`crm_integrator_pauses_total\` (a pause one replica calls holds them all).
- Command: \`COUNT=$COUNT REPLICAS="$REPLICAS" deploy/local/bench.d/integrator-scaling.sh\`
  (or \`BENCH_ONLY=integrator-scaling deploy/local/bench.sh\`).
MD
