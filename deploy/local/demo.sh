#!/usr/bin/env bash
# `make demo`: the whole pipeline against crm-mock with faults on, then a reconciliation.
# Expects the environment of .run/env (the Makefile sources it) and release binaries.
# ROWS=N sizes the generated file (default 20000); REPLICAS=N integrators (default 2);
# FAILURE_RATE / RATE_LIMIT_RATE / TIMEOUT_RATE set crm-mock's faults; KEEP=1 leaves the services
# running. The injected 429s carry crm-mock's default Retry-After (1 s): it delays the refused record,
# not the fleet. Exits non-zero unless the run reconciles exactly with no duplicate in the CRM.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN="$ROOT/target/release"
ROWS=${ROWS:-20000}
REPLICAS=${REPLICAS:-2}
FAILURE_RATE=${FAILURE_RATE:-0.05}
RATE_LIMIT_RATE=${RATE_LIMIT_RATE:-0.01}
TIMEOUT_RATE=${TIMEOUT_RATE:-0.005}
started=$(date +%s)
STAMP=$(date +%Y%m%d_%H%M%S)
export SYNC_NAMESPACE=${SYNC_NAMESPACE:-demo_$STAMP}
DB_NAME=$SYNC_NAMESPACE
WORK="$ROOT/.run/demo/$SYNC_NAMESPACE"
mkdir -p "$WORK"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A database of the demo's own, so runs never mix.
psql "$DATABASE_URL" -qAtc "CREATE DATABASE $DB_NAME" >/dev/null
export DATABASE_URL="${DATABASE_URL%/*}/$DB_NAME"
export CRM_API_TOKEN=demo-token
MOCK_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CRM_URL="http://127.0.0.1:$MOCK_PORT"

pids=()
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "services left running (KEEP=1): pids ${pids[*]}"
    return
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

say "namespace $SYNC_NAMESPACE, database $DB_NAME, logs in ${WORK#$ROOT/}"
"$BIN/syncctl" setup

say "generating $ROWS customers (1% bad rows, 2% exact repeats, 2% changed repeats)"
"$BIN/syncctl" gen-csv --rows "$ROWS" --bad-rate 0.01 --dup-rate 0.02 --change-rate 0.02 --seed 42 \
  --output "$WORK/customers.csv"

say "starting crm-mock with faults: $FAILURE_RATE 5xx, $RATE_LIMIT_RATE 429, $TIMEOUT_RATE timeouts, 5±5 ms latency; $REPLICAS integrators"
# The token reaches crm-mock as CRM_API_TOKEN (exported above), never on a command line (`ps`).
"$BIN/crm-mock" --listen "127.0.0.1:$MOCK_PORT" --seed 7 \
  --failure-rate "$FAILURE_RATE" --rate-limit-rate "$RATE_LIMIT_RATE" --timeout-rate "$TIMEOUT_RATE" --hang-ms 3000 \
  --latency-ms 5 --jitter-ms 5 >"$WORK/crm-mock.log" 2>&1 &
pids+=($!)
"$BIN/persister" --metrics-addr 127.0.0.1:0 >"$WORK/persister.log" 2>&1 &
pids+=($!)
for i in $(seq 1 "$REPLICAS"); do
  "$BIN/crm-integrator" --metrics-addr 127.0.0.1:0 --request-timeout 1s \
    >"$WORK/crm-integrator-$i.log" 2>&1 &
  pids+=($!)
done

say "reading the sample (MOCK_DATA.csv, 1,000 customers) and the generated file"
"$BIN/csv-reader" "$ROOT/libs/e2e/testdata/MOCK_DATA.csv"
"$BIN/csv-reader" "$WORK/customers.csv"

say "waiting for the pipeline to drain"
"$BIN/syncctl" wait --timeout 10m

say "status and reconciliation"
"$BIN/syncctl" status

say "verify: every customer's newest version in customers, the ledger and the CRM"
verified=0
"$BIN/syncctl" verify --crm && verified=1

say "crm-mock's own count (duplicate_effects must be 0)"
# /stats wants the token; the header comes from a file descriptor, not curl's command line.
curl -fsS -H @<(printf 'Authorization: Bearer %s\n' "$CRM_API_TOKEN") "$CRM_URL/stats" >"$WORK/crm-stats.json"
python3 -m json.tool "$WORK/crm-stats.json"

say "invariants"
failed=0
check() { if [ "$1" = 0 ]; then echo "PASS $2"; else echo "FAIL $2"; failed=1; fi; }
reconciled=0; "$BIN/syncctl" status --check >/dev/null || reconciled=$?
check "$reconciled" "reconciled (every equation of syncctl status --check holds, difference 0)"
duplicates=$(grep -o '"duplicate_effects": *[0-9]*' "$WORK/crm-stats.json" | grep -o '[0-9]*$' || echo missing)
check "$([ "$duplicates" = 0 ] && echo 0 || echo 1)" "no customer applied twice (crm-mock duplicate_effects = $duplicates)"
check "$((1 - verified))" "every customer holds its newest version in customers, the ledger and the CRM (syncctl verify --crm)"
echo "elapsed $(( $(date +%s) - started )) s for $ROWS generated rows + the 1,000-row sample"
[ "$failed" = 0 ] || exit 1

say "done: inspect with SYNC_NAMESPACE=$SYNC_NAMESPACE DATABASE_URL=$DATABASE_URL target/release/syncctl status"
