#!/usr/bin/env bash
# Runs every simq test: set-up (cached after the first run), unit tests, then the
# integration tests against a real local Consul + Nomad cluster, which it starts and stops.
#
#   scripts/test.sh              everything
#   scripts/test.sh -- FILTER    pass a test-name filter to cargo test
#
# A cluster that was already running is left running; one this script started is stopped,
# also when a test fails.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cargo_args=()
[ "${1:-}" = "--" ] && { shift; cargo_args=("$@"); }

"$SIMQ_ROOT/scripts/setup.sh"

export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR
cd "$SIMQ_ROOT"

log "build: cargo build --workspace --all-targets (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked --quiet

log "unit tests"
cargo test --workspace --locked --quiet "${cargo_args[@]}"

started_here=0
if ! "$SIMQ_ROOT/scripts/cluster.sh" status >/dev/null 2>&1; then
  "$SIMQ_ROOT/scripts/cluster.sh" start
  started_here=1
fi
cleanup() { [ $started_here -eq 0 ] || "$SIMQ_ROOT/scripts/cluster.sh" stop; }
trap cleanup EXIT

log "integration tests (real Consul, Nomad, model, LMDB)"
# One test at a time: they share one cluster and the machine's two cores.
cargo test --workspace --locked --quiet "${cargo_args[@]}" -- --ignored --test-threads=1
log "all tests passed"
