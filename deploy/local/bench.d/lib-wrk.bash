# Shared by benchmark scripts (source it; it is not a benchmark itself, hence not *.sh):
#   crm_mock_start [crm-mock flags...]  starts target/release/crm-mock on a free 127.0.0.1 port,
#                                       sets CRM_MOCK_PID and CRM_MOCK_URL, waits for /healthz
#   crm_mock_stop                       SIGTERM + wait
#   wrk_post_customers URL SECONDS THREADS CONNECTIONS ID_PREFIX
#                                       plain HTTP rate of POST /customers (unique ids) against URL;
#                                       sets WRK_REQUESTS WRK_RPS WRK_P50_MS WRK_P99_MS WRK_NON2XX
#                                       WRK_SOCKET_ERRORS WRK_COMMAND
#   wrk_get URL SECONDS THREADS CONNECTIONS
#                                       same figures for a plain GET of URL
# Progress goes to stderr; nothing is printed on stdout.

WRK_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WRK_ROOT=$(cd "$WRK_LIB_DIR/../../.." && pwd)

wrk_ensure() {
  if command -v wrk >/dev/null 2>&1; then return 0; fi
  echo "[wrk] installing wrk with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
  else
    sudo apt-get install -y wrk >&2 || { sudo apt-get update >&2 && sudo apt-get install -y wrk >&2; }
  fi
}

crm_mock_start() {
  local log
  log=$(mktemp)
  CRM_MOCK_LOG="$log"
  LOG_FORMAT=json RUST_LOG=info "$WRK_ROOT/target/release/crm-mock" --listen 127.0.0.1:0 "$@" \
    2>"$log" &
  CRM_MOCK_PID=$!
  CRM_MOCK_URL=""
  local tries
  for tries in $(seq 1 100); do
    CRM_MOCK_URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n1 || true)
    if [ -n "$CRM_MOCK_URL" ] && curl -fsS -o /dev/null "$CRM_MOCK_URL/healthz"; then
      echo "[wrk] crm-mock $* listening on $CRM_MOCK_URL (pid $CRM_MOCK_PID)" >&2
      return 0
    fi
    if ! kill -0 "$CRM_MOCK_PID" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "[wrk] crm-mock did not come up (tries: $tries); its log:" >&2
  cat "$log" >&2
  return 1
}

crm_mock_stop() {
  if [ -n "${CRM_MOCK_PID:-}" ] && kill -0 "$CRM_MOCK_PID" 2>/dev/null; then
    kill -TERM "$CRM_MOCK_PID"
    wait "$CRM_MOCK_PID" || true
  fi
  CRM_MOCK_PID=""
  rm -f "${CRM_MOCK_LOG:-}"
}

# Parses the WRK_RESULT line printed by the Lua done() hook into WRK_* variables.
wrk_parse() {
  local line="$1"
  WRK_REQUESTS=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$line")
  WRK_RPS=$(sed -n 's/.*rps=\([0-9.]*\).*/\1/p' <<<"$line")
  WRK_P50_MS=$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  WRK_P99_MS=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  WRK_NON2XX=$(sed -n 's/.*non2xx=\([0-9]*\).*/\1/p' <<<"$line")
  WRK_SOCKET_ERRORS=$(sed -n 's/.*socket_errors=\([0-9]*\).*/\1/p' <<<"$line")
}

WRK_DONE_LUA='
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx=%d socket_errors=%d\n",
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout))
end
'

wrk_run() {
  local script="$1"; shift
  local out
  out=$(wrk --script "$script" "$@" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" >&2
  wrk_parse "$(grep '^WRK_RESULT' <<<"$out")"
}

wrk_post_customers() {
  local url="$1" seconds="$2" threads="$3" connections="$4" prefix="$5"
  wrk_ensure
  local script
  script=$(mktemp --suffix=.lua)
  # Every thread has its own Lua state: ids are prefix-thread-counter, unique across the run.
  cat >"$script" <<'LUA'
local threads_started = 0
function setup(thread)
  threads_started = threads_started + 1
  thread:set("thread_number", threads_started)
end
function init(args)
  id_prefix = (args[1] or "wrk") .. "-" .. thread_number .. "-"
  counter = 0
end
function request()
  counter = counter + 1
  local id = id_prefix .. counter
  local body = '{"id":"' .. id .. '","first_name":"Ada","last_name":"Lovelace","email":"'
    .. id .. '@example.com"}'
  return wrk.format("POST", "/customers", { ["Content-Type"] = "application/json" }, body)
end
LUA
  echo "$WRK_DONE_LUA" >>"$script"
  WRK_COMMAND="wrk --threads $threads --connections $connections --duration ${seconds}s --latency --script post-customers.lua $url -- $prefix"
  echo "[wrk] $WRK_COMMAND" >&2
  wrk_run "$script" --threads "$threads" --connections "$connections" --duration "${seconds}s" \
    --timeout 5s --latency "$url" -- "$prefix"
  rm -f "$script"
}

wrk_get() {
  local url="$1" seconds="$2" threads="$3" connections="$4"
  wrk_ensure
  local script
  script=$(mktemp --suffix=.lua)
  echo "$WRK_DONE_LUA" >"$script"
  WRK_COMMAND="wrk --threads $threads --connections $connections --duration ${seconds}s --latency $url"
  echo "[wrk] $WRK_COMMAND" >&2
  wrk_run "$script" --threads "$threads" --connections "$connections" --duration "${seconds}s" \
    --timeout 5s --latency "$url"
  rm -f "$script"
}
