# The embedding service: texts -> vectors, registered in Consul as simq-embedder with the
# tag model=<model id>, so balancers only pair it with dgs built by the same model.

variable "model_id" {
  type        = string
  description = "Model id of the model directory (simq-indexer model-id prints it)."
}

variable "model_dir" {
  type        = string
  description = "Absolute path of the model directory."
}

variable "embedder_bin" {
  type        = string
  description = "Absolute path of the simq-embedder binary."
}

variable "ort_library" {
  type        = string
  description = "Absolute path of libonnxruntime.so."
}

variable "count" {
  type        = number
  description = "Embedder instances: two, so that one can stop (update, crash) while the other answers."
  default     = 2
}

variable "max_batch" {
  type        = number
  description = "Texts per inference call at most (simq-embedder --max-batch)."
  default     = 16
}

variable "nice" {
  type        = number
  description = "CPU priority of the embedder (nice). On hosts it shares with balancers and shards, 5 keeps their short work (answers, fast refusals) ahead of inference batches under overload."
  default     = 5
}

job "simq-embedder" {
  datacenters = ["*"]
  type        = "service"

  group "embedder" {
    count = var.count

    network {
      port "grpc" {}
      port "http" {}
    }

    # A new version starts as a canary beside the running ones; once its checks pass it
    # is promoted and the old instances are replaced one at a time; one that never gets
    # healthy is reverted.
    update {
      canary            = 1
      auto_promote      = true
      max_parallel      = 1
      health_check      = "checks"
      min_healthy_time  = "2s"
      healthy_deadline  = "60s"
      progress_deadline = "70s"
      auto_revert       = true
    }

    # A stopping instance leaves Consul first; balancers see that within their blocking
    # query and stop sending before the signal arrives. The signal then drains: queued
    # and running batches finish (simq-embedder --shutdown-grace-secs).
    shutdown_delay = "3s"

    restart {
      attempts = 2
      interval = "1m"
      delay    = "2s"
      mode     = "fail"
    }

    service {
      name     = "simq-embedder"
      port     = "grpc"
      provider = "consul"
      tags     = ["model=${var.model_id}"]
      # Where Prometheus scrapes /metrics (consul/prometheus/prometheus.yml).
      meta {
        metrics_port = "${NOMAD_PORT_http}"
      }

      check {
        type     = "http"
        port     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "embedder" {
      driver = "raw_exec"

      config {
        command = var.embedder_bin
        args = [
          "--model-dir", var.model_dir,
          "--ort-library", var.ort_library,
          "--grpc-listen", "127.0.0.1:${NOMAD_PORT_grpc}",
          "--http-listen", "127.0.0.1:${NOMAD_PORT_http}",
          "--nice", "${var.nice}",
          "--max-batch", "${var.max_batch}",
        ]
      }

      env {
        SIMQ_LOG_FORMAT = "json"
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "10s"

      resources {
        # A scheduling reservation (raw_exec does not enforce it): two embedders, two
        # balancers and two full shard sets during a rollout fit nomad/dev-agent.hcl's
        # 4000 MHz.
        cpu    = 600
        memory = 1024
      }
    }
  }
}
