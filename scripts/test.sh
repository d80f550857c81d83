#!/usr/bin/env bash
# Runs every simq test: set-up (cached after the first run), unit tests, then the
# integration tests against a real local Consul + Nomad cluster, which it starts and stops.
#
#   scripts/test.sh              everything
#   scripts/test.sh -- FILTER    pass a test-name filter to cargo test
#
# The tests deploy and purge simq's jobs, so they never run on a cluster somebody else
# started (scripts/up.sh's stack): with one running, this script refuses and says how to
# proceed. SIMQ_TEST_REUSE_CLUSTER=1 runs them on it anyway (its jobs are replaced). The
# cluster this script starts is stopped at the end, also when a test fails.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The whole script is one group, read before it runs: editing or updating this file
# (git pull) while it runs cannot change what a running copy does next.
{

cargo_args=()
[ "${1:-}" = "--" ] && { shift; cargo_args=("$@"); }

# (The status is read whole first: `status | grep -q` under pipefail fails when grep stops
# reading early.)
cluster_state="$("$SIMQ_ROOT/scripts/cluster.sh" status 2>/dev/null || true)"
if [ "${SIMQ_TEST_REUSE_CLUSTER:-0}" != 1 ] && [[ "$cluster_state" == *running* ]]; then
  die "a simq cluster is running in $SIMQ_CLUSTER_DIR (scripts/up.sh?): the tests would replace its jobs and dgs. Stop it with scripts/down.sh first, or run the tests on it anyway with SIMQ_TEST_REUSE_CLUSTER=1"
fi

# First: is every pinned artifact still served? (A fresh machine needs each one; a warm
# cache would hide a removed version until then.)
"$SIMQ_ROOT/scripts/setup.sh" check
# The fast gate, before the long set-up and suite (it needs only the Debian packages and
# ShellCheck): formatting, the scripts, lints.
cd "$SIMQ_ROOT" || exit 1
"$SIMQ_ROOT/scripts/setup.sh" debs shellcheck
log "fast gate: cargo fmt --check"
cargo fmt --all -- --check >/dev/null || die "the code is not formatted as rustfmt would (run cargo fmt --all; cargo fmt --all -- --check shows where)"
log "fast gate: shellcheck (warnings) on every script"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run 2>/dev/null || ls scripts/*.sh scripts/bench/*.sh .ci/run)
"$SHELLCHECK_BIN" -S warning "${scripts[@]}" || die "shellcheck found problems in the scripts (above)"
log "fast gate: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings || die "clippy found warnings (above): fix them or, where a lint is wrong, allow it there with a reason"

"$SIMQ_ROOT/scripts/setup.sh"
log "set-up error cases"
bash "$SIMQ_ROOT/scripts/test-setup-errors.sh"

# The tests' queries: 20,000 real queries of open-licence sources that the repo carries
# (testdata/corpus/README.md), so no test needs the corpus download.
SIMQ_TEST_CORPUS="$SIMQ_ROOT/testdata/corpus/queries-20000.txt"
SIMQ_PROMETHEUS_DIR="$(dirname "$PROMETHEUS_BIN")"
export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR SIMQ_MODEL_B_DIR SIMQ_TEST_CORPUS SIMQ_CACHE SIMQ_CLUSTER_DIR SIMQ_PROMETHEUS_DIR
cd "$SIMQ_ROOT" || exit 1

log "build: cargo build --workspace --all-targets (target dir $CARGO_TARGET_DIR)"
cargo_build "cargo build" --workspace --all-targets

log "unit tests"
cargo test --workspace --locked --quiet "${cargo_args[@]}"

log "prometheus config and alert rules (promtool)"
"$PROMTOOL_BIN" check config "$SIMQ_ROOT/consul/prometheus/prometheus.yml" >/dev/null
"$PROMTOOL_BIN" test rules "$SIMQ_ROOT/consul/prometheus/alerts.test.yml" >/dev/null

# Every socket of the agents must be bound to 127.0.0.1.
check_loopback_only() {
  local pids bad
  pids="$(cat "$SIMQ_CLUSTER_DIR/consul/consul.pid")|$(cat "$SIMQ_CLUSTER_DIR/nomad/nomad.pid")"
  bad="$(ss -Htulnp | grep -E "pid=($pids)," | awk '{print $5}' | grep -v '^127\.0\.0\.1:' || true)"
  [ -z "$bad" ] || die "agents listen beyond loopback: $bad"
  log "agents listen on 127.0.0.1 only ($(ss -Htulnp | grep -cE "pid=($pids),") sockets)"
}

# After stop: no agent and no task process may remain.
check_stopped() {
  local left
  left="$(pgrep -f "$SIMQ_CACHE/bin/(consul|nomad)-" || true)"
  [ -z "$left" ] || die "processes left after cluster stop: $left"
  left="$(awk '{print $2}' /proc/mounts | grep -c "^$SIMQ_CLUSTER_DIR/" || true)"
  [ "$left" = 0 ] || die "$left mounts left under $SIMQ_CLUSTER_DIR after cluster stop"
  log "cluster stop left no processes and no mounts"
}

started_here=0
if ! "$SIMQ_ROOT/scripts/cluster.sh" status >/dev/null 2>&1; then
  "$SIMQ_ROOT/scripts/cluster.sh" start
  started_here=1
fi
cleanup() {
  local rc=$?
  if [ $started_here -eq 1 ]; then
    "$SIMQ_ROOT/scripts/cluster.sh" stop
    check_stopped || rc=1
  fi
  exit $rc
}
trap cleanup EXIT
check_loopback_only

log "integration tests (real Consul, Nomad, model, LMDB)"
# One test at a time: they share one cluster and the machine's two cores.
cargo test --workspace --locked --quiet --no-fail-fast "${cargo_args[@]}" -- --ignored --test-threads=1

# Secure mode needs a cluster started with ACLs: after this one stops. Run with no filter
# or with the filter "acl".
if [ ${#cargo_args[@]} -eq 0 ] || [ "${cargo_args[*]}" = acl ]; then
  if [ $started_here -eq 1 ]; then
    "$SIMQ_ROOT/scripts/cluster.sh" stop
    check_stopped
    started_here=0
    log "secure mode: Consul ACLs, default deny, least-privilege tokens (scripts/test-acl.sh)"
    bash "$SIMQ_ROOT/scripts/test-acl.sh"
    check_stopped
  else
    log "secure mode test skipped: it starts its own cluster, and this run reuses a running one"
  fi
fi
# The 3-node cluster (network namespaces): quorum, spread placement, a powered-off leader
# node, rejoin, nothing left behind; then simq on it under faults. Needs the single-node
# cluster stopped (port 8500).
if [ ${#cargo_args[@]} -eq 0 ] || [ "${cargo_args[*]}" = nodes ]; then
  if [ $started_here -eq 0 ] && ! "$SIMQ_ROOT/scripts/cluster.sh" status >/dev/null 2>&1; then
    log "3-node cluster in network namespaces (scripts/test-nodes.sh)"
    bash "$SIMQ_ROOT/scripts/test-nodes.sh"
    check_stopped
    # simq on it: a node lost in five ways, and a rollout and a rollback with a node down,
    # under unique-query load at half its capacity (about 8 minutes).
    log "simq on 3 nodes: faults under load (scripts/test-node-faults.sh)"
    cargo_build "cargo build --release (binaries, load generator)" --release --workspace --bins --examples
    bash "$SIMQ_ROOT/scripts/test-node-faults.sh"
    check_stopped
  else
    log "3-node cluster test skipped: a single-node cluster runs"
  fi
fi
log "all tests passed"
}; exit
