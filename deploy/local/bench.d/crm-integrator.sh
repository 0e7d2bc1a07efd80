#!/usr/bin/env bash
# crm-integrator, one replica, release build, against crm-mock and fair references measured in the
# same run on a nats-server of its own ($NATS_SERVER_BIN from .run/env, file store in a temp dir):
#  (a) instant CRM: records/s draining a pre-filled ingest stream, vs references (1) and (2)
#      running together (target >= 70%);
#  (b) --latency-ms 20 --max-concurrency 200 --failure-rate 0.1: creates/s, vs reference (1)
#      against the same cap (target >= 90%);
#  (c) 20,000 rows at --latency-ms 5: goodput with 20% 5xx + 5% 429 (Retry-After 1) + 2% 30-s
#      hangs vs without faults (target >= 50%);
#  (d) libs/e2e/testdata/MOCK_DATA.csv through csv-reader with those faults (target: drained < 60 s).
# Reference (1) `crm-reference`: the integrator's CrmClient, Idempotency-Key, concurrency, retries;
# no NATS. Reference (2) `jetstream-reference`: pull, publish an outcome with a dedup id, ack; no CRM.
# Each figure is the median of RUNS (3) runs, integrator and references alternating.
# Prints one Markdown section on stdout; progress on stderr.
#   COUNT_A=100000 COUNT_B=50000 RUNS=3 deploy/local/bench.d/crm-integrator.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
COUNT_A=${COUNT_A:-100000}
COUNT_B=${COUNT_B:-50000}
COUNT_C=${COUNT_C:-20000}
RUNS=${RUNS:-3}
REF_CONCURRENCY=${REF_CONCURRENCY:-256}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-600}
NATS_BIN=${NATS_SERVER_BIN:?NATS_SERVER_BIN must name the pinned nats-server (.run/env)}
WORK=$(mktemp -d)
PIDS=()
B=target/release
TICKS=$(getconf CLK_TCK)

log() { echo "[crm-integrator bench] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild

# A nats-server of our own: the shared one serves other engineers' tests at the same time.
NATS_PORT=$(free_port)
"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
export NATS_URL="nats://127.0.0.1:$NATS_PORT"
for _ in $(seq 1 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $NATS_PORT), 1)" 2>/dev/null && break
  sleep 0.1
done
NATS_VERSION=$("$NATS_BIN" --version)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
us_per() { echo "scale=0; $1 * 1000000 / $TICKS / $2" | bc -l; }  # ticks, records
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { echo "scale=2; $1 / $2" | bc -l; }
rate() { echo "scale=0; $1 / $2" | bc -l; }

MOCK_PID=
start_mock() {
  MOCK_PORT=$(free_port)
  $B/crm-mock --listen "127.0.0.1:$MOCK_PORT" "$@" >"$WORK/mock.log" 2>&1 &
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

NS_N=0
new_namespace() { NS_N=$((NS_N + 1)); NS="bench_int_${NS_N}"; }
fill() { $B/integrator-bench-fill --namespace "$NS" --count "$1" >&2; }
drop_namespace() { $B/integrator-bench-fill --namespace "$NS" --delete >&2 || true; }

# Runs one integrator (flags "$@") on $NS until its consumer is drained. Sets SECS and CPU_*.
integrator_run() {
  local records="$1"; shift
  local metrics_port; metrics_port=$(free_port)
  local nats0 mock0
  nats0=$(cpu_ticks "$NATS_PID"); mock0=$(cpu_ticks "$MOCK_PID")
  SYNC_NAMESPACE="$NS" CRM_URL="http://127.0.0.1:$MOCK_PORT" RUST_LOG=warn \
    $B/crm-integrator --metrics-addr "127.0.0.1:$metrics_port" "$@" 2>"$WORK/integrator.log" &
  local pid=$!
  PIDS+=("$pid")
  SECS=$($B/integrator-bench-fill --namespace "$NS" --wait-drained --timeout-secs "$DRAIN_TIMEOUT")
  CPU_INT=$(us_per "$(cpu_ticks "$pid")" "$records")
  CPU_NATS=$(us_per $(( $(cpu_ticks "$NATS_PID") - nats0 )) "$records")
  CPU_MOCK=$(us_per $(( $(cpu_ticks "$MOCK_PID") - mock0 )) "$records")
  curl -fs "http://127.0.0.1:$metrics_port/metrics" >"$WORK/metrics.txt" || true
  LIMIT=$(awk '/^crm_integrator_concurrency_limit / {print $2}' "$WORK/metrics.txt")
  PAUSES=$(awk '/^crm_integrator_pauses_total / {print $2}' "$WORK/metrics.txt")
  kill -TERM "$pid"; wait "$pid" || true
}

# Reference (1) alone (sets REF1_*), or with reference (2) on a filled $NS at the same time.
ref1() {
  /usr/bin/time -f '%U %S' -o "$WORK/ref1.time" $B/crm-reference --crm-url "http://127.0.0.1:$MOCK_PORT" \
    --count "$1" --concurrency "$REF_CONCURRENCY" >"$WORK/ref1.json"
}
ref2() {
  /usr/bin/time -f '%U %S' -o "$WORK/ref2.time" $B/jetstream-reference --namespace "$NS" --count "$1" >"$WORK/ref2.json"
}
time_us() { awk -v n="$2" -v t=1000000 '{printf "%d", ($1 + $2) * t / n}' "$1"; }
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# (a) instant CRM ----------------------------------------------------------------------------------
A_INT=(); A_REF=(); A_R1=(); A_R2=(); A_DUP=0
for run in $(seq 1 "$RUNS"); do
  start_mock
  new_namespace; fill "$COUNT_A"
  log "(a) run $run: integrator, $COUNT_A records"
  integrator_run "$COUNT_A"
  A_INT+=("$(rate "$COUNT_A" "$SECS")")
  A_DUP=$((A_DUP + $(mock_stat .duplicate_effects)))
  A_CPU_INT+=("$CPU_INT"); A_CPU_NATS+=("$CPU_NATS"); A_CPU_MOCK+=("$CPU_MOCK"); A_LIMIT=${LIMIT:-n/a}
  drop_namespace; stop_mock
  start_mock
  new_namespace; fill "$COUNT_A"
  log "(a) run $run: references (1) and (2) together"
  nats0=$(cpu_ticks "$NATS_PID"); mock0=$(cpu_ticks "$MOCK_PID")
  ref1 "$COUNT_A" & r1=$!
  ref2 "$COUNT_A" & r2=$!
  wait "$r1" "$r2"
  s1=$(jq -r .seconds "$WORK/ref1.json"); s2=$(jq -r .seconds "$WORK/ref2.json")
  slower=$(printf '%s\n%s\n' "$s1" "$s2" | sort -g | tail -1)
  A_REF+=("$(rate "$COUNT_A" "$slower")"); A_R1+=("$(rate "$COUNT_A" "$s1")"); A_R2+=("$(rate "$COUNT_A" "$s2")")
  A_CPU_REF1+=("$(time_us "$WORK/ref1.time" "$COUNT_A")"); A_CPU_REF2+=("$(time_us "$WORK/ref2.time" "$COUNT_A")")
  A_CPU_RNATS+=("$(us_per $(( $(cpu_ticks "$NATS_PID") - nats0 )) "$COUNT_A")")
  A_CPU_RMOCK+=("$(us_per $(( $(cpu_ticks "$MOCK_PID") - mock0 )) "$COUNT_A")")
  A_DUP=$((A_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
done

# (b) 20 ms, cap 200, 10% errors -------------------------------------------------------------------
B_MOCK_FLAGS="--latency-ms 20 --max-concurrency 200 --failure-rate 0.1"
B_FIX=(); B_ADA=(); B_REF=(); B_DUP=0; B_LIMITED=()
for run in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2086
  start_mock $B_MOCK_FLAGS
  new_namespace; fill "$COUNT_B"
  log "(b) run $run: integrator --concurrency 256"
  integrator_run "$COUNT_B" --concurrency 256
  B_FIX+=("$(rate "$(mock_stat .created)" "$SECS")"); B_LIMITED+=("$(mock_stat .injected.concurrency_limited)")
  B_CPU_INT+=("$CPU_INT"); B_CPU_NATS+=("$CPU_NATS"); B_CPU_MOCK+=("$CPU_MOCK")
  B_DUP=$((B_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
  # shellcheck disable=SC2086
  start_mock $B_MOCK_FLAGS
  new_namespace; fill "$COUNT_B"
  log "(b) run $run: integrator, adaptive"
  integrator_run "$COUNT_B"
  B_ADA+=("$(rate "$(mock_stat .created)" "$SECS")"); B_ADA_LIMIT=${LIMIT:-n/a}
  B_DUP=$((B_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
  # shellcheck disable=SC2086
  start_mock $B_MOCK_FLAGS
  log "(b) run $run: reference (1), concurrency $REF_CONCURRENCY"
  mock0=$(cpu_ticks "$MOCK_PID")
  ref1 "$COUNT_B"
  B_REF+=("$(jq -r '.stored_per_second | floor' "$WORK/ref1.json")")
  B_CPU_REF1+=("$(time_us "$WORK/ref1.time" "$COUNT_B")")
  B_CPU_RMOCK+=("$(us_per $(( $(cpu_ticks "$MOCK_PID") - mock0 )) "$COUNT_B")")
  B_DUP=$((B_DUP + $(mock_stat .duplicate_effects)))
  stop_mock
done

# (c) goodput under the issue's fault mix ------------------------------------------------------------
FAULTS="--failure-rate 0.2 --rate-limit-rate 0.05 --timeout-rate 0.02"
C_OK=(); C_FAULT=(); C_DUP=0; C_PAUSES=0
for run in $(seq 1 "$RUNS"); do
  start_mock --latency-ms 5
  new_namespace; fill "$COUNT_C"
  log "(c) run $run: no faults"
  integrator_run "$COUNT_C"
  C_OK+=("$(rate "$COUNT_C" "$SECS")")
  C_DUP=$((C_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
  # shellcheck disable=SC2086
  start_mock --latency-ms 5 $FAULTS --seed "$run"
  new_namespace; fill "$COUNT_C"
  log "(c) run $run: $FAULTS"
  integrator_run "$COUNT_C"
  C_FAULT+=("$(rate "$COUNT_C" "$SECS")"); C_FAULT_SECS+=("$SECS")
  C_PAUSES=$((C_PAUSES + ${PAUSES:-0}))
  C_STATS=$(curl -fs "http://127.0.0.1:$MOCK_PORT/stats" | jq -c '{requests, created, duplicate_effects, injected: {error: .injected.error, rate_limited: .injected.rate_limited, timeout: .injected.timeout}}')
  C_DUP=$((C_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
done

# (d) MOCK_DATA.csv with the faults -------------------------------------------------------------------
D_SECS=(); D_DUP=0
for run in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2086
  start_mock $FAULTS --seed "$run"
  new_namespace; fill 0
  SYNC_NAMESPACE="$NS" $B/csv-reader libs/e2e/testdata/MOCK_DATA.csv --progress off >/dev/null 2>&1
  log "(d) run $run: MOCK_DATA.csv"
  integrator_run 1000
  D_SECS+=("$SECS")
  D_DUP=$((D_DUP + $(mock_stat .duplicate_effects)))
  drop_namespace; stop_mock
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

a_int=$(median "${A_INT[@]}"); a_ref=$(median "${A_REF[@]}")
b_fix=$(median "${B_FIX[@]}"); b_ada=$(median "${B_ADA[@]}"); b_ref=$(median "${B_REF[@]}")
c_ok=$(median "${C_OK[@]}"); c_fault=$(median "${C_FAULT[@]}")
d_secs=$(median "${D_SECS[@]}")
verdict() { if [ "$(echo "$1 >= $2" | bc -l)" = 1 ]; then echo met; else echo "**missed**"; fi; }

cat <<MD
## crm-integrator

One replica (release build) draining a pre-filled ingest stream into crm-mock, beside two
references measured in the same run: (1) \`crm-reference\`, a stateless driver sending the
integrator's exact requests (its \`CrmClient\`, \`Idempotency-Key\`, concurrency $REF_CONCURRENCY,
retrying failures, honouring \`Retry-After\`), no NATS; (2) \`jetstream-reference\`, the per-record
JetStream work no design can avoid (pull, publish an outcome with a dedup id and await its PubAck,
ack), no CRM. Everything on this machine's $(nproc) cores, on a nats-server of its own
($NATS_VERSION, file store). Figures are medians of $RUNS runs, integrator and references alternating;
every run's values are listed. Load average before/after: $LOAD_BEFORE / $LOAD_AFTER.

| scenario | integrator | reference | ratio | target | met | duplicates |
|---|---|---|---|---|---|---|
| (a) instant CRM, $COUNT_A records, adaptive | $a_int records/s | $a_ref records/s: (1) and (2) together | $(ratio "$a_int" "$a_ref") | ≥ 0.70 | $(verdict "$(ratio "$a_int" "$a_ref")" 0.70) | $A_DUP |
| (b) 20 ms, cap 200, 10% 5xx, \`--concurrency 256\` | $b_fix creates/s | $b_ref creates/s: (1) alone | $(ratio "$b_fix" "$b_ref") | ≥ 0.90 | $(verdict "$(ratio "$b_fix" "$b_ref")" 0.90) | $B_DUP |
| (b) same, adaptive | $b_ada creates/s | $b_ref creates/s | $(ratio "$b_ada" "$b_ref") | ≥ 0.90 | $(verdict "$(ratio "$b_ada" "$b_ref")" 0.90) | |
| (c) $COUNT_C rows, 5 ms: 20% 5xx + 5% 429 + 2% 30-s hangs | $c_fault records/s | $c_ok records/s without faults | $(ratio "$c_fault" "$c_ok") | ≥ 0.50 | $(verdict "$(ratio "$c_fault" "$c_ok")" 0.50) | $C_DUP |
| (d) MOCK_DATA.csv (1,000 rows), same faults, no latency | drained in $d_secs s | | | < 60 s | $(verdict 60 "$d_secs") | $D_DUP |

- (a) runs: integrator ${A_INT[*]} records/s; references together ${A_REF[*]} (the slower of the two
  bounds the pair: (1) alone finished at ${A_R1[*]}, (2) at ${A_R2[*]} records/s while sharing the
  machine). Adaptive limit at the end: $A_LIMIT.
  CPU µs per record, integrator run: integrator $(median "${A_CPU_INT[@]}"), nats-server
  $(median "${A_CPU_NATS[@]}"), crm-mock $(median "${A_CPU_MOCK[@]}"); reference run: crm-reference
  $(median "${A_CPU_REF1[@]}"), jetstream-reference $(median "${A_CPU_REF2[@]}"), nats-server
  $(median "${A_CPU_RNATS[@]}"), crm-mock $(median "${A_CPU_RMOCK[@]}").
- (b) mock \`crm-mock $B_MOCK_FLAGS\`: runs fixed ${B_FIX[*]}, adaptive ${B_ADA[*]}, reference (1)
  ${B_REF[*]} creates/s; 429s for the cap in the fixed runs: ${B_LIMITED[*]}; adaptive limit at
  the end $B_ADA_LIMIT. CPU µs per record, fixed: integrator $(median "${B_CPU_INT[@]}"), nats-server
  $(median "${B_CPU_NATS[@]}"), crm-mock $(median "${B_CPU_MOCK[@]}"); reference (1)
  $(median "${B_CPU_REF1[@]}"), crm-mock under it $(median "${B_CPU_RMOCK[@]}").
- (c) mock \`crm-mock --latency-ms 5 $FAULTS\` (Retry-After 1 s and 30-s hangs are its defaults):
  runs without faults ${C_OK[*]}, with faults ${C_FAULT[*]} records/s (${C_FAULT_SECS[*]} s);
  fleet pauses called: $C_PAUSES; last faulty run's mock counts: \`$C_STATS\`.
- (d) \`csv-reader libs/e2e/testdata/MOCK_DATA.csv\`, then one integrator against \`crm-mock $FAULTS\`:
  ${D_SECS[*]} s from the integrator's start to nothing pending or unacked.
- Command: \`COUNT_A=$COUNT_A COUNT_B=$COUNT_B RUNS=$RUNS deploy/local/bench.d/crm-integrator.sh\`
  (or \`BENCH_ONLY=crm-integrator deploy/local/bench.sh\`).
MD
