# Nomad dev agent, server side (load together with client.hcl: one agent is both).
# Used by scripts/dev-cluster.sh; everything listens on loopback only.

datacenter = "dc1"
region     = "global"
bind_addr  = "127.0.0.1"
log_level  = "INFO"

# Never look up the vendor's update service at start (traffic that must not leave the machine).
disable_update_check = true

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

server {
  enabled          = true
  bootstrap_expect = 1

  # Dispatched runner jobs are collected after this long. pyexec persists every result
  # in Consul before then (and reads it from there), so a short threshold is safe.
  job_gc_threshold   = "1h"
  eval_gc_threshold  = "1h"
  batch_eval_gc_threshold = "1h"
}

# A dev cluster runs without ACLs; docs/deploy.md lists the policies for a real one.
acl {
  enabled = false
}

ui {
  enabled = true
}

telemetry {
  prometheus_metrics         = true
  publish_allocation_metrics = true
  publish_node_metrics       = true
}
