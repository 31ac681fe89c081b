# pyexec developer recipes. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

image := env_var_or_default("PYEXEC_RUNNER_IMAGE", "pyexec-runner:bookworm")

# Install everything and serve on the embedded default (local Docker, in-process store).
serve: bootstrap
    PYEXEC_DEFAULT_IMAGE={{image}} PYEXEC_PYTHON_IMAGES=3.11={{image}} PYEXEC_DEFAULT_PYTHON_VERSION=3.11 \
      uv run --frozen pyexec serve

# Install and start what the tests need (docker.io, dockerd, runner image, Consul), then run them all.
test *args: bootstrap-test
    uv run --frozen pytest {{args}}

# The quality gates: lint, format check, type check.
check:
    uv run --frozen ruff check .
    uv run --frozen ruff format --check .
    uv run --frozen mypy

# Install Python deps, docker.io, start dockerd, build the runner image.
bootstrap:
    scripts/bootstrap.sh

# The same, plus Consul running in -dev mode on loopback.
bootstrap-test:
    scripts/bootstrap.sh --consul

# Every benchmark in bench/, one after the other (each prints its ratios); stops at a failure.
bench: bootstrap-test
    for script in bench/[!_]*.py; do echo "== $script"; uv run --frozen python "$script"; done

# A local Consul + Nomad dev cluster on loopback (says which binary is missing, if any).
dev-cluster:
    scripts/dev-cluster.sh start

# Stop what `just dev-cluster` started.
dev-cluster-stop:
    scripts/dev-cluster.sh stop

# The Nomad suite against a real agent (`nomad` on PATH; starts a dev agent from nomad/
# unless one answers on :4646). Says what is missing when there is no `nomad`.
[positional-arguments]
test-nomad-real *args:
    scripts/test-nomad-real.sh "$@"
