#!/usr/bin/env bash
# crm-mock with faults off under a real HTTP load generator (wrk): POST /customers with unique ids,
# beside GET /healthz on the same server in the same run (the HTTP stack's own ceiling here).
# Prints one Markdown section on stdout; progress on stderr.
#   SECONDS_PER_RUN=10 THREADS=2 CONNECTIONS=64 deploy/local/bench.d/crm-mock.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
[ -f .run/env ] && . .run/env
# shellcheck source=deploy/local/bench.d/lib-wrk.bash
. deploy/local/bench.d/lib-wrk.bash
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
# Bound the load in time: wrk stops itself, this is only a guard against a hung server.
if [ "$SECONDS_PER_RUN" -gt 120 ]; then echo "SECONDS_PER_RUN over 120 s refused" >&2; exit 2; fi

log() { echo "[crm-mock bench] $*" >&2; }
trap crm_mock_stop EXIT

log "building the release binary"
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild
wrk_ensure

load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
crm_mock_start
wrk_get "$CRM_MOCK_URL/healthz" "$SECONDS_PER_RUN" "$THREADS" "$CONNECTIONS"
health_rps=$WRK_RPS health_p50=$WRK_P50_MS health_p99=$WRK_P99_MS
health_bad=$((WRK_NON2XX + WRK_SOCKET_ERRORS))
health_command=$WRK_COMMAND

wrk_post_customers "$CRM_MOCK_URL" "$SECONDS_PER_RUN" "$THREADS" "$CONNECTIONS" "bench$(date +%s)"
stats=$(curl -fsS "$CRM_MOCK_URL/stats")
rss_mib=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$CRM_MOCK_PID/status")
created=$(jq -r .created <<<"$stats")
duplicates=$(jq -r .duplicate_effects <<<"$stats")
ratio=$(awk -v a="$WRK_RPS" -v b="$health_rps" 'BEGIN { printf "%.0f", 100 * a / b }')
errors=$((WRK_NON2XX + WRK_SOCKET_ERRORS))
verdict="met"
# wrk stops counting at the deadline while up to one request per connection is still answered.
if [ "$errors" -ne 0 ] || [ "$health_bad" -ne 0 ] || [ "$created" -lt "$WRK_REQUESTS" ] \
  || [ "$created" -gt $((WRK_REQUESTS + CONNECTIONS)) ] || [ "$duplicates" -ne 0 ]; then
  verdict="NOT met"
fi

cat <<MD
## crm-mock: request rate with faults off

\`target/release/crm-mock --listen 127.0.0.1:0\` (no fault flags), driven by wrk on the same
$(nproc)-core machine (load generator and server share the CPUs), $SECONDS_PER_RUN s per run,
$THREADS threads, $CONNECTIONS keep-alive connections; load average when it started: $load_at_start
(other work on the machine lowers these figures).

| load | requests/s | p50 | p99 | non-2xx + socket errors |
|---|---|---|---|---|
| POST /customers, unique ids | **$WRK_RPS** | $WRK_P50_MS ms | $WRK_P99_MS ms | $errors of $WRK_REQUESTS |
| GET /healthz (HTTP stack ceiling) | $health_rps | $health_p50 ms | $health_p99 ms | $health_bad |

- POST rate vs. GET /healthz on the same server: **$ratio %** (the cost of parsing, validating and
  storing each customer on top of bare HTTP).
- Target "full rate with no errors": **$verdict** ($errors errors; every request created one
  customer: created=$created for $WRK_REQUESTS counted by wrk, which stops counting at the deadline
  with up to $CONNECTIONS requests still in flight; duplicate_effects=$duplicates).
- crm-mock peak RSS after holding $created customers: $rss_mib MiB.
- \`/stats\` after the POST run: \`$stats\`

Commands:

\`\`\`
$health_command
$WRK_COMMAND
\`\`\`

(post-customers.lua and the helpers are in \`deploy/local/bench.d/lib-wrk.bash\`; run with
\`BENCH_ONLY=crm-mock deploy/local/bench.sh\`.)
MD
