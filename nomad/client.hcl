# Nomad dev agent, client side: runs pyexec's runner jobs (and the service job) with Docker.

# Never look up the vendor's update service at start (traffic that must not leave the machine).
disable_update_check = true

client {
  enabled = true

  # pyexec-server's kill_timeout (45 s) drains sync requests; allow it.
  max_kill_timeout = "60s"

  # Only the docker driver: the sandbox depends on its isolation.
  options = {
    "driver.allowlist" = "docker"
  }

  meta = {
    "pyexec.runner" = "true"
  }
}

plugin "docker" {
  config {
    # The runner tasks drop every capability (cap_drop = ["all"]) and add none; this is
    # Nomad's default allow-list, written out so that shrinking it is a visible decision.
    allow_caps = [
      "audit_write", "chown", "dac_override", "fowner", "fsetid", "kill", "mknod",
      "net_bind_service", "setfcap", "setgid", "setpcap", "setuid", "sys_chroot",
    ]

    # No privileged containers, ever.
    allow_privileged = false

    # OCI runtimes a task may ask for (the runner jobs' `runtime`, PYEXEC_DOCKER_RUNTIME):
    # runc, and gVisor's runsc where it is installed and registered with Docker.
    allow_runtimes = ["runc", "runsc"]

    # Runner tasks mount only tmpfs (/work, /tmp) and the alloc dir; host paths stay out.
    volumes {
      enabled = false
    }

    gc {
      container = true
      # Keep images: where no registry is reachable (as on the pyexec build machines) a
      # collected runner image could not be pulled back.
      image = false
    }

    # Labels that let `docker ps` tell pyexec's containers apart.
    extra_labels = ["job_name", "task_group_name", "task_name"]
  }
}

consul {
  address             = "127.0.0.1:8500"
  auto_advertise      = true
  server_auto_join    = true
  client_auto_join    = true
  # Nomad's own agent checks use the advertised (loopback) address.
  checks_use_advertise = true
}
