#!/usr/bin/env bash
# The core tests against the oldest coffea, uproot and awkward that pyproject.toml allows, in a venv of their own
# (.venv-oldest, idempotent), so that the declared range is true. No engines: iterative and futures only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the oldest releases pyproject.toml's floors allow (coffea 2026.4.0 is the first release >= 2026.1, and it
# requires uproot >= 5.7.0 and awkward >= 2.8.11: the floors say so)
OLDEST=("coffea==2026.4.0" "uproot==5.7.0" "awkward==2.8.11")
TESTS=(tests/test_internals.py tests/test_nanoforms.py tests/test_baskets.py tests/test_core.py tests/test_checkpoint.py
       tests/test_open_files.py tests/test_backend_futures.py)
venv=.venv-oldest
stamp=$venv/.casa-oldest
want="${OLDEST[*]} $(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${OLDEST[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi
"$venv/bin/python" - "${OLDEST[@]}" <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert version(name) == want, f"{name} {version(name)} installed, {want} wanted"
PY
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra "$@" "${TESTS[@]}"
