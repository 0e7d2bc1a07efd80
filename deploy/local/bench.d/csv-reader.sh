#!/usr/bin/env bash
# csv-reader throughput and memory, in one run against the local nats-server (.run/env NATS_URL):
#  (a) for each --publish-window: the raw JetStream publish rate of reader-shaped messages (same
#      payloads and headers, distinct dedup ids, pipelined as deep) to a fresh stream
#      (`publish-bench raw`), then csv-reader on a generated 1,000,000-row file into a fresh
#      namespace; reader / raw at the default window is the target (>= 60%);
#  (b) peak RSS of csv-reader for 1M and 10M rows (target <= 64 MiB, within 10% of each other).
# Prints one Markdown section on stdout; progress on stderr. Generated files stay in .run/bench/.
#   ROWS=1000000 BIG_ROWS=10000000 WINDOWS="512 1024 2048" deploy/local/bench.d/csv-reader.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
ROWS=${ROWS:-1000000}
BIG_ROWS=${BIG_ROWS:-10000000}
WINDOWS=${WINDOWS:-"512 1024 2048"}
DEFAULT_WINDOW=${DEFAULT_WINDOW:-1024}
# Every run is bounded: a stuck server must not hang `make bench`.
RUN_LIMIT_S=${RUN_LIMIT_S:-1800}
DATA="$ROOT/.run/bench/csv-reader"
BIN="$ROOT/target/release"
STAMP=$(date +%s)
NAMESPACES=()
mkdir -p "$DATA"

log() { echo "[csv-reader bench] $*" >&2; }
cleanup() {
  for ns in "${NAMESPACES[@]}"; do
    "$BIN/syncctl" teardown --yes --nats-url "$NATS_URL" --namespace "$ns" >&2 || true
  done
}
trap cleanup EXIT

case "$NATS_URL" in
  nats://127.0.0.1:*|nats://localhost:*) ;;
  *) log "NATS_URL=$NATS_URL is not local; refusing to load it"; exit 1 ;;
esac

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild

generate() { # rows -> path (generated once, then reused)
  local rows=$1 path="$DATA/customers-$1.csv"
  if [ ! -s "$path" ] || [ ! -s "$path.stats.json" ]; then
    log "generating $rows rows into $path"
    "$BIN/syncctl" gen-csv --rows "$rows" --bad-rate 0.01 --dup-rate 0.01 --change-rate 0.01 \
      --output "$path" --stats-json "$path.stats.json" 2>/dev/null
  fi
  echo "$path"
}

# Runs csv-reader on $1 with window $2 into a fresh namespace; prints "rows_per_sec rss_kib published
# deduplicated rejected rows_read".
read_file() {
  local file=$1 window=$2 ns="bench_reader_${STAMP}_$RANDOM"
  NAMESPACES+=("$ns")
  "$BIN/syncctl" setup --skip-db --nats-url "$NATS_URL" --namespace "$ns" >&2
  local summary="$DATA/summary.json" timing="$DATA/time.txt"
  timeout "$RUN_LIMIT_S" /usr/bin/time -v -o "$timing" \
    "$BIN/csv-reader" "$file" --nats-url "$NATS_URL" --namespace "$ns" \
    --publish-window "$window" --progress off --summary-json >"$summary"
  local rss
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timing")
  jq -r --arg rss "$rss" '"\(.rows_per_sec) \($rss) \(.published) \(.deduplicated) \(.rejected) \(.rows_read)"' "$summary"
  "$BIN/syncctl" teardown --yes --nats-url "$NATS_URL" --namespace "$ns" >&2
}

load_start=$(cut -d' ' -f1 /proc/loadavg)
small=$(generate "$ROWS")
small_size=$(stat -c %s "$small")

raw_publish() { # window -> "rate payload_bytes header_bytes"
  local ns="bench_raw_${STAMP}_$1"
  NAMESPACES+=("$ns")
  timeout "$RUN_LIMIT_S" "$BIN/publish-bench" --nats-url "$NATS_URL" raw \
    --count "$ROWS" --window "$1" --namespace "$ns" |
    jq -r '"\(.messages_per_sec) \(.payload_bytes) \(.header_bytes)"'
}

case " $WINDOWS " in *" $DEFAULT_WINDOW "*) ;; *) WINDOWS="$WINDOWS $DEFAULT_WINDOW" ;; esac
declare -A RAW RATE RSS COUNTS
# Raw and reader alternate per window, so a change in the machine's load hits both alike.
for window in $WINDOWS; do
  log "raw JetStream publish of $ROWS reader-shaped messages, window $window"
  read -r raw_rate payload_bytes header_bytes < <(raw_publish "$window")
  RAW[$window]=$raw_rate
  log "csv-reader, $ROWS rows, --publish-window $window"
  read -r rate rss published dedup rejected rows_read < <(read_file "$small" "$window")
  RATE[$window]=$rate
  RSS[$window]=$rss
  COUNTS[$window]="$rows_read read: $published published, $dedup deduplicated, $rejected rejected"
done

big=$(generate "$BIG_ROWS")
big_size=$(stat -c %s "$big")
log "csv-reader, $BIG_ROWS rows, --publish-window $DEFAULT_WINDOW (peak RSS)"
read -r big_rate big_rss big_published big_dedup big_rejected big_read < <(read_file "$big" "$DEFAULT_WINDOW")

mib() { echo "scale=1; $1 / 1024" | bc -l; }
pct() { echo "scale=0; 100 * $1 / $2" | bc -l; }
small_rss=${RSS[$DEFAULT_WINDOW]}
rss_gap=$(echo "scale=1; 100 * ($big_rss - $small_rss) / $small_rss" | bc -l)
ratio=$(pct "${RATE[$DEFAULT_WINDOW]}" "${RAW[$DEFAULT_WINDOW]}")

echo "## csv-reader: CSV to JetStream"
echo
echo "For each \`--publish-window\`: the raw JetStream publish rate of reader-shaped messages (the reader's own message code on generated rows: payload ≈ $payload_bytes B JSON, headers ≈ $header_bytes B incl. a distinct \`Nats-Msg-Id\`) pipelined as deep, into a fresh file-backed stream with the production dedup window; then \`csv-reader\` on a generated file ($(mib $((small_size / 1024))) MiB, 1% bad rows, 1% exact duplicates, 1% changed repeats) into a fresh namespace. Same server, same run, alternating."
echo
echo "| window | raw publish (msg/s) | csv-reader, $ROWS rows (rows/s) | reader / raw | peak RSS |"
echo "|---:|---:|---:|---:|---:|"
for window in $WINDOWS; do
  printf '| %s | %.0f | %.0f | %s%% | %s MiB |\n' "$window" "${RAW[$window]}" "${RATE[$window]}" \
    "$(pct "${RATE[$window]}" "${RAW[$window]}")" "$(mib "${RSS[$window]}")"
done
printf '| %s (default), %d rows | | %.0f | %s%% | %s MiB |\n' "$DEFAULT_WINDOW" "$BIG_ROWS" "$big_rate" \
  "$(pct "$big_rate" "${RAW[$DEFAULT_WINDOW]}")" "$(mib "$big_rss")"
echo
echo "- Target: reader ≥ 60% of the raw rate → **${ratio}%** at the default window $DEFAULT_WINDOW ($( [ "$ratio" -ge 60 ] && echo met || echo NOT met))."
echo "- Target: peak RSS ≤ 64 MiB for 1M and 10M rows, within 10% → $(mib "$small_rss") MiB and $(mib "$big_rss") MiB ($(mib $((big_size / 1024))) MiB of CSV), difference ${rss_gap}% ($( (( small_rss <= 65536 && big_rss <= 65536 )) && [ "$(echo "${rss_gap#-} <= 10" | bc -l)" = 1 ] && echo met || echo NOT met))."
echo "- Counts, $ROWS rows at window $DEFAULT_WINDOW: ${COUNTS[$DEFAULT_WINDOW]}; $BIG_ROWS rows: $big_read read: $big_published published, $big_dedup deduplicated, $big_rejected rejected."
echo "- Load average $load_start at the start, $(cut -d' ' -f1 /proc/loadavg) at the end, on $(nproc) cores: on a shared machine the rates vary from run to run, which is why raw and reader alternate per window."
echo "- Rate is rows read per second, every row acknowledged by the stream (rejections included), process start to exit. The 10M row is compared with the raw rate at the same window from the 1M pass."
echo "- Command: \`BENCH_ONLY=csv-reader deploy/local/bench.sh\` (ROWS=$ROWS BIG_ROWS=$BIG_ROWS WINDOWS=\"$WINDOWS\"); per run \`/usr/bin/time -v target/release/csv-reader FILE --namespace NS --publish-window W --progress off --summary-json\`; raw: \`target/release/publish-bench raw --count $ROWS --window W --namespace NS\`."
