#!/usr/bin/env bash
# The main job: set up everything (cached after the first run), start the local cluster,
# and serve the real corpus (about 150k questions) through Nomad; then print an example
# query. Stop everything with scripts/down.sh. Settings: see scripts/deploy.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$SIMQ_ROOT/scripts/setup.sh"
"$SIMQ_ROOT/scripts/cluster.sh" start
dg="$("$SIMQ_ROOT/scripts/deploy.sh")"
port="${SIMQ_PORT:-8080}"
query='{"query": "How long did the war last?", "k": 3}'
cat <<MSG

simq serves dg $dg at http://127.0.0.1:$port

  curl -s -X POST http://127.0.0.1:$port/v1/query -d '$query'
MSG
curl -s -X POST "http://127.0.0.1:$port/v1/query" -d "$query"
cat <<MSG


Also: GET /v1/status, GET /metrics, GET /health on the same port;
Consul UI $CONSUL_HTTP_ADDR/ui, Nomad UI $NOMAD_ADDR/ui, state and logs in $SIMQ_CLUSTER_DIR.
Stop it with: scripts/down.sh
MSG
