# Nomad dev agent (server + client) for a local simq cluster, on loopback only.
# scripts/cluster.sh starts it from its state dir with:
#   nomad agent -dev -config nomad/dev-agent.hcl -data-dir <state>/nomad
disable_update_check = true
bind_addr            = "127.0.0.1"
log_level            = "INFO"

client {
  # The VM reports no CPU frequency: without this Nomad sees 0 MHz and places nothing.
  cpu_total_compute = 4000
  # Services register with 127.0.0.1 addresses.
  network_interface = "lo"
  options {
    # Cloud fingerprinters probe 169.254.169.254; nothing may leave loopback.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

# Do not set no_cgroups here: it is a startup error since Nomad 1.8.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

consul {
  address = "127.0.0.1:8500"
}
