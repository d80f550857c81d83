# Consul server of one node of simq's multi-node cluster on this machine (scripts/nodes.sh).
# What every node's server has in common lives here; what differs per node (name, address,
# data dir, peers to join, bootstrap_expect) is written by scripts/nodes.sh into
# $SIMQ_CLUSTER_DIR/nodes/nK/consul.hcl, as a real deployment would template it per
# machine. scripts/nodes.sh starts each server inside the node's network namespace with:
#   consul agent -config-file consul/node-agent.hcl -config-file <node dir>/consul.hcl
server = true

# Nothing phones home: no update check, no anonymous usage signature.
disable_update_check        = true
disable_anonymous_signature = true
log_level                   = "INFO"

# Fast elections and failure detection (the production default is 5 for slow clouds):
# losing a node's server costs seconds, not tens of seconds.
performance {
  raft_multiplier = 1
}

# A node that is off (power-off, partition) is expected back: autopilot must not remove
# its server from the Raft configuration, which would leave a 2-voter cluster and make the
# returning node wait server_stabilization_time as a non-voter. With min_quorum = 3 the
# voters stay 3 and a returning server votes at once.
autopilot {
  min_quorum = 3
}
