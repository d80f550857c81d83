# The public entry: the Pingora balancer on a fixed loopback port.

variable "balancer_bin" {
  type        = string
  description = "Absolute path of the simq-balancer binary."
}

variable "port" {
  type        = number
  description = "Port the balancer listens on (127.0.0.1)."
  default     = 8080
}

variable "consul_addr" {
  type        = string
  description = "Consul HTTP address the balancer follows."
  default     = "http://127.0.0.1:8500"
}

variable "consul_wait_secs" {
  type        = number
  description = "Seconds one Consul blocking query may wait (a hung Consul is noticed after this plus 10 s)."
  default     = 30
}

variable "nprobe" {
  type        = number
  description = "Fine clusters probed per query (recall vs latency, see indexer/BENCH.md)."
  default     = 192
}

variable "max_inflight" {
  type        = number
  description = "Cache-miss queries in flight per balancer; beyond it 503 + Retry-After at once."
  default     = 32
}

job "simq-balancer" {
  datacenters = ["*"]
  type        = "service"

  group "balancer" {
    count = 1

    network {
      port "http" {
        static = var.port
      }
    }

    update {
      max_parallel      = 1
      health_check      = "checks"
      min_healthy_time  = "1s"
      healthy_deadline  = "30s"
      progress_deadline = "40s"
      auto_revert       = true
    }

    restart {
      attempts = 3
      interval = "1m"
      delay    = "1s"
      mode     = "fail"
    }

    service {
      name     = "simq-balancer"
      port     = "http"
      provider = "consul"
      # Where Prometheus scrapes /metrics (consul/prometheus/prometheus.yml).
      meta {
        metrics_port = "${NOMAD_PORT_http}"
      }

      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "balancer" {
      driver = "raw_exec"

      config {
        command = var.balancer_bin
        args = [
          "--listen", "127.0.0.1:${NOMAD_PORT_http}",
          "--consul", var.consul_addr,
          "--nprobe", "${var.nprobe}",
          "--max-inflight", "${var.max_inflight}",
          "--consul-wait-secs", "${var.consul_wait_secs}",
        ]
      }

      env {
        SIMQ_LOG_FORMAT = "json"
      }

      kill_timeout = "10s"

      resources {
        cpu    = 300
        memory = 256
      }
    }
  }
}
