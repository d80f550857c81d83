# The shards of one index generation (dg): one group per shard, `replicas` instances each,
# spread over the nodes. Each instance fetches its shard file (and the simq-shard binary)
# from the blob store by content address (Nomad verifies the sha256), then the shard
# binary verifies the file again, checks model and dims, self-tests, and only then turns
# its Consul check (GET /health) passing. It listens on its allocation's address (the
# node's; 127.0.0.1 on the single-node cluster, whose client uses the "lo" interface),
# the address Nomad registers in Consul and checks.
#
# Blue/green, two ways (simq-indexer rollout chooses, indexer/src/rollout.rs):
# - canaries (the single node): the groups are named shard-N, so rolling to a new dg
#   changes the artifact and args of every group, which makes a new deployment: with
#   canary = replicas, a full new set starts beside the old one; the indexer flips the
#   active dg once every canary is healthy, then promotes; Nomad reverts by itself
#   (auto_revert) when a canary fails its checks.
# - groups (replicas_apart, the node cluster): the groups are named shard-N-<dg>, so a new
#   dg is new groups, placed beside the old dg's groups (registered again unchanged); the
#   indexer flips once they are healthy, then registers the job without the old groups.
#   Each group's replicas are on distinct nodes, which canaries beside their old replicas
#   could not be on 3 nodes (2 x replicas instances of one group).

variable "kept_dgs" {
  type        = string
  default     = ""
  description = "Comma-separated dgs of the groups this registration keeps unchanged (shards whose file the new dg shares with the running one, indexer/src/rollout.rs): a group naming one of them in its meta dg is not what the job serves now."
}

variable "dg" {
  type        = string
  description = "The index generation these shards belong to (dg-...)."
}

variable "model_id" {
  type        = string
  description = "Model id from the dg's manifest; a shard file built by another model is refused."
}

variable "dims" {
  type        = number
  description = "Vector dims from the dg's manifest."
}

variable "shards_json" {
  type        = string
  description = "JSON list of {\"shard\": n, \"sha256\": \"...\"} from the dg's manifest."
}

variable "replicas" {
  type        = number
  description = "Instances per shard."
  default     = 1
}

variable "canary" {
  type        = number
  description = "Canaries per group: 0 for the first deployment, = replicas for blue/green."
  default     = 0
}

variable "blob_url" {
  type        = string
  description = "Base URL of the content-addressed blob store (GET <blob_url>/<sha256>)."
}

variable "shard_bin_sha256" {
  type        = string
  description = "sha256 of the simq-shard binary in the blob store (GET <blob_url>/<sha256>): every node fetches and verifies it. Empty only while simq-indexer rollout does not pass it yet (then shard_bin)."
  default     = ""
}

variable "shard_bin" {
  type        = string
  description = "Transitional: absolute path of simq-shard on the node, used only when shard_bin_sha256 is empty (what simq-indexer rollout passes until it passes shard_bin_sha256; single node only)."
  default     = ""
}

variable "driver" {
  type        = string
  description = "Task driver: raw_exec (the local cluster) or exec (isolated; where the node's Nomad client allows it). exec needs shard_bin_sha256: a host path is not inside its chroot."
  default     = "raw_exec"
}

variable "healthy_deadline" {
  type        = string
  description = "How long a new instance may take to pass its checks."
  default     = "30s"
}

variable "progress_deadline" {
  type        = string
  description = "When a deployment without progress fails (and auto-reverts); just above healthy_deadline."
  default     = "35s"
}

variable "replicas_apart" {
  type        = bool
  description = "Never two replicas of one shard on one node (distinct_hosts), and blue/green by groups named after the dg (see the top of this file). The node cluster; off on the single node, which holds every replica."
  default     = false
}

variable "attempt" {
  type        = string
  description = "Changed only to retry a failed deployment of the same dg (forces a new job version)."
  default     = ""
}

locals {
  shards = jsondecode(var.shards_json)
}

job "simq-shards" {
  datacenters = ["*"]
  type        = "service"

  dynamic "group" {
    for_each = local.shards
    labels   = [var.replicas_apart ? "shard-${group.value.shard}-${var.dg}" : "shard-${group.value.shard}"]

    content {
      count = var.replicas

      # Group meta, not job meta: Nomad restarts every group whose combined task meta
      # changes, and a rollout to fewer shards keeps the old dg's extra groups unchanged
      # until after the flip (indexer/src/rollout.rs). `simq-indexer` reads the running dg
      # from shard-0's meta.
      meta {
        dg       = var.dg
        attempt  = var.attempt
        kept_dgs = var.kept_dgs
      }

      network {
        port "grpc" {}
        port "http" {}
      }

      # Replicas of a shard on different nodes where they can be: losing a node then costs
      # each shard at most one replica. Weight 100 (the most): with the default 50
      # binpacking won when a lost node's replicas were replaced, and put both replicas of
      # each shard on one node (measured on the 3-node cluster: then cutting that node off
      # left no replica).
      spread {
        attribute = "${node.unique.id}"
        weight    = 100
      }
      # Even at weight 100 the spread lost to the other scores when a lost node's replicas
      # were replaced: after a partition and a freeze every replica ran on one node, and
      # losing it lost every shard. With replicas_apart (blue/green by groups, so no
      # canaries share a group with their old replicas), a hard constraint: a lost node's
      # replica goes to the node without one.
      dynamic "constraint" {
        for_each = var.replicas_apart ? [1] : []
        content {
          operator = "distinct_hosts"
          value    = "true"
        }
      }

      # A node that stops heartbeating may be a node that lost power, or a live node whose
      # Nomad client was still waiting on a server that lost power (measured: n2's client
      # missed its TTL for that reason, and without this block Nomad killed n2's healthy
      # replicas when it called again, leaving no shard for 9 s). Its replicas are
      # replaced at once (replace), but when the node calls again its own replicas are the
      # ones kept and the replacements stop (keep_original).
      disconnect {
        lost_after = "24h"
        replace    = true
        reconcile  = "keep_original"
      }

      # A replica lost with its node is placed again after `delay`, not Nomad's default 30 s
      # for service jobs (measured: lost replicas came back 46 s after a power-off, of which
      # 30 s was this delay). Exponential, so a replica that keeps failing is not
      # rescheduled every few seconds.
      reschedule {
        delay          = "5s"
        delay_function = "exponential"
        max_delay      = "2m"
        unlimited      = true
      }

      update {
        max_parallel      = var.replicas
        canary            = var.canary
        health_check      = "checks"
        min_healthy_time  = "1s"
        healthy_deadline  = var.healthy_deadline
        progress_deadline = var.progress_deadline
        auto_revert       = true
        auto_promote      = false
      }

      restart {
        attempts = 1
        interval = "1m"
        delay    = "2s"
        mode     = "fail"
      }

      service {
        name     = "simq-shard"
        port     = "grpc"
        provider = "consul"
        # sha256=: balancers also route a later dg to this shard when that dg pins the same
        # file here (an incremental build's unchanged shard, kept without a restart).
        tags     = ["dg=${var.dg}", "shard=${group.value.shard}", "sha256=${group.value.sha256}"]
        # Where Prometheus scrapes /metrics (consul/prometheus/prometheus.yml).
        meta {
          metrics_port = "${NOMAD_PORT_http}"
        }

        check {
          type     = "http"
          port     = "http"
          path     = "/health"
          interval = "1s"
          timeout  = "1s"
        }
      }

      task "shard" {
        driver = var.driver

        # The binary, when it comes from the blob store (see shard_bin_sha256).
        dynamic "artifact" {
          for_each = var.shard_bin_sha256 == "" ? [] : [var.shard_bin_sha256]
          content {
            source      = "${var.blob_url}/${artifact.value}"
            destination = "local/simq-shard"
            mode        = "file"

            options {
              checksum = "sha256:${artifact.value}"
            }
          }
        }

        artifact {
          source      = "${var.blob_url}/${group.value.sha256}"
          destination = "local/shard.lmdb"
          mode        = "file"

          options {
            checksum = "sha256:${group.value.sha256}"
          }
        }

        config {
          command = var.shard_bin_sha256 == "" ? var.shard_bin : "local/simq-shard"
          args = [
            "--file", "local/shard.lmdb",
            "--sha256", group.value.sha256,
            "--dg", var.dg,
            "--shard", "${group.value.shard}",
            "--model-id", var.model_id,
            "--dims", "${var.dims}",
            "--grpc-listen", "${NOMAD_ADDR_grpc}",
            "--http-listen", "${NOMAD_ADDR_http}",
          ]
        }

        env {
          SIMQ_LOG_FORMAT = "json"
        }

        # Deregistered from Consul first, killed 2 s later: balancers stop routing here
        # before the listener closes.
        shutdown_delay = "2s"
        kill_timeout   = "10s"

        resources {
          # Small reservations: a blue/green rollout runs two full sets side by side.
          cpu    = 100
          memory = 512
        }
      }
    }
  }
}
