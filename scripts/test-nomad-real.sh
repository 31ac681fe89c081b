#!/usr/bin/env bash
# The Nomad suites (every tests/ module that honours PYEXEC_TEST_NOMAD_ADDR) against a real Nomad
# agent instead of the double: `just test-nomad-real [pytest args]`.
#
# Needs `nomad` (HashiCorp Nomad >= 1.6; checked with 1.6.5) on PATH, a running Docker
# engine and Consul (scripts/dev-cluster.sh starts a dev Consul when none answers on
# 127.0.0.1:8500). Starts a dev agent from nomad/*.hcl unless one answers on
# 127.0.0.1:4646, and stops afterwards only what it started. CI runs the double
# (`just test`); nothing here is needed for it.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
nomad_http=127.0.0.1:4646

if ! command -v nomad >/dev/null 2>&1; then
  cat >&2 <<'MSG'
test-nomad-real: no `nomad` binary on PATH, so there is no real agent to test against.
  Install HashiCorp Nomad >= 1.6 (the suite was checked with 1.6.5) from your usual
  source and run this again; it starts a dev agent from nomad/*.hcl by itself.
  Without it, `just test` runs the same tests against the double (tests/nomadsim).
MSG
  exit 127
fi

started=no
if ! curl -fsS --max-time 2 "http://$nomad_http/v1/status/leader" 2>/dev/null | grep -q ':'; then
  "$here/scripts/dev-cluster.sh" start
  started=yes
fi
stop() { if [ "$started" = yes ]; then "$here/scripts/dev-cluster.sh" stop; fi; }
trap stop EXIT

cd "$here"
PYEXEC_TEST_NOMAD_ADDR="http://$nomad_http" \
PYEXEC_TEST_CONSUL_ADDR="${PYEXEC_TEST_CONSUL_ADDR:-127.0.0.1:8500}" \
  uv run --frozen --all-extras pytest tests/test_nomad_e2e.py tests/test_nomadsim.py tests/test_events_nomad.py \
    tests/test_nomad_pool.py tests/test_artifacts_nomad.py tests/test_deps_nomad_e2e.py -rs "$@"
