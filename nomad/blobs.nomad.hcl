# The content-addressed blob store: serves <dir>/<sha256> over HTTP for Nomad's artifact
# fetch (which checks the sha256 again). `simq-indexer publish` fills the directory.

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
  description = "Port of the blob store (127.0.0.1)."
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
        args    = ["serve-blobs", "--dir", var.dir, "--listen", "127.0.0.1:${NOMAD_PORT_http}"]
      }

      resources {
        cpu    = 100
        memory = 256
      }
    }
  }
}
