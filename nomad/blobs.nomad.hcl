# The content-addressed blob store of the single-node cluster: serves <dir>/<sha256> over
# HTTP for Nomad's artifact fetch (which checks the sha256 again). `simq-indexer publish`
# fills the directory with shard files, scripts/deploy.sh with the binaries, the model and
# ONNX Runtime. It serves a directory of the host it runs on, so it stays raw_exec and
# on one node: the multi-node cluster (scripts/deploy.sh --nodes) serves the host's store
# on the nodes' bridge instead (issue 31 item 3: a replicated object store).

variable "indexer_bin" {
  type        = string
  description = "Absolute path of the simq-indexer binary (its serve-blobs command)."
}

variable "dir" {
  type        = string
  description = "Directory of blobs named by their sha256."
}

variable "port" {
  type        = number
  description = "Port of the blob store, on its node's address (127.0.0.1 on the single-node cluster)."
  default     = 8090
}

job "simq-blobs" {
  datacenters = ["*"]
  type        = "service"

  group "blobs" {
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
      name     = "simq-blobs"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "blobs" {
      driver = "raw_exec"

      config {
        command = var.indexer_bin
        args    = ["serve-blobs", "--dir", var.dir, "--listen", "${NOMAD_ADDR_http}"]
      }

      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}
