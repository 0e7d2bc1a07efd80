# Shared by the crm-integrator benchmark scripts (source it; not a benchmark itself, hence not *.sh):
# after sourcing, $WORK is a scratch directory, every pid added to PIDS is killed and every
# namespace added to NAMESPACES is deleted on exit, and the release binaries are built.
#   free_port    a TCP port nothing listens on right now, on 127.0.0.1
#   RUN_ID       a suffix that makes this run's namespaces unique
RUN_ID="$(date +%s)_$$"
WORK=$(mktemp -d)
PIDS=()
NAMESPACES=()

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bench_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${NAMESPACES[@]}"; do
    target/release/integrator-bench-fill --nats-url "$NATS_URL" --namespace "$ns" --delete >&2 || true
  done
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

echo "[bench] building release binaries" >&2
cargo build --release -q --workspace --bins >&2  # same feature set as `make release`: no rebuild
