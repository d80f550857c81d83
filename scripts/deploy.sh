#!/usr/bin/env bash
# Deploys simq on the running local cluster (scripts/cluster.sh start) and serves a corpus:
#   1. build the dg (skipped when the same corpus, model and options were built before),
#   2. run the blob store, publish the dg (blobs + manifest in Consul KV),
#   3. run the embedder, roll the shards out (canaries when another dg runs; flip; promote),
#   4. run the balancer and wait until it answers.
# Idempotent: a second run with the same corpus changes nothing.
#
# Settings (environment):
#   SIMQ_CORPUS    corpus file                  [default: the real corpus, scripts/corpus.sh]
#   SIMQ_BIN_DIR   directory of simq binaries   [default: release build, built here]
#   SIMQ_SHARDS    shards (k-means k)           [default: 2]
#   SIMQ_CLUSTERS  fine clusters over all shards [default: 4096]
#   SIMQ_REPLICAS  replicas per shard           [default: 1]
#   SIMQ_EMBEDDERS embedder instances           [default: 2]
#   SIMQ_BALANCERS balancer instances sharing SIMQ_PORT [default: 2]
#   SIMQ_PORT      balancer port on 127.0.0.1   [default: 8080]
#   SIMQ_NPROBE    fine clusters probed per query [default: 576]
#   SIMQ_CONSUL_WAIT  seconds a balancer's Consul blocking query may wait [default: 30]
#   SIMQ_API_KEYS  off, or required: queries need an API key (simq-indexer keys create) [default: off]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The whole script is one group, read before it runs: editing or updating this file
# (git pull) while it runs cannot change what a running copy does next.
{

corpus="${SIMQ_CORPUS:-$("$SIMQ_ROOT/scripts/corpus.sh")}"
shards="${SIMQ_SHARDS:-2}"
replicas="${SIMQ_REPLICAS:-1}"
embedders="${SIMQ_EMBEDDERS:-2}"
balancers="${SIMQ_BALANCERS:-2}"
port="${SIMQ_PORT:-8080}"
clusters="${SIMQ_CLUSTERS:-4096}"
nprobe="${SIMQ_NPROBE:-576}"
consul_wait="${SIMQ_CONSUL_WAIT:-30}"
api_keys="${SIMQ_API_KEYS:-off}"
blobs="$SIMQ_CACHE/blobs"
if [ -z "${SIMQ_BIN_DIR:-}" ]; then
  log "building release binaries (cargo build --release; several minutes the first time)"
  cargo_build "cargo build --release" --release --workspace --bins
  SIMQ_BIN_DIR="$CARGO_TARGET_DIR/release"
fi
bin="$SIMQ_BIN_DIR"
for b in simq-indexer simq-embedder simq-shard simq-balancer; do
  [ -x "$bin/$b" ] || die "$bin/$b is missing: build with cargo build --release"
done
export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR
# Secure mode: simq-indexer acts with the indexer's Consul token, the balancers with
# theirs; simq-indexer and the nomad CLI with the Nomad deployer token (simq's namespace).
balancer_token=""
if acl_enabled; then
  export CONSUL_HTTP_TOKEN_FILE="$SIMQ_SECRETS/indexer.token"
  unset CONSUL_HTTP_TOKEN
  balancer_token="$SIMQ_SECRETS/balancer.token"
  if [ -f "$SIMQ_SECRETS/nomad-deployer.token" ]; then
    export NOMAD_TOKEN_FILE="$SIMQ_SECRETS/nomad-deployer.token"
    unset NOMAD_TOKEN
  fi
fi
nomad_run() { # nomad_run JOBFILE VAR=VALUE...: register and wait for the deployment
  local file=$1
  shift
  local vars=() v
  for v in "$@"; do vars+=(-var "$v"); done
  # The CLI takes its token from NOMAD_TOKEN (environment, never the command line).
  (
    [ -z "${NOMAD_TOKEN_FILE:-}" ] || export NOMAD_TOKEN="$(cat "$NOMAD_TOKEN_FILE")"
    exec "$NOMAD_BIN" job run -address="$NOMAD_ADDR" "${vars[@]}" "$SIMQ_ROOT/nomad/$file"
  ) >"$SIMQ_CLUSTER_DIR/last-job-run.log" 2>&1 ||
    { tail -n 20 "$SIMQ_CLUSTER_DIR/last-job-run.log" >&2; die "nomad job run nomad/$file failed (above)"; }
}

log "build: $corpus ($shards shards, $clusters clusters)"
dg_dir="$("$bin/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --shards "$shards" --clusters "$clusters")"
dg="$(basename "$dg_dir")"

log "blob store"
nomad_run blobs.nomad.hcl "indexer_bin=$bin/simq-indexer" "dir=$blobs"
"$bin/simq-indexer" publish "$dg_dir" --blobs "$blobs" >/dev/null

log "embedder"
model_id="$("$bin/simq-indexer" model-id)"
nomad_run embedder.nomad.hcl "model_id=$model_id" "model_dir=$SIMQ_MODEL_DIR" "embedder_bin=$bin/simq-embedder" "ort_library=$ORT_LIB" "count=$embedders"

log "shards of $dg"
"$bin/simq-indexer" rollout "$dg" --replicas "$replicas" --shard-bin "$bin/simq-shard" >/dev/null

log "balancer on 127.0.0.1:$port"
nomad_run balancer.nomad.hcl "balancer_bin=$bin/simq-balancer" "port=$port" "nprobe=$nprobe" "consul_wait_secs=$consul_wait" "count=$balancers" "api_keys=$api_keys" "consul_token_file=$balancer_token"
# Ready means the balancers route with this dg (not merely that something answers): on the
# public port's /v1/status, or, when that needs an admin key, on each instance's own
# admin port as simq-indexer status reads them.
ready() {
  local out
  if [ "$api_keys" = required ]; then
    out="$("$bin/simq-indexer" status 2>/dev/null)" || return 1
    [ "$(grep -c "passing, routes with $dg" <<<"$out")" -ge "$balancers" ]
  else
    out="$(curl -fsS "http://127.0.0.1:$port/v1/status" 2>/dev/null)" || return 1
    [[ "$out" == *"\"dg\":\"$dg\""* ]]
  fi
}
deadline=$((SECONDS + 60))
until ready; do
  [ $SECONDS -lt $deadline ] || die "balancer did not serve $dg within 60 s (see nomad alloc logs)"
  sleep 0.5
done
log "serving dg $dg at http://127.0.0.1:$port"
echo "$dg"
}; exit
