#!/usr/bin/env bash
# Stops everything scripts/up.sh started: Nomad jobs, then Nomad, then Consul.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$SIMQ_ROOT/scripts/cluster.sh" stop
