#!/usr/bin/env bash
# `make soak` (not in CI): a million rows through crm-mock with the chaos test's faults (20% 5xx,
# 5% 429, 2% timeouts) and three integrators; reports the invariants and the time it took.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ROWS=${ROWS:-1000000} REPLICAS=${REPLICAS:-3} FAILURE_RATE=0.20 RATE_LIMIT_RATE=0.05 TIMEOUT_RATE=0.02 \
  exec "$ROOT/deploy/local/demo.sh"
