#!/usr/bin/env bash
# The main job: set up everything (cached after the first run) and bring up a local simq
# cluster on loopback. Stop it with scripts/down.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$SIMQ_ROOT/scripts/setup.sh"
"$SIMQ_ROOT/scripts/cluster.sh" start
"$SIMQ_ROOT/scripts/cluster.sh" status
cat <<MSG

simq's local cluster is up:
  Consul UI and API  $CONSUL_HTTP_ADDR/ui
  Nomad UI and API   $NOMAD_ADDR/ui
  logs and state     $SIMQ_CLUSTER_DIR
Stop it with: scripts/down.sh
MSG
