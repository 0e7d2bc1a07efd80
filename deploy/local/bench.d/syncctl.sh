#!/usr/bin/env bash
# syncctl: gen-csv throughput and memory at two sizes (memory must not grow with the row count),
# then, on a private nats-server this script starts and stops, `replay` republishing rate and
# `status` latency over a stream of that size. Prints one Markdown section on stdout; progress on
# stderr.
#   GEN_ROWS="100000 1000000" REPLAY_ROWS=100000 deploy/local/bench.d/syncctl.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
GEN_ROWS=${GEN_ROWS:-"100000 1000000"}
REPLAY_ROWS=${REPLAY_ROWS:-100000}
# Targets (ours): the demo's and soak's files are generated in seconds, memory is flat.
GEN_TARGET_ROWS_S=500000
GEN_TARGET_RSS_MB=20
REPLAY_TARGET_MSGS_S=20000
STATUS_TARGET_MS=500
BIN="$ROOT/target/release"
WORK=$(mktemp -d)
NATS_PID=""

log() { echo "[syncctl bench] $*" >&2; }
cleanup() {
  if [ -n "$NATS_PID" ]; then kill "$NATS_PID" 2>/dev/null || true; wait "$NATS_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Runs a command under /usr/bin/time; prints "seconds max_rss_kb".
measure() {
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null 2>"$WORK/stderr" || {
    cat "$WORK/stderr" >&2
    return 1
  }
  cat "$WORK/time"
}
ratio() { echo "scale=2; $1 / $2" | bc -l; }

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild

echo "## syncctl"
echo
echo "gen-csv (5% bad, 5% exact repeats, 5% changed repeats, seed 1), written to a file; best of 3 runs, largest peak RSS:"
echo
echo "| rows | seconds | rows/s | MB written | peak RSS (MB) | rows/s vs target ${GEN_TARGET_ROWS_S} | RSS vs target ${GEN_TARGET_RSS_MB} MB |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for rows in $GEN_ROWS; do
  log "gen-csv --rows $rows"
  # Best of 3: the machine is shared, the slowest runs measure the neighbours.
  secs=""; rss_kb=0
  for _ in 1 2 3; do
    read -r s kb < <(measure "$BIN/syncctl" gen-csv --rows "$rows" --bad-rate 0.05 \
      --dup-rate 0.05 --change-rate 0.05 --seed 1 --output "$WORK/gen.csv")
    if [ -z "$secs" ] || [ "$(echo "$s < $secs" | bc)" = 1 ]; then secs=$s; fi
    if [ "$kb" -gt "$rss_kb" ]; then rss_kb=$kb; fi
  done
  bytes=$(stat -c %s "$WORK/gen.csv")
  rate=$(echo "$rows / $secs" | bc)
  rss_mb=$(ratio "$rss_kb" 1024)
  echo "| $rows | $secs | $rate | $(ratio "$bytes" 1048576) | $rss_mb | $(ratio "$rate" "$GEN_TARGET_ROWS_S")× | $(ratio "$rss_mb" "$GEN_TARGET_RSS_MB")× |"
  rm -f "$WORK/gen.csv"
done
echo
echo "Command: \`target/release/syncctl gen-csv --rows N --bad-rate 0.05 --dup-rate 0.05 --change-rate 0.05 --seed 1 --output FILE\` under \`/usr/bin/time -f '%e %M'\`."
echo

# Replay and status on a private server, so the shared one keeps no benchmark data.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$NATS_SERVER_BIN" -a 127.0.0.1 -p "$port" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
export NATS_URL="nats://127.0.0.1:$port" SYNC_NAMESPACE=bench_syncctl
for _ in $(seq 1 100); do
  "$BIN/syncctl" setup --skip-db >"$WORK/setup.log" 2>&1 && break
  sleep 0.1
done
grep -q "setup done" "$WORK/setup.log" || { cat "$WORK/setup.log" >&2; exit 1; }

log "csv-reader: $REPLAY_ROWS rows into the ingest stream"
"$BIN/syncctl" gen-csv --rows "$REPLAY_ROWS" --seed 2 --output "$WORK/replay.csv" 2>/dev/null
read -r reader_secs _ < <(measure "$BIN/csv-reader" --progress off "$WORK/replay.csv")
reader_rate=$(echo "$REPLAY_ROWS / $reader_secs" | bc)

log "replay --from-seq 1 --to-seq $REPLAY_ROWS"
read -r replay_secs replay_rss_kb < <(measure "$BIN/syncctl" replay --from-seq 1 --to-seq "$REPLAY_ROWS")
republished=$("$BIN/syncctl" status --skip-db --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["streams"][0]["messages"])')
replayed=$((republished - REPLAY_ROWS))
replay_rate=$(echo "$replayed / $replay_secs" | bc)

log "status --skip-db over $republished ingest messages"
status_best=""
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N)
  "$BIN/syncctl" status --skip-db --json >/dev/null
  ms=$((($(date +%s%N) - t0) / 1000000))
  if [ -z "$status_best" ] || [ "$ms" -lt "$status_best" ]; then status_best=$ms; fi
done

echo "Load average while measuring (2 cores, shared with other builds): $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "replay and status, on a private nats-server $("$NATS_SERVER_BIN" --version 2>/dev/null) with a file store:"
echo
echo "| what | figure | vs target |"
echo "|---|---:|---:|"
echo "| replay: messages republished | $replayed of $REPLAY_ROWS | |"
echo "| replay: seconds | $replay_secs | |"
echo "| replay: messages/s | $replay_rate | $(ratio "$replay_rate" "$REPLAY_TARGET_MSGS_S")× of ${REPLAY_TARGET_MSGS_S}/s |"
echo "| for reference, csv-reader publishing the same rows: messages/s | $reader_rate | replay at $(ratio "$replay_rate" "$reader_rate")× of it |"
echo "| replay: peak RSS (MB) | $(ratio "$replay_rss_kb" 1024) | |"
echo "| status --json over $republished messages: best of 5 (ms) | $status_best | $(ratio "$status_best" "$STATUS_TARGET_MS")× of ${STATUS_TARGET_MS} ms (lower is better) |"
echo
echo "Commands: \`csv-reader FILE\` ($REPLAY_ROWS rows from \`syncctl gen-csv --seed 2\`), then \`target/release/syncctl replay --from-seq 1 --to-seq $REPLAY_ROWS\` and \`target/release/syncctl status --skip-db --json\`, each under \`/usr/bin/time\`. The replay reads with an ephemeral pull consumer without acks (pulls of 1000), keeps 256 publish acks in flight and checks each message against the ledger (KV gets, 256 ahead). It moves every message twice through the server (read and store), so about half the reader's rate is the expected ceiling."
