#!/usr/bin/env bash
# Runs the fuzz tests (marked `fuzz`; profiles in tests/fuzzing.py) harder than the suite:
#   scripts/fuzz.sh              the `long` profile (20 times the suite's examples), once
#   scripts/fuzz.sh ci|long      that profile, once
#   scripts/fuzz.sh SECONDS      rounds of the `ci` profile, new random examples each round,
#                                until SECONDS have passed (a round is not cut short)
# Other arguments go to pytest (`scripts/fuzz.sh long -k http1`). For each test it prints the
# examples run and their time (Hypothesis' statistics) and the wall time (--durations).
# A failure prints the input and a @reproduce_failure line; the example database
# (.hypothesis/) replays it on the next run. NODEAGENT_PURE=1 fuzzes the pure-Python
# modules instead of the compiled hot path; VENV=DIR uses another virtualenv than .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTEST="${VENV:-$ROOT/.venv}/bin/pytest"
if [ ! -x "$PYTEST" ]; then
  echo "fuzz: no $PYTEST: run scripts/setup.sh (or scripts/test.sh) first" >&2
  exit 1
fi

what="${1:-long}"
[ $# -gt 0 ] && shift
run() {  # run PROFILE [pytest args]: the fuzz tests once under PROFILE
  local profile="$1"
  shift
  HYPOTHESIS_PROFILE="$profile" "$PYTEST" -p no:cacheprovider -q -m fuzz \
    --hypothesis-show-statistics --durations=0 --durations-min=0.1 "$@" \
    tests/unit tests/integration
}

case "$what" in
  ci | long)
    run "$what" "$@"
    ;;
  *[!0-9]* | "")
    echo "fuzz: expected ci, long or a number of seconds, not '$what'" >&2
    exit 2
    ;;
  *)
    end=$((SECONDS + what))
    round=0
    while [ "$SECONDS" -lt "$end" ]; do
      round=$((round + 1))
      echo "== fuzz round $round ($((end - SECONDS)) s left)"
      run ci "$@"
    done
    echo "== fuzz: $round round(s) of the ci profile in $SECONDS s, no failure"
    ;;
esac
