#!/usr/bin/env bash
# Deploys simq on the running local cluster (scripts/cluster.sh start) and serves a corpus:
#   1. build the dg (skipped when the same corpus, model and options were built before),
#   2. run the blob store, publish the dg (blobs + manifest in Consul KV),
#   3. run the embedder, roll the shards out (canaries when another dg runs; flip; promote),
#   4. run the balancer and wait until it answers.
# Idempotent: a second run with the same corpus changes nothing. The binaries, the model
# and ONNX Runtime go into the blob store too (by sha256): every job fetches them from
# there as checksummed artifacts, so the same specs run on any node.
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
# nomad_run JOBFILE VAR=VALUE...: register one of simq's job specs (the copy compiled into
# simq-indexer, the one rollout registers too) and wait until its deployment succeeds.
# simq-indexer takes its Nomad token from NOMAD_TOKEN_FILE (secure mode, above).
nomad_run() {
  local file=$1
  shift
  "$bin/simq-indexer" run-job "${file%.nomad.hcl}" "$@" --nomad "$NOMAD_ADDR" >"$SIMQ_CLUSTER_DIR/last-job-run.log" 2>&1 ||
    { tail -n 20 "$SIMQ_CLUSTER_DIR/last-job-run.log" >&2; die "simq-indexer run-job ${file%.nomad.hcl} failed (above)"; }
}

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
  local svc entries=""
  for svc in simq-balancer simq-embedder simq-shard; do
    entries+="$(ncurl -fsS "$CONSUL_HTTP_ADDR/v1/health/service/$svc")"$'\n'
  done
  python3 - "$NODES_COUNT" "$dg" "$entries" <<'PY' >&2 || die "placement check failed (above)"
import json, sys
n, dg = int(sys.argv[1]), sys.argv[2]
where, bad = {}, []
for line in sys.argv[3].splitlines():
    if not line.strip():
        continue
    for e in json.loads(line):
        s, node = e["Service"], e["Node"]["Node"]
        passing = all(c["Status"] == "passing" for c in e["Checks"])
        tags = dict(t.split("=", 1) for t in s["Tags"] if "=" in t)
        key = s["Service"] + (f" shard {tags['shard']}" if "shard" in tags else "")
        if s["Service"] == "simq-shard" and tags.get("dg") != dg:
            continue
        where.setdefault(key, []).append(f"{node}({s['Address']}:{s['Port']}{'' if passing else ', NOT passing'})")
        if not passing:
            bad.append(f"{key} on {node} is not passing")
for key in sorted(where):
    print(f"  {key}: {', '.join(sorted(where[key]))}")
nodes = {w.split("(")[0] for ws in where.values() for w in ws}
if len(nodes) < n:
    bad.append(f"instances on {len(nodes)} nodes ({', '.join(sorted(nodes))}), not all {n}")
for key, ws in where.items():
    on = [w.split("(")[0] for w in ws]
    if key.startswith("simq-shard") and len(set(on)) < len(on):
        bad.append(f"{key}: two replicas on one node ({', '.join(on)})")
    # One balancer and one embedder per node: a node lost then costs one of each.
    if key in ("simq-balancer", "simq-embedder") and len(on) <= n and len(set(on)) < len(on):
        bad.append(f"{key}: two instances on one node ({', '.join(sorted(on))})")
for b in bad:
    print("  FAIL: " + b)
sys.exit(1 if bad else 0)
PY
  log "placement: every node runs instances, balancers and embedders one per node, the replicas of each shard on different nodes"
}

log "build: $corpus ($shards shards, $clusters clusters)"
dg_dir="$("$bin/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --shards "$shards" --clusters "$clusters")"
dg="$(basename "$dg_dir")"

log "blob store"
if [ $nodes = 1 ]; then
  # The nodes' replicated SeaweedFS (scripts/nodes.sh): simq-indexer writes through any
  # node's S3 gateway, each node's Nomad client reads from its own.
  blobs="$(nodes_blobs)"
  SIMQ_S3_ENDPOINTS="$(nodes_s3_endpoints)"
  export SIMQ_S3_ENDPOINTS
  blob_url="$(nodes_blob_url)"
else
  blob_url="http://127.0.0.1:8090"
  nomad_run blobs.nomad.hcl "indexer_bin=$bin/simq-indexer" "dir=$blobs"
fi
"$bin/simq-indexer" publish "$dg_dir" --blobs "$blobs" >/dev/null
# blob_put FILE: store FILE in the blob store under its sha256 (content-checked, as publish
# stores shard files) and print the sha256; the jobs fetch <blob_url>/<sha256> and check it.
blob_put() { "$bin/simq-indexer" put-blob "$1" --blobs "$blobs"; }
# What the jobs run, as artifacts: binaries, ONNX Runtime, the model's files.
model_files=""
for f in model.onnx tokenizer.json simq-model.json; do
  model_files+="${model_files:+, }\"$f\" = \"$(blob_put "$SIMQ_MODEL_DIR/$f")\""
done

log "embedder"
model_id="$("$bin/simq-indexer" model-id)"
nomad_run embedder.nomad.hcl "model_id=$model_id" "blob_url=$blob_url" "embedder_sha256=$(blob_put "$bin/simq-embedder")" \
  "ort_sha256=$(blob_put "$ORT_LIB")" "model_files={$model_files}" "count=$embedders" "driver=$driver"

log "shards of $dg"
if [ $nodes = 1 ]; then
  # Every node fetches simq-shard from the blob store; each shard's replicas on distinct
  # nodes, so new dgs roll out as new groups beside the old (indexer/src/rollout.rs).
  guard_cluster_addresses
  "$bin/simq-indexer" rollout "$dg" --replicas "$replicas" --blob-url "$blob_url" \
    --shard-bin-sha256 "$(blob_put "$bin/simq-shard")" --driver "$driver" --replicas-apart true >/dev/null
else
  "$bin/simq-indexer" rollout "$dg" --replicas "$replicas" --blob-url "$blob_url" --shard-bin "$bin/simq-shard" >/dev/null
fi

log "balancer on $([ $nodes = 1 ] && echo "each node's address" || echo 127.0.0.1):$port"
# One host: every embedder shares its cores, so one takes every call (stable). Nodes: each
# balancer uses its own node's embedder first (local).
embedder_order="$([ $nodes = 1 ] && echo local || echo stable)"
nomad_run balancer.nomad.hcl "blob_url=$blob_url" "balancer_sha256=$(blob_put "$bin/simq-balancer")" "driver=$driver" \
  "embedder_order=$embedder_order" "port=$port" "nprobe=$nprobe" "consul_wait_secs=$consul_wait" "count=$balancers" "api_keys=$api_keys" "consul_token_file=$balancer_token"
# Ready means the balancers route with this dg (not merely that something answers): on the
# public port's /v1/status, or, when that needs an admin key, on each instance's own
# admin port as simq-indexer status reads them.
ready() {
  local out k
  if [ $nodes = 1 ]; then
    # Every node's balancer (of the nodes that are on) routes with this dg.
    for ((k = 1; k <= NODES_COUNT; k++)); do
      powered_off "$k" && continue
      out="$(ncurl -fsS "http://$(node_addr "$k"):$port/v1/status" 2>/dev/null)" || return 1
      [[ "$out" == *"\"dg\":\"$dg\""* ]] || return 1
    done
  elif [ "$api_keys" = required ]; then
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
if [ $nodes = 1 ]; then
  check_nodes
  log "serving dg $dg at $(for ((k = 1; k <= NODES_COUNT; k++)); do printf 'http://%s:%s ' "$(node_addr "$k")" "$port"; done)"
else
  log "serving dg $dg at http://127.0.0.1:$port"
fi
echo "$dg"
}; exit
