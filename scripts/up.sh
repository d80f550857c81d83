#!/usr/bin/env bash
# The main job: set up what serving needs (cached after the first run), start the local
# cluster and serve the real corpus (158k search queries, scripts/corpus.sh) through Nomad; then print an
# example query. Stop everything with scripts/down.sh. Settings: see scripts/deploy.sh.
#
#   scripts/up.sh           answer as soon as possible (see below), then return
#   scripts/up.sh --wait    return only when the full corpus serves
#
# Secure mode: SIMQ_ACL=1 (Consul ACLs, default deny, least-privilege tokens) and
# SIMQ_API_KEYS=required (queries need an API key); see README "Security".
#
# The first time, building the full corpus takes about 8 minutes. So that the first
# answer does not wait for it, up.sh first serves a reproducible slice of the corpus
# (SIMQ_SLICE queries, every k-th line; default 5000), then builds the full corpus in
# the background (at low CPU priority, progress in $SIMQ_CLUSTER_DIR/full-corpus.log) and
# rolls it out with simq's own zero-downtime rollout: queries are answered throughout.
# Once the full corpus is built (or SIMQ_CORPUS names a corpus), later runs serve it
# directly.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The whole script is one group, read before it runs: editing or updating this file
# (git pull) while it runs cannot change what a running copy does next.
{

wait_full=0
case "${1:-}" in
  --wait) wait_full=1 ;;
  "") ;;
  -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown argument '$1' (usage: scripts/up.sh [--wait])" ;;
esac

started=$SECONDS
# Prometheus is not needed to serve: scripts/prometheus.sh and scripts/test.sh build it.
"$SIMQ_ROOT/scripts/setup.sh" debs consul nomad ort model
"$SIMQ_ROOT/scripts/cluster.sh" start
corpus="${SIMQ_CORPUS:-$("$SIMQ_ROOT/scripts/corpus.sh")}"
if [ -z "${SIMQ_BIN_DIR:-}" ]; then
  log "building release binaries (cargo build --release; several minutes the first time)"
  cargo_build "cargo build --release" --release --workspace --bins
  export SIMQ_BIN_DIR="$CARGO_TARGET_DIR/release"
fi
port="${SIMQ_PORT:-8080}"
log_file="$SIMQ_CLUSTER_DIR/full-corpus.log"

# wait_for_full: follow the background build and rollout until it ends; its status.
wait_for_full() {
  log "waiting until the full corpus serves (progress: $log_file)"
  local shown=0 n
  while pid_alive "$FULL_CORPUS_PID"; do
    n=$(wc -l <"$log_file")
    [ "$n" -le "$shown" ] || { sed -n "$((shown + 1)),${n}p" "$log_file" >&2; shown=$n; }
    sleep 1
  done
  sed -n "$((shown + 1)),\$p" "$log_file" >&2
  grep -q '^\[simq [0-9:]*\] serving dg ' "$log_file" || die "the full corpus did not roll out (log: $log_file)"
}

full_built() {
  SIMQ_MODEL_DIR="$SIMQ_MODEL_DIR" ORT_DYLIB_PATH="$ORT_LIB" "$SIMQ_BIN_DIR/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --only-if-built \
    ${SIMQ_SHARDS:+--shards "$SIMQ_SHARDS"} ${SIMQ_CLUSTERS:+--clusters "$SIMQ_CLUSTERS"} >/dev/null 2>&1
}

if pid_alive "$FULL_CORPUS_PID"; then
  log "the full corpus is still being built and rolled out in the background (log: $log_file)"
  dg="$("$SIMQ_BIN_DIR/simq-indexer" status 2>/dev/null | sed -n 's/^active: *\([^ ]*\).*/\1/p')"
  dg="${dg:-?}"
  slice=1
elif [ -n "${SIMQ_CORPUS:-}" ] || full_built; then
  dg="$("$SIMQ_ROOT/scripts/deploy.sh")"
  slice=0
else
  n="${SIMQ_SLICE:-5000}"
  log "the full corpus is not built yet: serving a slice of $n queries first"
  slice_corpus="$("$SIMQ_ROOT/scripts/corpus.sh" --sample "$n")"
  dg="$(SIMQ_CORPUS="$slice_corpus" SIMQ_CLUSTERS=256 "$SIMQ_ROOT/scripts/deploy.sh")"
  log "first answer possible after $((SECONDS - started)) s; now building the full corpus in the background"
  # A process group of its own (setsid), so down.sh ends it and everything it started;
  # nice 10, so serving keeps the CPU it needs.
  echo "[simq $(date +%H:%M:%S)] full corpus: build and rollout started (scripts/deploy.sh)" >"$log_file"
  setsid nice -n 10 env SIMQ_CORPUS="$corpus" "$SIMQ_ROOT/scripts/deploy.sh" </dev/null >>"$log_file" 2>&1 &
  echo $! >"$FULL_CORPUS_PID"
  slice=1
fi

query='{"query": "How long did the war last?", "k": 3}'
if [ $slice = 1 ]; then
  what="a slice of the corpus (dg $dg); the full corpus follows without downtime (log: $log_file)"
else
  what="dg $dg"
fi
if [ "${SIMQ_API_KEYS:-off}" = required ]; then
  token_note=""
  acl_enabled && token_note="CONSUL_HTTP_TOKEN_FILE=$SIMQ_SECRETS/indexer.token "
  cat <<MSG

simq serves $what at http://127.0.0.1:$port; queries need an API key:

  key=\$(${token_note}$SIMQ_BIN_DIR/simq-indexer keys create --label me)
  curl -s -H "Authorization: Bearer \$key" -X POST http://127.0.0.1:$port/v1/query -d '$query'
MSG
else
  cat <<MSG

simq serves $what at http://127.0.0.1:$port

  curl -s -X POST http://127.0.0.1:$port/v1/query -d '$query'
MSG
  curl -s -X POST "http://127.0.0.1:$port/v1/query" -d "$query"
fi
cat <<MSG


Also: GET /v1/status, GET /metrics, GET /health on the same port;
Consul UI $CONSUL_HTTP_ADDR/ui, Nomad UI $NOMAD_ADDR/ui, state and logs in $SIMQ_CLUSTER_DIR;
what runs: $SIMQ_BIN_DIR/simq-indexer status
Stop it with: scripts/down.sh
MSG
if [ $slice = 1 ] && [ $wait_full = 1 ]; then
  wait_for_full
  log "the full corpus serves, $((SECONDS - started)) s after this run started"
fi
}; exit
