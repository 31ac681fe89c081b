# pyexec's runner job, resource class "small", with the library's default settings.
#
# This file is the readable form of what `pyexec job render --class small` prints and
# `pyexec job register` (or the service at start-up) registers, one job per resource
# class in PYEXEC_NOMAD_RESOURCE_CLASSES. tests/test_nomad_job.py keeps the two equal.
# To register it by hand, run from the repository root (the templates read the task
# script with file(), relative to where nomad runs):
#
#   nomad job run jobs/pyexec-runner.nomad.hcl
#
# Then run an uploaded bundle (see docs/nomad.md):
#
#   nomad job dispatch -meta execution_id=exe_... -meta image=python:3.12-slim pyexec-runner-small

job "pyexec-runner-small" {
  type        = "batch"
  datacenters = ["*"]

  parameterized {
    payload       = "forbidden"
    meta_required = ["execution_id"]
    meta_optional = ["image", "result_writer"]
  }

  # Defaults for the optional dispatch meta; pyexec_class is for operators to read.
  # result_writer: who stores the final record in Consul. A plain dispatch leaves it
  # to the finish task; the pyexec service dispatches with "service" and stores it
  # itself (its record carries post-processing, such as the eval API's result).
  meta {
    image         = "python:3.12-slim"
    result_writer = "finish"
    pyexec_class  = "small"
  }

  group "pyexec" {
    count = 1

    # Code must never run twice: no restart, no reschedule.
    restart {
      attempts = 0
      interval = "24h"
      delay    = "15s"
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    ephemeral_disk {
      size = 1024
    }

    # prestart: fetch the tar from Consul, verify, extract to /alloc, install
    # requirements, run pre-commands. Needs the network (Consul, package index):
    # "host" only because these default settings put Consul on loopback; with
    # PYEXEC_NOMAD_CONSUL_ADDR at a node address setup and finish run on "bridge".
    task "setup" {
      driver       = "docker"
      user         = "1000"
      kill_timeout = "5s"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        image           = "${NOMAD_META_image}"
        command         = "python3"
        args            = ["/local/pyexec_task.py", "setup"]
        network_mode    = "host"
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]

        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 67108864
          }
        }
      }

      env {
        PYEXEC_CONSUL_ADDR   = "http://127.0.0.1:8500"
        PYEXEC_CONSUL_PREFIX = "pyexec"
      }

      template {
        data            = file("pyexec/taskscripts/pyexec_task.py")
        destination     = "local/pyexec_task.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }

    # main: the sandbox. No network, read-only root, no capabilities, pids and memory
    # limits, tmpfs /work. Runs the entrypoint; records its verdict in /alloc.
    task "run" {
      driver       = "docker"
      user         = "1000"
      kill_timeout = "5s"

      config {
        image           = "${NOMAD_META_image}"
        command         = "python3"
        args            = ["/local/pyexec_task.py", "run"]
        network_mode    = "none"
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]
        pids_limit      = 256

        mount {
          type     = "tmpfs"
          target   = "/work"
          readonly = false
          tmpfs_options {
            size = 1073741824
          }
        }

        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 67108864
          }
        }
      }

      template {
        data            = file("pyexec/taskscripts/pyexec_task.py")
        destination     = "local/pyexec_task.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }

    # poststop: write the final record to Consul (check-and-set, a terminal record is
    # never overwritten) and print the verdict for the service.
    task "finish" {
      driver       = "docker"
      user         = "1000"
      kill_timeout = "5s"

      lifecycle {
        hook    = "poststop"
        sidecar = false
      }

      config {
        image           = "${NOMAD_META_image}"
        command         = "python3"
        args            = ["/local/pyexec_task.py", "finish"]
        network_mode    = "host"
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]

        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false
          tmpfs_options {
            size = 67108864
          }
        }
      }

      env {
        PYEXEC_CONSUL_ADDR   = "http://127.0.0.1:8500"
        PYEXEC_CONSUL_PREFIX = "pyexec"
      }

      template {
        data            = file("pyexec/taskscripts/pyexec_task.py")
        destination     = "local/pyexec_task.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
