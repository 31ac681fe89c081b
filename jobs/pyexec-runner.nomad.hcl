# pyexec's runner job, resource class "small", with the library's default settings.
#
# This file is the readable form of what `pyexec job render --class small` prints and
# `pyexec job register` (or the service at start-up) registers, one job per resource
# class in PYEXEC_NOMAD_RESOURCE_CLASSES, plus a "-pip" variant per class with the
# requirements installer. tests/test_nomad_job.py keeps the two equal.
# To register it by hand, run from the repository root (the templates read the
# service's own modules with file(), relative to where nomad runs):
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

    # main: the sandbox, in the request's image. No network, read-only root, no
    # capabilities, pids and memory limits, tmpfs /work. The Nomad client renders the
    # tar, its manifest and the record from Consul into /local (the task holds no
    # token); the task checks the tar (sha256, the API's tar rules), runs the
    # pre-commands and the entrypoint, and leaves capped output and its verdict in
    # /alloc/data/pyexec, where the service reads them.
    task "run" {
      driver       = "docker"
      user         = "1000"
      kill_timeout = "5s"

      config {
        image           = "${NOMAD_META_image}"
        entrypoint      = ["python3", "-I", "-S", "/local/pyexec/nomad_run.py"]
        network_mode    = "none"
        runtime         = "runc"
        readonly_rootfs = true
        cap_drop        = ["all"]
        security_opt    = ["no-new-privileges"]
        pids_limit      = 256

        ulimit {
          nofile = "4096:4096"
        }

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

      env {
        PYEXEC_MAX_TAR_ENTRIES     = "10000"
        PYEXEC_MAX_EXTRACTED_BYTES = "1073741824"
      }

      template {
        data            = file("pyexec/taskscripts/nomad_run.py")
        destination     = "local/pyexec/nomad_run.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      template {
        data            = file("pyexec/sandbox/tarcheck.py")
        destination     = "local/pyexec/tarcheck.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      template {
        data            = file("pyexec/sandbox/collect.py")
        destination     = "local/pyexec/collect.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      template {
        data        = "{{ range ls (printf \"pyexec/executions/%s/tar\" (env \"NOMAD_META_execution_id\")) }}{{ .Value }}{{ end }}"
        destination = "local/bundle.tar"
        change_mode = "noop"
        perms       = "0644"
      }

      template {
        data        = "{{ keyOrDefault (printf \"pyexec/executions/%s/manifest\" (env \"NOMAD_META_execution_id\")) \"\" }}"
        destination = "local/manifest.json"
        change_mode = "noop"
        perms       = "0644"
      }

      template {
        data        = "{{ keyOrDefault (printf \"pyexec/executions/%s/record\" (env \"NOMAD_META_execution_id\")) \"\" }}"
        destination = "local/record.json"
        change_mode = "noop"
        perms       = "0644"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }

    # poststop: the record writer of a plain `nomad job dispatch`, in the trusted image
    # ("host" network only because these default settings put Consul on loopback).
    # Stores the final record (check-and-set: a terminal record is never overwritten).
    # The service's own dispatches skip it and never wait for it.
    task "finish" {
      driver       = "docker"
      user         = "1000"
      kill_timeout = "5s"

      lifecycle {
        hook    = "poststop"
        sidecar = false
      }

      config {
        image           = "python:3.12-slim"
        command         = "python3"
        args            = ["-I", "/local/pyexec/nomad_finish.py"]
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
        PYEXEC_CONSUL_ADDR         = "http://127.0.0.1:8500"
        PYEXEC_RECORD_KEY          = "pyexec/executions/${NOMAD_META_execution_id}/record"
        PYEXEC_STATUS_KEY          = "pyexec/executions/${NOMAD_META_execution_id}/status"
        PYEXEC_STATUS_MARKER_KEY   = "pyexec/executions/${NOMAD_META_execution_id}/status="
        PYEXEC_MANIFEST_KEY        = "pyexec/executions/${NOMAD_META_execution_id}/manifest"
        PYEXEC_TAR_FOLDER          = "pyexec/executions/${NOMAD_META_execution_id}/tar/"
        PYEXEC_OUTPUT_FOLDER       = "pyexec/executions/${NOMAD_META_execution_id}/output/"
        PYEXEC_ARTIFACTS_FOLDER    = "pyexec/executions/${NOMAD_META_execution_id}/artifacts/"
        PYEXEC_STATUS_OF           = "{\"exited\": \"completed\", \"timeout\": \"failed\", \"oom\": \"failed\", \"output_limit\": \"failed\", \"killed\": \"killed\", \"setup_failed\": \"failed\", \"error\": \"failed\"}"
        PYEXEC_INLINE_OUTPUT_BYTES = "16384"
        PYEXEC_OUTPUT_CHUNK_BYTES  = "262144"
      }

      template {
        data            = file("pyexec/taskscripts/nomad_finish.py")
        destination     = "local/pyexec/nomad_finish.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      template {
        data            = file("pyexec/sandbox/tarcheck.py")
        destination     = "local/pyexec/tarcheck.py"
        change_mode     = "noop"
        perms           = "0644"
        left_delimiter  = "[[[pyexec"
        right_delimiter = "pyexec]]]"
      }

      template {
        data            = file("pyexec/sandbox/collect.py")
        destination     = "local/pyexec/collect.py"
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
