#!/usr/bin/env bash
# Builds the pyexec service image without any network access during `docker build`.
#
# The host does the downloading: `uv build` makes pyexec's wheel, `uv export` pins the
# server dependencies (with hashes) from uv.lock, and `pip download` fetches their wheels
# for the base image's Python and architecture. The Dockerfile only COPYs those wheels,
# so the build works where no registry or PyPI is reachable from containers.
#
#   scripts/build-image.sh [TAG]        default tag: pyexec:dev
#
# Environment:
#   PYEXEC_BASE_IMAGE   base for both stages (default python:3.12-slim); it needs python3
#                       with venv and pip (for the build stage), e.g. pyexec-runner:bookworm
#   PIP_CERT            CA bundle for a TLS-intercepting proxy, passed to pip as usual
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tag=${1:-pyexec:dev}
base=${PYEXEC_BASE_IMAGE:-python:3.12-slim}
out="$here/build/image"

log() { printf 'build-image: %s\n' "$*" >&2; }

docker image inspect "$base" >/dev/null 2>&1 || {
  log "base image $base is not present locally (set PYEXEC_BASE_IMAGE)"; exit 1; }

# The wheels must match the Python and CPU of the base image, not the host's.
read -r pyver arch < <(docker run --rm --network none --entrypoint python3 "$base" -c \
  'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine())')
log "base $base: python $pyver on $arch"

rm -rf "$out"
mkdir -p "$out/wheels"
(cd "$here" && uv build --wheel --out-dir "$out/wheels" -q)
(cd "$here" && uv export --frozen --no-dev --extra server --no-emit-project -q \
  -o "$out/requirements.txt")
platforms=()
for glibc in 2_17 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${glibc}_${arch}"); done
# pip from uv's tool cache: the project venv has no pip, and the host's python3 may not either.
uvx --quiet --from pip pip download -q --disable-pip-version-check --no-deps --require-hashes \
  --only-binary=:all: --implementation cp --python-version "$pyver" \
  --platform "manylinux2014_${arch}" "${platforms[@]}" \
  -r "$out/requirements.txt" -d "$out/wheels"
log "$(find "$out/wheels" -name '*.whl' | wc -l) wheels in build/image/wheels"

previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
docker build -q --force-rm --build-arg "BASE_IMAGE=$base" -t "$tag" "$here" >/dev/null
# Release what this build superseded: the image the tag named before (if nothing uses it)
# and the build stage, which carries a label so that nothing else is touched.
current=$(docker image inspect --format '{{.Id}}' "$tag")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
docker image prune -f --filter label=pyexec.build-stage=true >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
base_size=$(docker image inspect --format '{{.Size}}' "$base")
log "built $tag: $((size / 1000000)) MB ($(((size - base_size) / 1000000)) MB over the base)"
