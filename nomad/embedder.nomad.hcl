# The embedding service: texts -> vectors, registered in Consul as simq-embedder with the
# tag model=<model id>, so balancers only pair it with dgs built by the same model.
# Node-agnostic: the binary, ONNX Runtime and the model files reach each node as
# checksummed artifacts from the blob store (scripts/deploy.sh puts them there by sha256),
# and it listens on its allocation's address (127.0.0.1 on the single-node cluster).

variable "model_id" {
  type        = string
  description = "Model id of the model directory (simq-indexer model-id prints it)."
}

variable "blob_url" {
  type        = string
  description = "Base URL of the content-addressed blob store (GET <blob_url>/<sha256>), reachable from every node."
}

variable "embedder_sha256" {
  type        = string
  description = "sha256 of the simq-embedder binary in the blob store."
}

variable "ort_sha256" {
  type        = string
  description = "sha256 of libonnxruntime.so in the blob store."
}

variable "model_files" {
  type        = map(string)
  description = "The model directory's files by name (model.onnx, tokenizer.json, simq-model.json) -> sha256 in the blob store; fetched into local/model."
}

variable "driver" {
  type        = string
  description = "Task driver: raw_exec (the local cluster) or exec (isolated; where the node's Nomad client allows it)."
  default     = "raw_exec"
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

    # Instances on different nodes where they can be (a preference: a canary may share a
    # node), so that losing a node leaves an embedder.
    spread {
      attribute = "${node.unique.id}"
      weight    = 100
    }

    # One embedder per node stays one per node: while its node is unreachable it is not
    # replaced elsewhere (the other nodes' embedders answer; a replacement would stay when
    # the node returns, and embedders would pile up on the surviving nodes, measured: after
    # a partition and a freeze all three ran on one node), and once the node is back its
    # own embedder serves again.
    disconnect {
      lost_after = "24h"
      replace    = false
      reconcile  = "keep_original"
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
      driver = var.driver

      artifact {
        source      = "${var.blob_url}/${var.embedder_sha256}"
        destination = "local/simq-embedder"
        mode        = "file"

        options {
          checksum = "sha256:${var.embedder_sha256}"
        }
      }

      artifact {
        source      = "${var.blob_url}/${var.ort_sha256}"
        destination = "local/ort/libonnxruntime.so"
        mode        = "file"

        options {
          checksum = "sha256:${var.ort_sha256}"
        }
      }

      # One artifact per model file, under its own name (the embedder checks model.onnx
      # and tokenizer.json against simq-model.json's sha256s again). A model rollout
      # (indexer/src/models.rs) puts the new model's files into the blob store, copies this
      # job and points these artifacts at them (it finds them by their local/model/
      # destination).
      dynamic "artifact" {
        for_each = var.model_files
        content {
          source      = "${var.blob_url}/${artifact.value}"
          destination = "local/model/${artifact.key}"
          mode        = "file"

          options {
            checksum = "sha256:${artifact.value}"
          }
        }
      }

      config {
        command = "local/simq-embedder"
        args = [
          "--model-dir", "${NOMAD_TASK_DIR}/model",
          "--ort-library", "${NOMAD_TASK_DIR}/ort/libonnxruntime.so",
          "--grpc-listen", "${NOMAD_ADDR_grpc}",
          "--http-listen", "${NOMAD_ADDR_http}",
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
