#!/usr/bin/env bash
# Installs and starts what pyexec needs on a Debian bookworm machine, as root.
# Idempotent: every step checks before it acts, so running it twice is cheap.
#
#   scripts/bootstrap.sh            Python tooling + deps, docker.io, dockerd, runner image
#   scripts/bootstrap.sh --consul   the above, plus Consul (bullseye package) running in -dev mode
#
# Environment:
#   PYEXEC_RUNNER_IMAGE   tag of the locally built runner image (default pyexec-runner:bookworm)
#   PYEXEC_APT_MIRROR     Debian mirror (default: the one in the machine's bookworm sources)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
image=${PYEXEC_RUNNER_IMAGE:-pyexec-runner:bookworm}
want_consul=0
for arg in "$@"; do
  case "$arg" in
    --consul) want_consul=1 ;;
    *) echo "bootstrap: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { printf 'bootstrap: %s\n' "$*" >&2; }

mirror() {
  if [ -n "${PYEXEC_APT_MIRROR:-}" ]; then echo "$PYEXEC_APT_MIRROR"; return; fi
  local m
  m=$(grep -rhoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
      | grep -oE '[a-z]+://[^ ]+' | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $apt_updated -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- Python tooling -------------------------------------------------------
if ! command -v uv >/dev/null 2>&1 || ! command -v just >/dev/null 2>&1; then
  log "installing uv and just from PyPI"
  python3 -m pip install -q uv rust-just
  hash -r
  bindir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  for tool in uv just; do
    command -v "$tool" >/dev/null 2>&1 || ln -sf "$bindir/$tool" "/usr/local/bin/$tool"
  done
fi
log "uv sync (all extras, dev group)"
(cd "$here" && uv sync --frozen --all-extras -q)

# --- Docker ---------------------------------------------------------------
apt_install docker.io debootstrap ca-certificates iproute2 runsc

# gVisor as the optional runtime `runsc` (PYEXEC_DOCKER_RUNTIME=runsc). The ptrace platform
# needs no KVM; --network=host makes gVisor use the network namespace Docker made for the
# container (its own copy of the interfaces fails on these machines), --oci-seccomp applies
# the sandbox's seccomp profile inside gVisor too. Merged into an existing daemon.json.
daemon_json=/etc/docker/daemon.json
mkdir -p /etc/docker
runsc_changed=$(python3 - "$daemon_json" <<'PY'
import json, os, sys
path = sys.argv[1]
config = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
want = {"path": "/usr/bin/runsc",
        "runtimeArgs": ["--platform=ptrace", "--network=host", "--oci-seccomp"]}
if config.get("runtimes", {}).get("runsc") != want:
    config.setdefault("runtimes", {})["runsc"] = want
    with open(path + ".tmp", "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    os.replace(path + ".tmp", path)
    print("bootstrap: registered runtime runsc in " + path, file=sys.stderr)
    print("changed")
PY
)

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/pyexec-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not come up; see /var/log/pyexec-dockerd.log"; exit 1; }
fi
runtimes() { docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null; }
if [ -n "$runsc_changed" ] || ! runtimes | grep -qw runsc; then
  # A running dockerd reloads daemon.json on SIGHUP (runtimes included), without stopping
  # the containers it runs.
  log "reloading dockerd to pick up the runsc runtime"
  pid=$(cat /var/run/docker.pid 2>/dev/null || pidof dockerd || true)
  [ -n "$pid" ] && kill -HUP "$pid"
  for _ in $(seq 1 20); do runtimes | grep -qw runsc && break; sleep 0.5; done
  runtimes | grep -qw runsc || { log "dockerd does not list runtime runsc; see /var/log/pyexec-dockerd.log"; exit 1; }
fi

# --- Runner image (no registry can be pulled from here) ---------------------
if ! docker image inspect "$image" >/dev/null 2>&1; then
  log "building runner image $image with debootstrap (about a minute)"
  root=$(mktemp -d /var/tmp/pyexec-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" "$(mirror)" >/var/log/pyexec-debootstrap.log 2>&1 \
    || { log "debootstrap failed; see /var/log/pyexec-debootstrap.log"; exit 1; }
  # Debian marks its python "externally managed"; inside a throwaway sandbox pip may install freely.
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
  rm -rf "$root"; trap - EXIT
  log "built $image"
fi

# --- Consul (tests and the Consul/Nomad backends) --------------------------
if [ $want_consul -eq 1 ]; then
  if ! command -v consul >/dev/null 2>&1; then
    src=/etc/apt/sources.list.d/pyexec-bullseye.list
    if [ ! -f "$src" ]; then
      log "adding Debian bullseye as an extra apt source for the consul package"
      echo "deb $(mirror) bullseye main" >"$src"
      # Only consul comes from bullseye; everything else stays on bookworm.
      printf 'Package: *\nPin: release n=bullseye\nPin-Priority: 100\n' >/etc/apt/preferences.d/pyexec-bullseye
      apt_updated=0
    fi
    [ $apt_updated -eq 1 ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends consul/bullseye >/dev/null
  fi
  if ! curl -fsS http://127.0.0.1:8500/v1/status/leader 2>/dev/null | grep -q ':'; then
    log "starting consul agent -dev on 127.0.0.1:8500"
    nohup consul agent -dev -client 127.0.0.1 -bind 127.0.0.1 -hcl 'disable_update_check = true' >/var/log/pyexec-consul.log 2>&1 &
    for _ in $(seq 1 60); do
      curl -fsS http://127.0.0.1:8500/v1/status/leader 2>/dev/null | grep -q ':' && break; sleep 1
    done
    curl -fsS http://127.0.0.1:8500/v1/status/leader 2>/dev/null | grep -q ':' \
      || { log "consul did not come up; see /var/log/pyexec-consul.log"; exit 1; }
  fi
fi
log "ready"
