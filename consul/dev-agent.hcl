# Consul dev agent for a local simq cluster: everything on loopback, nothing phones home.
# scripts/cluster.sh starts it with: consul agent -dev -config-file consul/dev-agent.hcl
disable_update_check = true
client_addr          = "127.0.0.1"
bind_addr            = "127.0.0.1"
advertise_addr       = "127.0.0.1"
log_level            = "INFO"
