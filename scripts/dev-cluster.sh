#!/usr/bin/env bash
# A local Consul + Nomad dev cluster for pyexec, on loopback only.
#
#   scripts/dev-cluster.sh start    start Consul (unless one already answers on :8500) and a
#                                   Nomad agent that is both server and client (nomad/*.hcl)
#   scripts/dev-cluster.sh stop     stop what `start` started (nothing else)
#   scripts/dev-cluster.sh status   say what is running
#
# Binaries come from PATH. When one is missing, `start` names it and starts nothing.
# Nomad has no package in the registries the pyexec build machines reach, so there it is
# always missing; install HashiCorp's binary from your usual source elsewhere.
#
# Environment:
#   PYEXEC_DEV_CLUSTER_DIR   state (pid files, logs, Nomad data); default /tmp/pyexec-dev-cluster
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
state=${PYEXEC_DEV_CLUSTER_DIR:-/tmp/pyexec-dev-cluster}
consul_http=127.0.0.1:8500
nomad_http=127.0.0.1:4646

log() { printf 'dev-cluster: %s\n' "$*" >&2; }

answers() {  # answers URL: the agent at URL has a leader
  curl -fsS --max-time 2 "$1" 2>/dev/null | grep -q ':'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    if [ $SECONDS -ge $deadline ]; then log "$what did not come up; see $state/*.log"; return 1; fi
    sleep 1
  done
}

running() {  # running NAME: the process whose pid we recorded is alive
  [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null
}

nomad_node_ready() {
  curl -fsS --max-time 2 "http://$nomad_http/v1/nodes" 2>/dev/null | grep -q '"Status":"ready"'
}

start() {
  local missing=()
  command -v curl >/dev/null 2>&1 || missing+=("curl (to check the agents)")
  command -v nomad >/dev/null 2>&1 || missing+=("nomad (HashiCorp Nomad >= 1.6; not packaged in the reachable registries)")
  if ! answers "http://$consul_http/v1/status/leader"; then
    command -v consul >/dev/null 2>&1 || missing+=("consul (Debian package 'consul', or HashiCorp's binary)")
  fi
  if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    missing+=("docker (a running Docker engine, for Nomad's docker driver)")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "cannot start the dev cluster; missing:"
    printf '  - %s\n' "${missing[@]}" >&2
    exit 127
  fi

  mkdir -p "$state"
  if answers "http://$consul_http/v1/status/leader"; then
    log "Consul already answers on $consul_http; using it"
  else
    log "starting consul agent -dev on $consul_http"
    nohup consul agent -dev -config-file "$here/nomad/consul.hcl" \
      -hcl 'disable_update_check = true' >"$state/consul.log" 2>&1 &
    echo $! >"$state/consul.pid"
    wait_for 30 Consul answers "http://$consul_http/v1/status/leader"
  fi

  if answers "http://$nomad_http/v1/status/leader"; then
    log "Nomad already answers on $nomad_http; using it"
  else
    log "starting nomad agent (server + client) on $nomad_http"
    mkdir -p "$state/nomad" "$state/deps"
    # The dependency cache's host volume (docs/deps-cache.md); its path is this state
    # folder's, so it is written here rather than in nomad/client.hcl. The tasks run as
    # uid 1000.
    chown 1000:1000 "$state/deps"
    cat >"$state/deps-volume.hcl" <<HCL
client {
  host_volume "pyexec-deps" {
    path      = "$state/deps"
    read_only = false
  }
}
HCL
    nohup nomad agent -config "$here/nomad/server.hcl" -config "$here/nomad/client.hcl" \
      -config "$state/deps-volume.hcl" \
      -data-dir "$state/nomad" >"$state/nomad.log" 2>&1 &
    echo $! >"$state/nomad.pid"
    wait_for 60 Nomad answers "http://$nomad_http/v1/status/leader"
    wait_for 60 "a ready Nomad client" nomad_node_ready
  fi

  cat <<EOF
dev-cluster: ready. Serve pyexec against it with:
  export NOMAD_ADDR=http://$nomad_http CONSUL_HTTP_ADDR=$consul_http
  uv run pyexec serve
EOF
}

stop() {
  local name pid
  for name in nomad consul; do
    running "$name" || { rm -f "$state/$name.pid"; continue; }
    pid=$(cat "$state/$name.pid")
    log "stopping $name (pid $pid)"
    kill -INT "$pid"  # both agents leave gracefully on SIGINT
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$state/$name.pid"
  done
  log "stopped"
}

status() {
  local name
  for name in consul nomad; do
    if running "$name"; then
      echo "$name: running (pid $(cat "$state/$name.pid"), started by dev-cluster)"
    else
      echo "$name: not started by dev-cluster"
    fi
  done
  answers "http://$consul_http/v1/status/leader" && echo "consul: answers on $consul_http"
  answers "http://$nomad_http/v1/status/leader" && echo "nomad: answers on $nomad_http"
  return 0
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
