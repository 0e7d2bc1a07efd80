#!/usr/bin/env bash
# crm-integrator throughput, one replica, release build, real NATS (.run/env) and crm-mock:
#  (a) no faults, no latency: records/s draining a pre-filled ingest stream, beside the plain HTTP
#      rate wrk gets from the same crm-mock in the same run (target >= 50%);
#  (b) --latency-ms 20 --max-concurrency 200 --failure-rate 0.1: successful creates/s with
#      --concurrency 256 and with adaptive concurrency, vs capacity 200/0.020*0.9 = 9000/s (>= 90%).
# Prints one Markdown section on stdout; progress on stderr.
#   COUNT_A=200000 COUNT_B=100000 deploy/local/bench.d/crm-integrator.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
COUNT_A=${COUNT_A:-200000}
COUNT_B=${COUNT_B:-100000}
WRK_SECS=${WRK_SECS:-10}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-600}
RUN_ID="$(date +%s)_$$"
WORK=$(mktemp -d)
PIDS=()
NAMESPACES=()

log() { echo "[crm-integrator bench] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${NAMESPACES[@]}"; do
    target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --delete >&2 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild

MOCK_PID=
start_mock() {
  MOCK_PORT=$(free_port)
  target/release/crm-mock --listen "127.0.0.1:$MOCK_PORT" "$@" >"$WORK/mock.log" 2>&1 &
  MOCK_PID=$!
  PIDS+=("$MOCK_PID")
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$MOCK_PORT/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "crm-mock did not come up"; cat "$WORK/mock.log" >&2; return 1
}
stop_mock() { kill "$MOCK_PID" 2>/dev/null || true; wait "$MOCK_PID" 2>/dev/null || true; }
mock_stat() { curl -fs "http://127.0.0.1:$MOCK_PORT/stats" | jq -r "$1"; }

# Fills a fresh namespace with $2 records, runs one integrator with flags $3.. until the consumer is
# drained; sets SECS, RSS_KB, LOOKUPS.
drain_run() {
  local ns="$1" count="$2"; shift 2
  NAMESPACES+=("$ns")
  log "filling $ns with $count records"
  target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --count "$count" >&2
  local metrics_port; metrics_port=$(free_port)
  log "draining with: crm-integrator $*"
  SYNC_NAMESPACE="$ns" CRM_URL="http://127.0.0.1:$MOCK_PORT" RUST_LOG=warn \
    target/release/crm-integrator --metrics-addr "127.0.0.1:$metrics_port" "$@" 2>"$WORK/integrator.log" &
  local pid=$!
  PIDS+=("$pid")
  local nats_before mock_before
  nats_before=$(cpu_ticks "$NATS_PID"); mock_before=$(cpu_ticks "$MOCK_PID")
  SECS=$(target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --wait-drained --timeout-secs "$DRAIN_TIMEOUT")
  RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  CPU_US="integrator $(us_per_record "$(cpu_ticks "$pid")" "$count") µs, nats-server $(us_per_record $(( $(cpu_ticks "$NATS_PID") - nats_before )) "$count") µs, crm-mock $(us_per_record $(( $(cpu_ticks "$MOCK_PID") - mock_before )) "$count") µs"
  curl -fs "http://127.0.0.1:$metrics_port/metrics" >"$WORK/metrics.txt" || true
  LIMIT=$(awk '/^crm_integrator_concurrency_limit / {print $2}' "$WORK/metrics.txt")
  kill -TERM "$pid"; wait "$pid" || true
}
ratio() { echo "scale=3; $1 / $2" | bc -l; }
# CPU time (clock ticks) a process has used so far; 0 when it is not ours to read.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
NATS_PID=$(cat .run/nats/nats.pid 2>/dev/null || echo 0)
TICKS=$(getconf CLK_TCK)
us_per_record() { echo "scale=0; $1 * 1000000 / $TICKS / $2" | bc -l; }
rate() { echo "scale=0; $1 / $2" | bc -l; }
phase_ms() { # mean ms of one phase from the last metrics scrape
  awk -v p="$1" '$0 ~ "phase_seconds_sum\\{phase=\""p"\"" {s=$2} $0 ~ "phase_seconds_count\\{phase=\""p"\"" {c=$2} END {if (c>0) printf "%.1f", s/c*1000; else print "n/a"}' "$WORK/metrics.txt"
}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# (a) ---------------------------------------------------------------------------------------------
start_mock
log "wrk: POST /customers for ${WRK_SECS}s"
cat >"$WORK/post.lua" <<'LUA'
local n = 0
local prefix = tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  n = n + 1
  local body = string.format('{"id":"w%s-%d","first_name":"Bench","last_name":"Customer","email":"c%d@bench.example.com","phone":"+1 555 0100","attributes":{"segment":"b"}}', prefix, n, n)
  return wrk.format(nil, "/customers", nil, body)
end
LUA
WRK_CMD="wrk -t2 -c64 -d${WRK_SECS}s -s post.lua http://127.0.0.1:$MOCK_PORT/customers"
WRK_RPS=$(cd "$WORK" && wrk -t2 -c64 -d"${WRK_SECS}s" -s post.lua "http://127.0.0.1:$MOCK_PORT/customers" | awk '/Requests\/sec/ {printf "%d", $2}')
curl -fs -X POST "http://127.0.0.1:$MOCK_PORT/reset" >/dev/null
drain_run "bench_int_a_$RUN_ID" "$COUNT_A"
A_SECS=$SECS; A_RSS=$RSS_KB; A_LIMIT=${LIMIT:-n/a}; A_CPU=$CPU_US
A_CREATED=$(mock_stat .created); A_DUP=$(mock_stat .duplicate_effects)
A_RATE=$(rate "$COUNT_A" "$A_SECS")
A_PHASES="claim $(phase_ms claim) ms, CRM request $(phase_ms crm_request) ms, confirm $(phase_ms confirm) ms ∥ outcome $(phase_ms publish_outcome) ms, ack $(phase_ms ack) ms"
stop_mock

# (b) ---------------------------------------------------------------------------------------------
B_MOCK_FLAGS="--latency-ms 20 --max-concurrency 200 --failure-rate 0.1"
CAPACITY=9000
# shellcheck disable=SC2086
start_mock $B_MOCK_FLAGS
# What a plain HTTP client gets from this mock: wrk just under the cap (over it, 429s).
B_WRK_CONNS=190
log "wrk: POST /customers, $B_WRK_CONNS connections, for ${WRK_SECS}s"
B_WRK_OUT=$(cd "$WORK" && wrk -t2 -c"$B_WRK_CONNS" -d"${WRK_SECS}s" -s post.lua "http://127.0.0.1:$MOCK_PORT/customers")
B_WRK_RPS=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$B_WRK_OUT")
B_WRK_TOTAL=$(awk '/requests in/ {print $1}' <<<"$B_WRK_OUT")
B_WRK_NON2XX=$(awk '/Non-2xx/ {print $NF}' <<<"$B_WRK_OUT")
B_WRK_LATENCY=$(awk '/Latency/ {print $2; exit}' <<<"$B_WRK_OUT")
B_WRK_OK_RATE=$(echo "scale=0; $B_WRK_RPS * ($B_WRK_TOTAL - ${B_WRK_NON2XX:-0}) / $B_WRK_TOTAL" | bc -l)
curl -fs -X POST "http://127.0.0.1:$MOCK_PORT/reset" >/dev/null
drain_run "bench_int_b_$RUN_ID" "$COUNT_B" --concurrency 256
B_SECS=$SECS; B_RSS=$RSS_KB
B_CREATED=$(mock_stat .created); B_DUP=$(mock_stat .duplicate_effects)
B_LIMITED=$(mock_stat .injected.concurrency_limited); B_ERR=$(mock_stat .injected.error)
B_RATE=$(rate "$B_CREATED" "$B_SECS")
B_PHASES="claim $(phase_ms claim) ms, CRM request $(phase_ms crm_request) ms, confirm $(phase_ms confirm) ms ∥ outcome $(phase_ms publish_outcome) ms, ack $(phase_ms ack) ms"
stop_mock

# shellcheck disable=SC2086
start_mock $B_MOCK_FLAGS
drain_run "bench_int_c_$RUN_ID" "$COUNT_B"
C_SECS=$SECS; C_RSS=$RSS_KB; C_LIMIT=${LIMIT:-n/a}
C_CREATED=$(mock_stat .created); C_DUP=$(mock_stat .duplicate_effects)
C_LIMITED=$(mock_stat .injected.concurrency_limited)
C_RATE=$(rate "$C_CREATED" "$C_SECS")
stop_mock
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

cat <<MD
## crm-integrator

One replica (release build) draining a pre-filled ingest stream on the local nats-server into
crm-mock, everything on this machine's $(nproc) cores (NATS, mock, integrator and load generator share them).
Per record: 4 NATS round trips (claim = KV create, then confirm KV update ∥ outcome publish, then
double ack) plus one CRM request; pulls are batched. Load average before/after: $LOAD_BEFORE / $LOAD_AFTER.

| scenario | records | seconds | rate | target | ratio | duplicates | peak RSS |
|---|---|---|---|---|---|---|---|
| (a) no faults, no latency, adaptive concurrency | $COUNT_A | $A_SECS | $A_RATE records/s | ≥ 50% of wrk's $WRK_RPS req/s | $(ratio "$A_RATE" "$WRK_RPS") | $A_DUP | $((A_RSS / 1024)) MiB |
| (b) 20 ms, cap 200, 10% errors, \`--concurrency 256\` | $COUNT_B | $B_SECS | $B_RATE creates/s | ≥ 90% of $CAPACITY/s | $(ratio "$B_RATE" "$CAPACITY") | $B_DUP | $((B_RSS / 1024)) MiB |
| (b) same, adaptive (no \`--concurrency\`) | $COUNT_B | $C_SECS | $C_RATE creates/s | ≥ 90% of $CAPACITY/s | $(ratio "$C_RATE" "$CAPACITY") | $C_DUP | $((C_RSS / 1024)) MiB |

- (a) plain HTTP rate: \`$WRK_CMD\` (POST of a customer, same mock, same run): $WRK_RPS req/s.
  Created by the integrator: $A_CREATED; adaptive limit at the end: $A_LIMIT.
  Mean time per phase: $A_PHASES.
  CPU per record: $A_CPU (the $(nproc) cores give $(( $(nproc) * 1000000 / (WRK_RPS / 2) )) µs per record at 50% of wrk's rate).
- (b) mock: \`crm-mock $B_MOCK_FLAGS\`. Fixed 256: $B_CREATED created, $B_ERR injected errors retried,
  $B_LIMITED answered 429 for the concurrency cap (each 429 pauses the fleet for its Retry-After and
  lowers the replica's ceiling to what was in flight). Mean time per phase: $B_PHASES.
  Adaptive: $C_CREATED created, $C_LIMITED concurrency-cap 429s, limit at the end $C_LIMIT.
  Plain HTTP reference on the same mock: \`wrk -t2 -c$B_WRK_CONNS\` got $B_WRK_RPS req/s at $B_WRK_LATENCY mean latency, of which
  $B_WRK_OK_RATE/s succeeded ($(ratio "$B_WRK_OK_RATE" "$CAPACITY") of $CAPACITY/s): what a load generator with no state reaches here.
  The replica reaches $(ratio "$B_RATE" "$B_WRK_OK_RATE") (fixed) and $(ratio "$C_RATE" "$B_WRK_OK_RATE") (adaptive) of that.
- Command: \`COUNT_A=$COUNT_A COUNT_B=$COUNT_B deploy/local/bench.d/crm-integrator.sh\`
  (or \`BENCH_ONLY=crm-integrator deploy/local/bench.sh\`).
MD
