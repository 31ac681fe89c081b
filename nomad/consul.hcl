# Consul dev agent for the local cluster (scripts/dev-cluster.sh): loopback only, in memory.
# Works with Consul 1.8 (the Debian package) and later.

datacenter  = "dc1"
bind_addr   = "127.0.0.1"
client_addr = "127.0.0.1"
log_level   = "INFO"
ui          = true

# Never look up the vendor's update service at start.
disable_update_check = true

ports {
  http = 8500
  grpc = 8502
}

# pyexec keeps one KV entry per tar chunk (256 KiB); the default 512 KiB value cap fits.
limits {
  http_max_conns_per_client = 400
}
