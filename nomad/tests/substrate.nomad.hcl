# A throwaway raw_exec job used by nomad/tests/substrate.rs to prove the local cluster:
# Nomad places it, registers its service in Consul with an HTTP check, and removes it.

variable "python" {
  type        = string
  description = "Absolute path of a python3 interpreter; the task serves HTTP with its http.server module."
}

variable "service_name" {
  type        = string
  description = "Consul service name the task registers under."
  default     = "simq-substrate"
}

job "simq-substrate" {
  datacenters = ["*"]
  type        = "service"

  group "web" {
    count = 1

    network {
      port "http" {}
    }

    restart {
      attempts = 0
      mode     = "fail"
    }

    service {
      name     = var.service_name
      port     = "http"
      provider = "consul"
      tags     = ["simq-test"]

      check {
        type     = "http"
        path     = "/"
        interval = "1s"
        timeout  = "1s"
      }
    }

    task "http" {
      driver = "raw_exec"

      config {
        command = var.python
        args    = ["-m", "http.server", "--bind", "127.0.0.1", "${NOMAD_PORT_http}"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
