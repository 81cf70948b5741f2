#!/usr/bin/env bash
# Sets everything up (idempotently) and runs the whole test suite: lint, types, unit,
# integration, the privileged end-to-end tier and the VM tier. Fails if the privileged
# tier was skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
# A sandbox left over from an interrupted run would make `sandbox up` refuse.
mkdir -p /run/nodeagent
flock /run/nodeagent/e2e.lock .venv/bin/nodeagent sandbox down >/dev/null 2>&1 || true
echo "== ruff"; .venv/bin/ruff check nodeagent tests bench
echo "== mypy"; .venv/bin/mypy
# The suite runs what the demo runs: the compiled hot path (fails here if it is not built
# or older than its sources). The pure-Python modules get the unit and integration tiers.
echo "== hot path"; .venv/bin/nodeagent native status
if [ $# -eq 0 ]; then
  echo "== pytest, pure Python (NODEAGENT_PURE=1): unit and integration"
  NODEAGENT_PURE=1 .venv/bin/pytest -p no:cacheprovider -q tests/unit tests/integration
fi
echo "== pytest"
export NODEAGENT_REQUIRE_PRIVILEGED=1
rc=0
.venv/bin/pytest -p no:cacheprovider -ra "$@" || rc=$?
# The VM tier: a Debian guest under QEMU running the agent as its systemd unit, in host
# mode (the box is built once and cached in /var/cache/nodeagent/vagrant). Only with the
# whole suite: a run of chosen tests is someone's quick check.
if [ $# -eq 0 ]; then
  echo "== VM tier (scripts/vm-test.sh)"
  bash scripts/vm-test.sh || rc=$?
fi
exit $rc
