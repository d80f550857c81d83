# Consul agent (one server) for a local simq cluster: everything on loopback, nothing phones home.
# scripts/cluster.sh starts it with: consul agent -server -bootstrap-expect 1 -data-dir DIR -config-file consul/dev-agent.hcl
disable_update_check = true
client_addr          = "127.0.0.1"
bind_addr            = "127.0.0.1"
advertise_addr       = "127.0.0.1"
log_level            = "INFO"

# One server on this machine: elect at once, no waiting for peers.
performance {
  raft_multiplier = 1
}
