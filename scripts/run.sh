#!/usr/bin/env bash
# The two entry points of the README. `bench`: set up, then the ADL benchmark over all
# backends, reading generated data through a local XRootD origin + XCache. `test`: set up, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
what=${1:-test}
shift || true
case "$what" in
  bench) exec .venv/bin/python -m casa_benchmarks.adl run --json bench-out/adl.json --plots bench-out "$@" ;;
  # two pytest-xdist workers, one module (or the facility group) each at a time: tests/conftest.py
  test) exec .venv/bin/python -m pytest -p no:cacheprovider -ra -n "${CASA_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
  *) echo "usage: scripts/run.sh bench|test [args]" >&2; exit 2 ;;
esac
