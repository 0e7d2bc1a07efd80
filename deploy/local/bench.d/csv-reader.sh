#!/usr/bin/env bash
# csv-reader throughput and memory, in one run against the local nats-server (.run/env NATS_URL):
#  (a) raw JetStream publish rate of reader-shaped messages (same payloads and headers, distinct
#      dedup ids, pipelined) to a fresh stream: `publish-bench raw`;
#  (b) csv-reader on a generated 1,000,000-row file, for several --publish-window values, each into a
#      fresh namespace; the ratio to (a) is the target (>= 60%);
#  (c) peak RSS of csv-reader for 1M and 10M rows (target <= 64 MiB, within 10% of each other).
# Prints one Markdown section on stdout; progress on stderr. Generated files stay in .run/bench/.
#   ROWS=1000000 BIG_ROWS=10000000 WINDOWS="256 1024 4096" deploy/local/bench.d/csv-reader.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
ROWS=${ROWS:-1000000}
BIG_ROWS=${BIG_ROWS:-10000000}
WINDOWS=${WINDOWS:-"256 1024 4096"}
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
    "$BIN/publish-bench" --nats-url "$NATS_URL" teardown --namespace "$ns" >&2 || true
  done
}
trap cleanup EXIT

case "$NATS_URL" in
  nats://127.0.0.1:*|nats://localhost:*) ;;
  *) log "NATS_URL=$NATS_URL is not local; refusing to load it"; exit 1 ;;
esac

log "building release binaries"
cargo build --release -q -p csv-reader >&2

generate() { # rows -> path (generated once, then reused)
  local rows=$1 path="$DATA/customers-$1.csv"
  if [ ! -s "$path" ] || [ ! -s "$path.stats.json" ]; then
    log "generating $rows rows into $path"
    "$BIN/publish-bench" gen --rows "$rows" --out "$path" >"$path.stats.json"
  fi
  echo "$path"
}

# Runs csv-reader on $1 with window $2 into a fresh namespace; prints "rows_per_sec rss_kib published
# deduplicated rejected rows_read".
read_file() {
  local file=$1 window=$2 ns="bench_reader_${STAMP}_$RANDOM"
  NAMESPACES+=("$ns")
  "$BIN/publish-bench" --nats-url "$NATS_URL" setup --namespace "$ns" >&2
  local summary="$DATA/summary.json" timing="$DATA/time.txt"
  timeout "$RUN_LIMIT_S" /usr/bin/time -v -o "$timing" \
    "$BIN/csv-reader" "$file" --nats-url "$NATS_URL" --namespace "$ns" \
    --publish-window "$window" --progress off --summary-json >"$summary"
  local rss
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timing")
  jq -r --arg rss "$rss" '"\(.rows_per_sec) \($rss) \(.published) \(.deduplicated) \(.rejected) \(.rows_read)"' "$summary"
  "$BIN/publish-bench" --nats-url "$NATS_URL" teardown --namespace "$ns" >&2
}

small=$(generate "$ROWS")
small_size=$(stat -c %s "$small")

log "raw JetStream publish of $ROWS reader-shaped messages (window $DEFAULT_WINDOW)"
raw_ns="bench_raw_${STAMP}"
NAMESPACES+=("$raw_ns")
raw_json=$(timeout "$RUN_LIMIT_S" "$BIN/publish-bench" --nats-url "$NATS_URL" raw \
  --count "$ROWS" --window "$DEFAULT_WINDOW" --namespace "$raw_ns")
raw_rate=$(jq -r '.messages_per_sec' <<<"$raw_json")
payload_bytes=$(jq -r '.payload_bytes' <<<"$raw_json")
header_bytes=$(jq -r '.header_bytes' <<<"$raw_json")

declare -A RATE RSS COUNTS
for window in $WINDOWS; do
  log "csv-reader, $ROWS rows, --publish-window $window"
  read -r rate rss published dedup rejected rows_read < <(read_file "$small" "$window")
  RATE[$window]=$rate
  RSS[$window]=$rss
  COUNTS[$window]="$rows_read read: $published published, $dedup deduplicated, $rejected rejected"
done
if [ -z "${RATE[$DEFAULT_WINDOW]:-}" ]; then
  log "csv-reader, $ROWS rows, --publish-window $DEFAULT_WINDOW"
  read -r rate rss _ _ _ _ < <(read_file "$small" "$DEFAULT_WINDOW")
  RATE[$DEFAULT_WINDOW]=$rate
  RSS[$DEFAULT_WINDOW]=$rss
fi

big=$(generate "$BIG_ROWS")
big_size=$(stat -c %s "$big")
log "csv-reader, $BIG_ROWS rows, --publish-window $DEFAULT_WINDOW (peak RSS)"
read -r big_rate big_rss big_published big_dedup big_rejected big_read < <(read_file "$big" "$DEFAULT_WINDOW")

mib() { echo "scale=1; $1 / 1024" | bc -l; }
pct() { echo "scale=0; 100 * $1 / $2" | bc -l; }
small_rss=${RSS[$DEFAULT_WINDOW]}
rss_gap=$(echo "scale=1; 100 * ($big_rss - $small_rss) / $small_rss" | bc -l)
ratio=$(pct "${RATE[$DEFAULT_WINDOW]}" "$raw_rate")

echo "## csv-reader: CSV to JetStream"
echo
echo "Raw JetStream publish of reader-shaped messages (payload ≈ $payload_bytes B JSON, headers ≈ $header_bytes B incl. \`Nats-Msg-Id\`), pipelined $DEFAULT_WINDOW deep, into a fresh file-backed stream with the production dedup window; then \`csv-reader\` on a generated file ($(mib $((small_size / 1024))) MiB, 1% bad rows, 1% exact duplicates, 1% changed repeats), each run into a fresh namespace, same server, same run."
echo
echo "| what | rows | rate (rows/s) | vs raw | peak RSS |"
echo "|---|---:|---:|---:|---:|"
printf '| raw JetStream publish | %d | %.0f | 100%% | |\n' "$ROWS" "$raw_rate"
for window in $WINDOWS; do
  printf '| csv-reader --publish-window %s | %d | %.0f | %s%% | %s MiB |\n' "$window" "$ROWS" "${RATE[$window]}" \
    "$(pct "${RATE[$window]}" "$raw_rate")" "$(mib "${RSS[$window]}")"
done
printf '| csv-reader (default window %s) | %d | %.0f | %s%% | %s MiB |\n' "$DEFAULT_WINDOW" "$BIG_ROWS" "$big_rate" \
  "$(pct "$big_rate" "$raw_rate")" "$(mib "$big_rss")"
echo
echo "- Target: reader ≥ 60% of the raw rate → **${ratio}%** at the default window $DEFAULT_WINDOW ($( [ "$ratio" -ge 60 ] && echo met || echo NOT met))."
echo "- Target: peak RSS ≤ 64 MiB for 1M and 10M rows, within 10% → $(mib "$small_rss") MiB and $(mib "$big_rss") MiB ($(mib $((big_size / 1024))) MiB of CSV), difference ${rss_gap}% ($( (( small_rss <= 65536 && big_rss <= 65536 )) && [ "$(echo "${rss_gap#-} <= 10" | bc -l)" = 1 ] && echo met || echo NOT met))."
echo "- Counts, $ROWS rows at window $DEFAULT_WINDOW: ${COUNTS[$DEFAULT_WINDOW]:-see above}; $BIG_ROWS rows: $big_read read: $big_published published, $big_dedup deduplicated, $big_rejected rejected."
echo "- Rate is rows read per second, every row acknowledged by the stream (rejections included), start to exit."
echo "- Command: \`BENCH_ONLY=csv-reader deploy/local/bench.sh\` (ROWS=$ROWS BIG_ROWS=$BIG_ROWS WINDOWS=\"$WINDOWS\"); per run \`/usr/bin/time -v target/release/csv-reader FILE --namespace NS --publish-window W --progress off --summary-json\`, raw: \`target/release/publish-bench raw --count $ROWS --window $DEFAULT_WINDOW\`."
