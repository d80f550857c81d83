#!/usr/bin/env bash
# Deploys simq on the running local cluster (scripts/cluster.sh start) and serves a corpus:
#   1. build the dg (skipped when the same corpus, model and options were built before),
#   2. simq-indexer deploy (indexer/src/deploy.rs): run the blob store, publish the dg,
#      put the binaries, ONNX Runtime and the model into the blob store (every job fetches
#      them by sha256, so the same specs run on any node), run the embedder, roll the shards
#      out (canaries when another dg runs; flip; promote), run the balancer, and wait until
#      the balancers route with the dg.
# This script only gathers the settings (environment, ACL tokens, the node cluster's
# addresses) and checks the node cluster at the end. Idempotent: a second run with the
# same corpus changes nothing.
#
#   scripts/deploy.sh           on the single-node cluster (scripts/cluster.sh start)
#   scripts/deploy.sh --nodes   on the multi-node cluster (scripts/cluster.sh start --nodes N,
#                               i.e. scripts/nodes.sh): the blob store is served by the host
#                               on the nodes' bridge, one balancer and one embedder per node,
#                               and at the end a query through each node's balancer and the
#                               placement of every instance are checked. Every request to a
#                               node address passes scripts/nodes.sh's node_address_ok.
# (One script for both: the steps, variables and artifacts are the same; only where the
# blob store runs, how many instances, and the final checks differ.)
#
# Settings (environment):
#   SIMQ_CORPUS    corpus file                  [default: the real corpus, scripts/corpus.sh]
#   SIMQ_BIN_DIR   directory of simq binaries   [default: release build, built here]
#   SIMQ_SHARDS    shards (k-means k)           [default: simq-indexer defaults]
#   SIMQ_CLUSTERS  fine clusters over all shards [default: simq-indexer defaults]
#   SIMQ_REPLICAS  replicas per shard           [default: 1; --nodes: 2]
#   SIMQ_EMBEDDERS embedder instances           [default: 2; --nodes: one per node]
#   SIMQ_BALANCERS balancer instances sharing SIMQ_PORT [default: 2; --nodes: one per node]
#   SIMQ_PORT      balancer port on 127.0.0.1 (--nodes: on each node's address) [default: 8080]
#   SIMQ_DRIVER    Nomad task driver, raw_exec or exec [default: raw_exec]
#   SIMQ_NPROBE    fine clusters probed per query [default: simq-indexer defaults]
#   SIMQ_CONSUL_WAIT  seconds a balancer's Consul blocking query may wait [default: 30]
#   SIMQ_API_KEYS  off, or required: queries need an API key (simq-indexer keys create) [default: off]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The whole script is one group, read before it runs: editing or updating this file
# (git pull) while it runs cannot change what a running copy does next.
{

nodes=0
case "${1:-}" in
  --nodes) nodes=1 ;;
  "") ;;
  *) die "unknown argument '$1' (usage: scripts/deploy.sh [--nodes])" ;;
esac
if [ $nodes = 1 ]; then
  # The node cluster's state and its guard (node_address_ok, ncurl); sourcing runs nothing.
  source "$SIMQ_ROOT/scripts/nodes.sh"
  load_state || die "no node cluster runs: scripts/cluster.sh start --nodes 3 first"
  # Its own Consul (the host's client agent) and Nomad (any node that answers); never the
  # single-node cluster's, nor its ACL tokens or namespace.
  export CONSUL_HTTP_ADDR="http://$OPS_CONSUL_HTTP"
  NOMAD_ADDR="$(nomad_url)" || die "no Nomad server of the node cluster answers (scripts/nodes.sh status)"
  export NOMAD_ADDR
  unset NOMAD_NAMESPACE
fi
corpus="${SIMQ_CORPUS:-$("$SIMQ_ROOT/scripts/corpus.sh")}"
replicas="${SIMQ_REPLICAS:-$([ $nodes = 1 ] && echo 2 || echo 1)}"
embedders="${SIMQ_EMBEDDERS:-$([ $nodes = 1 ] && echo "$NODES_COUNT" || echo 2)}"
balancers="${SIMQ_BALANCERS:-$([ $nodes = 1 ] && echo "$NODES_COUNT" || echo 2)}"
port="${SIMQ_PORT:-8080}"
driver="${SIMQ_DRIVER:-raw_exec}"
consul_wait="${SIMQ_CONSUL_WAIT:-30}"
api_keys="${SIMQ_API_KEYS:-off}"
# (Readiness on nodes reads each balancer's /v1/status, which required keys close.)
[ $nodes = 0 ] || [ "$api_keys" = off ] || die "deploy.sh --nodes runs with SIMQ_API_KEYS=off only (ACLs and keys on nodes: issue 31 item 6)"
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
# The layout and search defaults live in one place, the binaries (simq_contract::defaults).
default_of() { "$bin/simq-indexer" defaults | sed -n "s/^$1=//p"; }
shards="${SIMQ_SHARDS:-$(default_of shards)}"
clusters="${SIMQ_CLUSTERS:-$(default_of clusters)}"
nprobe="${SIMQ_NPROBE:-$(default_of nprobe)}"
export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR
# Secure mode: simq-indexer acts with the indexer's Consul token, the balancers with
# theirs; simq-indexer and the nomad CLI with the Nomad deployer token (simq's namespace).
balancer_token=""
if [ $nodes = 0 ] && acl_enabled; then
  export CONSUL_HTTP_TOKEN_FILE="$SIMQ_SECRETS/indexer.token"
  unset CONSUL_HTTP_TOKEN
  balancer_token="$SIMQ_SECRETS/balancer.token"
  if [ -f "$SIMQ_SECRETS/nomad-deployer.token" ]; then
    export NOMAD_TOKEN_FILE="$SIMQ_SECRETS/nomad-deployer.token"
    unset NOMAD_TOKEN
  fi
fi
# check_nodes: the acceptance of issue 31 for the node cluster: a query answered through
# every node's balancer, simq-indexer status, and instances on every node with the
# replicas of each shard on different nodes.
check_nodes() {
  local k out
  for ((k = 1; k <= NODES_COUNT; k++)); do
    powered_off "$k" && { log "node n$k: powered off, not asked"; continue; }
    out="$(ncurl -fsS -X POST "http://$(node_addr "$k"):$port/v1/query" -d '{"query": "How long did the war last?", "k": 3}')" ||
      die "node n$k: no answer from its balancer at $(node_addr "$k"):$port"
    log "node n$k: $(node_addr "$k"):$port answers: $(printf '%s' "$out" | json '"dg " + d["dg"] + ", degraded " + str(d.get("degraded")) + ", top: " + repr(d["results"][0]["text"])' 2>/dev/null || printf '%s' "$out" | cut -c1-200)"
  done
  guard_cluster_addresses
  "$bin/simq-indexer" status >&2
  "$bin/simq-indexer" check placement --nodes "$NODES_COUNT" --dg "$dg" >&2 || die "placement check failed (above)"
  log "placement: every node runs instances, balancers and embedders one per node, the replicas of each shard on different nodes"
}

log "build: $corpus ($shards shards, $clusters clusters)"
dg_dir="$("$bin/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --shards "$shards" --clusters "$clusters")"

deploy=(--bin-dir "$bin" --ort-lib "$ORT_LIB" --model-dir "$SIMQ_MODEL_DIR" --nomad "$NOMAD_ADDR"
  --replicas "$replicas" --embedders "$embedders" --balancers "$balancers" --port "$port" --driver "$driver"
  --nprobe "$nprobe" --consul-wait-secs "$consul_wait" --api-keys "$api_keys")
[ -z "$balancer_token" ] || deploy+=(--balancer-token-file "$balancer_token")
if [ $nodes = 1 ]; then
  # The nodes' replicated SeaweedFS (scripts/nodes.sh): simq-indexer writes through any
  # node's S3 gateway, each node's Nomad client reads from its own. Every node fetches
  # simq-shard from the blob store; each shard's replicas on distinct nodes, so new dgs
  # roll out as new groups beside the old (indexer/src/rollout.rs). Each balancer uses its
  # own node's embedder first.
  deploy+=(--blobs "$(nodes_blobs)" --s3-endpoint "$(nodes_s3_endpoints)" --blob-url "$(nodes_blob_url)"
    --shard-bin-from-blobs --replicas-apart true --embedder-order local)
  # simq-indexer sends to the addresses Consul names: node addresses of this cluster only.
  guard_cluster_addresses
else
  # One host: the blobs job serves the cache's directory; every embedder shares its
  # cores, so one takes every call (stable).
  deploy+=(--blobs "$blobs" --serve-blobs --blob-url http://127.0.0.1:8090 --embedder-order stable)
fi
log "deploy: $dg_dir (simq-indexer deploy; on $([ $nodes = 1 ] && echo "each node's address" || echo 127.0.0.1):$port)"
dg="$("$bin/simq-indexer" deploy "$dg_dir" "${deploy[@]}")" || die "simq-indexer deploy failed (above)"
if [ $nodes = 1 ]; then
  check_nodes
  log "serving dg $dg at $(for ((k = 1; k <= NODES_COUNT; k++)); do printf 'http://%s:%s ' "$(node_addr "$k")" "$port"; done)"
else
  log "serving dg $dg at http://127.0.0.1:$port"
fi
echo "$dg"
}; exit
