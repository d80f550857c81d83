# The public entry: Pingora balancers, spread one per node (count = nodes), each on its
# node's address and a fixed port. Instances on one node share that port (SO_REUSEPORT:
# the kernel spreads new connections over them; one that stops leaves the others
# serving): the single-node cluster runs 2 on 127.0.0.1:8080 that way, and during an
# update the canary shares its node's port with the instance it replaces. Each instance
# also listens on its own dynamic "admin" port, where Consul checks it and Prometheus
# scrapes it. The public port is not reserved in Nomad (two allocations of one job cannot
# reserve the same static port on one node).
#
# A service job with count and spread, not a system job: a system job runs exactly one
# per node, which would end the single node's two instances on one port, and it has no
# canary, so an update could not start the new version beside the old one before
# stopping it. The price: count must follow the number of nodes (scripts/deploy.sh
# --nodes passes it).

variable "blob_url" {
  type        = string
  description = "Base URL of the content-addressed blob store (GET <blob_url>/<sha256>), reachable from every node."
}

variable "balancer_sha256" {
  type        = string
  description = "sha256 of the simq-balancer binary in the blob store."
}

variable "driver" {
  type        = string
  description = "Task driver: raw_exec (the local cluster) or exec (isolated; where the node's Nomad client allows it)."
  default     = "raw_exec"
}

variable "port" {
  type        = number
  description = "Port the balancer listens on, on its node's address (127.0.0.1 on the single-node cluster)."
  default     = 8080
}

variable "count" {
  type        = number
  description = "Balancer instances, spread over the nodes: the number of nodes for one per node; on the single node, instances sharing the port."
  default     = 2
}

variable "consul_addr" {
  type        = string
  description = "Consul HTTP address the balancer follows: the Consul agent of its own node, which listens on the node's loopback (as on the single node)."
  default     = "http://127.0.0.1:8500"
}

variable "consul_wait_secs" {
  type        = number
  description = "Seconds one Consul blocking query may wait (a hung Consul is noticed after this plus 10 s)."
  default     = 30
}

variable "nprobe" {
  type        = number
  description = "Fine clusters probed per query (recall vs latency, see indexer/BENCH.md); scripts/deploy.sh passes simq-indexer defaults' nprobe unless SIMQ_NPROBE is set."
}

variable "max_inflight" {
  type        = number
  description = "Cache-miss queries answered at once per balancer; more wait in line while the wait they can expect fits their deadline, the rest get 503 + Retry-After at once. The instances share the embedders and shards: 2 x 16 keeps one balancer's former 32."
  default     = 16
}

variable "threads" {
  type        = number
  description = "HTTP worker threads per balancer (2 instances x 1 on a 2-core host)."
  default     = 1
}

variable "embedder_order" {
  type        = string
  description = "spread (round robin over embedders), stable (the first healthy one gets every call, the others stand by) or local (the embedders of the balancer's own node first). The single-node cluster runs every embedder on one host's cores, where spreading only makes smaller batches: stable; on nodes, local."
  default     = "stable"
}

variable "api_keys" {
  type        = string
  description = "off (every endpoint open) or required (queries need an API key from simq-indexer keys create; /metrics and /v1/status on the public port an admin key)."
  default     = "off"
}

variable "consul_token_file" {
  type        = string
  description = "File holding the balancer's Consul ACL token (secure mode: scripts/cluster.sh with SIMQ_ACL=1 makes it); empty for none."
  default     = ""
}

job "simq-balancer" {
  datacenters = ["*"]
  type        = "service"

  group "balancer" {
    count = var.count

    network {
      port "admin" {}
    }

    # One per node when count = nodes. A preference, not distinct_hosts: the update's
    # canary needs a place beside the instance it replaces.
    spread {
      attribute = "${node.unique.id}"
    }

    # A new version starts as a canary beside the running ones (all share the port), is
    # promoted once healthy, then replaces the old ones one at a time; reverted if never
    # healthy.
    update {
      canary            = 1
      auto_promote      = true
      max_parallel      = 1
      health_check      = "checks"
      min_healthy_time  = "2s"
      healthy_deadline  = "30s"
      progress_deadline = "40s"
      auto_revert       = true
    }

    # A balancer is its node's entry point: while its node is unreachable (lost power, cut
    # off, frozen) it is not moved to another node (clients use the other nodes' entry
    # points meanwhile), and when the node is back its own balancer keeps serving there.
    # Moving it would leave the node without an entry point once it returns.
    disconnect {
      lost_after = "24h"
      replace    = false
      reconcile  = "keep_original"
    }

    # Leave Consul before the signal; then SIGTERM: Pingora closes this instance's
    # listeners at once (new connections go to the others), answers in-flight queries
    # (at most the 2 s query deadline) within --shutdown-grace-secs and closes kept-alive
    # connections after their current answer.
    shutdown_delay = "2s"

    restart {
      attempts = 3
      interval = "1m"
      delay    = "1s"
      mode     = "fail"
    }

    service {
      name     = "simq-balancer"
      port     = "admin"
      provider = "consul"
      # Where Prometheus scrapes /metrics (consul/prometheus/prometheus.yml).
      meta {
        metrics_port = "${NOMAD_PORT_admin}"
      }

      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "balancer" {
      driver = var.driver

      artifact {
        source      = "${var.blob_url}/${var.balancer_sha256}"
        destination = "local/simq-balancer"
        mode        = "file"

        options {
          checksum = "sha256:${var.balancer_sha256}"
        }
      }

      config {
        command = "local/simq-balancer"
        args = [
          "--listen", "${NOMAD_IP_admin}:${var.port}",
          "--reuse-port",
          "--admin-listen", "${NOMAD_ADDR_admin}",
          "--upgrade-sock", "${NOMAD_ALLOC_DIR}/pingora-upgrade.sock",
          "--shutdown-grace-secs", "5",
          "--consul", var.consul_addr,
          "--nprobe", "${var.nprobe}",
          "--max-inflight", "${var.max_inflight}",
          "--threads", "${var.threads}",
          "--embedder-order", var.embedder_order,
          "--consul-wait-secs", "${var.consul_wait_secs}",
          "--api-keys", var.api_keys,
        ]
      }

      env {
        SIMQ_LOG_FORMAT        = "json"
        CONSUL_HTTP_TOKEN_FILE = var.consul_token_file
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "10s"

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
