#!/usr/bin/env bash
# `make bench`: runs every deploy/local/bench.d/*.sh (each prints one Markdown section on stdout,
# progress on stderr) against release builds and writes BENCHMARKS.md with the machine and command.
# BENCH_ONLY=name runs just deploy/local/bench.d/name.sh and updates its section in place.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
OUT="$ROOT/BENCHMARKS.md"
# The load generator and the helpers the sections use come from apt on a fresh Debian machine:
# /usr/bin/time (package time) for peak RSS, free (procps) for the machine's memory.
# shellcheck source=deploy/local/lib-need.bash
. "$ROOT/deploy/local/lib-need.bash"
NEED_TAG=bench
need wrk:wrk jq:jq bc:bc curl:curl /usr/bin/time:time free:procps python3:python3 \
  psql:postgresql-client || exit 1
# The version the benchmarked server reports in its INFO line, not whichever nats-server is on PATH.
nats_version() {
  python3 - "${NATS_URL:-nats://127.0.0.1:4222}" <<'PY' 2>/dev/null || echo unknown
import json, socket, sys
from urllib.parse import urlparse
url = urlparse(sys.argv[1].split(",")[0])
with socket.create_connection((url.hostname or "127.0.0.1", url.port or 4222), 3) as s:
    line = s.makefile().readline()
print("v" + json.loads(line.split(" ", 1)[1])["version"])
PY
}
SECTIONS="$ROOT/.run/bench"
mkdir -p "$SECTIONS"
# Each section this run measures is written fresh; every other one (BENCH_ONLY) is carried over
# from the committed BENCHMARKS.md, found by its heading `## <script name>` or `## <name>: ...`.
THIS_RUN=$(mktemp -d)
trap 'rm -rf "$THIS_RUN"' EXIT
for script in deploy/local/bench.d/*.sh; do
  name=$(basename "$script" .sh)
  if [ -n "${BENCH_ONLY:-}" ] && [ "$BENCH_ONLY" != "$name" ]; then
    [ -f "$OUT" ] || continue
    awk -v name="$name" '
      /^## / { keep = ($0 == "## " name || index($0, "## " name ":") == 1) }
      keep { print }
    ' "$OUT" | sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' >"$THIS_RUN/$name.md"
    [ -s "$THIS_RUN/$name.md" ] || rm -f "$THIS_RUN/$name.md"
    continue
  fi
  echo "[bench] $name" >&2
  bash "$script" >"$SECTIONS/$name.md.tmp"
  mv "$SECTIONS/$name.md.tmp" "$SECTIONS/$name.md"
  cp "$SECTIONS/$name.md" "$THIS_RUN/$name.md"
done
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` (deploy/local/bench.sh); each section names the command behind it."
  echo
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "- kernel: $(uname -r); rustc: $(rustc --version)"
  echo "- nats-server: $(nats_version) (the server at NATS_URL; sections that start their own run \$NATS_SERVER_BIN, $(${NATS_SERVER_BIN:-nats-server} --version 2>/dev/null || echo unknown)); PostgreSQL: $(psql --version | awk '{print $3}')"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ) (sections not re-run then keep the figures, and the notes on load, of their own run)"
  echo
  for section in "$THIS_RUN"/*.md; do
    [ -e "$section" ] || continue
    cat "$section"
    echo
  done
} >"$OUT"
echo "[bench] wrote $OUT" >&2
