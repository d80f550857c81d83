# Nomad agent (server and client) of one node of simq's multi-node cluster on this
# machine (scripts/nodes.sh). What every node has in common lives here; what differs per
# node (name, address, data dir, peers, network interface, bootstrap_expect) is written
# by scripts/nodes.sh into $SIMQ_CLUSTER_DIR/nodes/nK/nomad.hcl, as a real deployment
# would template it per machine. Agent configs are HCL1 (blocks merge across -config files).
# scripts/nodes.sh starts each agent inside the node's network namespace (and a mount
# namespace of its own, where the node's cgroup subtree is bind-mounted over
# /sys/fs/cgroup, see there) with:
#   nomad agent -config nomad/node-agent.hcl -config <node dir>/nomad.hcl
disable_update_check        = true
disable_anonymous_signature = true
log_level                   = "INFO"

server {
  enabled = true
  # How soon a node that stopped answering (power-off, partition, freeze) is marked down
  # and its allocations replaced: its heartbeat TTL (5-10 s here: min_heartbeat_ttl plus a
  # random stagger) plus heartbeat_grace, 30-35 s in all. The grace covers a live client
  # whose RPC still waits on a server that lost power: it notices only when its yamux
  # keep-alive to that server times out. Measured on the 3-node cluster: n2's client went
  # 27.6 s without a heartbeat after n1 (its server) lost power; with a 10 s grace Nomad
  # marked n2 disconnected too, and its reconnection cancelled the pending replacement of
  # n1's allocations ("allocs reconnected"). After a leader election the new leader cannot
  # know when each client last called, and gives every client failover_heartbeat_ttl: 5
  # min by default, which is how long a lost leader's node would otherwise keep its
  # allocations (measured: n3, the leader's node, still "ready" 55 s after its power-off);
  # 30 s, not less: a client attached to the lost leader needs up to ~28 s to turn to another.
  # On a small cluster of reliable links short values cost nothing; on a large or lossy
  # one keep the defaults (each heartbeat is a Raft-free RPC, bounded by
  # max_heartbeats_per_second).
  heartbeat_grace        = "25s"
  min_heartbeat_ttl      = "5s"
  failover_heartbeat_ttl = "30s"
}

client {
  enabled = true
  # The VM reports no CPU frequency: without this Nomad sees 0 MHz and places nothing.
  cpu_total_compute = 4000
  options {
    # Cloud fingerprinters probe 169.254.169.254; nothing may leave this machine.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

# Do not set no_cgroups: it is a startup error since Nomad 1.8.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

# The node's own Consul server, which also listens on the namespace's loopback.
consul {
  address = "127.0.0.1:8500"
}
