# The pyexec HTTP service on Nomad (see docs/deploy.md).
#
# Several replicas are safe: every execution's record and tar live in Consul KV, and each
# state change is a check-and-set, so any replica can answer for any execution. The service
# dispatches the runner jobs (pyexec-runner-<class>) that it registers itself at start-up.
#
#   nomad var put nomad/jobs/pyexec-server NOMAD_TOKEN=... CONSUL_HTTP_TOKEN=... PYEXEC_API_TOKENS=...
#   nomad job run -var image=registry.example/pyexec:0.1.0 jobs/pyexec-server.nomad.hcl
#
# No secret is written here: tokens come from the Nomad variable above (readable by this
# job's workload identity only) through a template into the task's secrets directory.
# Addresses come from the node the task lands on.

variable "image" {
  type        = string
  description = "The pyexec service image (built with scripts/build-image.sh)."
  default     = "pyexec:dev"
}

variable "count" {
  type        = number
  description = "How many replicas serve the API."
  default     = 2
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "runner_image" {
  type        = string
  description = "Image the runs use by default (PYEXEC_DEFAULT_IMAGE)."
  default     = "python:3.12-slim"
}

job "pyexec-server" {
  type        = "service"
  datacenters = var.datacenters

  # One replica at a time, kept only once its checks pass; a bad version rolls back by itself.
  update {
    max_parallel      = 1
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
    auto_revert       = true
    stagger           = "15s"
  }

  migrate {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "3m"
  }

  group "api" {
    count = var.count

    # Replicas on different nodes, so a node loss leaves the API up.
    spread {
      attribute = "${node.unique.id}"
    }

    network {
      port "http" {
        to = 8080
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "15s"
      mode     = "delay"
    }

    service {
      name     = "pyexec"
      port     = "http"
      provider = "consul"
      tags     = ["http", "prometheus"]

      meta {
        metrics_path = "/metrics"
      }

      # Readiness: the store and the runner backend both answer. A failing check takes the
      # replica out of the catalog (no traffic) but does not restart it: Consul or Nomad
      # being away is not something a restart fixes.
      check {
        name     = "pyexec ready"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"
      }

      # Liveness: the process answers at all. Only this one restarts the task.
      check {
        name     = "pyexec alive"
        type     = "http"
        path     = "/health/live"
        interval = "10s"
        timeout  = "2s"

        check_restart {
          limit           = 3
          grace           = "30s"
          ignore_warnings = false
        }
      }
    }

    task "server" {
      driver = "docker"

      # SIGTERM starts the drain: no new connections, sync requests get
      # PYEXEC_SHUTDOWN_GRACE_SECONDS to finish. Runs on Nomad keep going and are
      # adopted by the other replicas. kill_timeout must exceed the grace period
      # (and stay within the client's max_kill_timeout).
      kill_signal  = "SIGTERM"
      kill_timeout = "45s"

      config {
        image           = var.image
        ports           = ["http"]
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]

        # Uploads larger than memory thresholds are spooled to /tmp.
        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 1073741824
          }
        }
      }

      env {
        PYEXEC_HOST                   = "0.0.0.0"
        PYEXEC_PORT                   = "8080"
        PYEXEC_LOG_FORMAT             = "json"
        PYEXEC_SHUTDOWN_GRACE_SECONDS = "30"
        PYEXEC_DEFAULT_IMAGE          = var.runner_image

        # The agents on the node this replica runs on. They must listen on the node's
        # address, not only on loopback (docs/deploy.md).
        NOMAD_ADDR       = "http://${attr.unique.network.ip-address}:4646"
        CONSUL_HTTP_ADDR = "${attr.unique.network.ip-address}:8500"
        # Runner tasks reach Consul at this same (non-loopback) address, so their setup and
        # finish steps run on Docker's bridge network, not the host's (docs/nomad.md).
      }

      # Secrets from the job's Nomad variable, rendered into the secrets directory (never
      # in the job spec, never in the image) and exported as environment variables: each
      # item of the variable becomes one variable of the same name (NOMAD_TOKEN,
      # CONSUL_HTTP_TOKEN, PYEXEC_API_TOKENS, ...), and an item left out is simply unset.
      # The lookup is guarded: `nomadVar` alone blocks the task until the variable exists
      # ("Template Missing"), so it is only read once nomadVarList (which does not block)
      # lists it; with no variable the service starts with no secrets.
      # With Vault instead, read a `secret` here and add a `vault {}` block.
      template {
        destination = "${NOMAD_SECRETS_DIR}/pyexec.env"
        env         = true
        change_mode = "restart"
        splay       = "10s"
        data        = <<-EOT
        {{- range nomadVarList "nomad/jobs/pyexec-server" }}
        {{- if eq .Path "nomad/jobs/pyexec-server" }}
        {{- with nomadVar .Path }}
        {{- range .Tuples }}
        {{ .K }}={{ .V }}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- end }}
        EOT
      }

      resources {
        cpu        = 500
        memory     = 256
        memory_max = 512
      }
    }
  }
}
