#!/usr/bin/env bash
# The core tests against the oldest coffea, uproot and awkward that pyproject.toml allows, in a venv of their own
# (.venv-oldest, idempotent), so that the declared range is true: the driver, merges, checkpoints, errors and
# coffea's drop-in contract, kept TTrees, NanoEvents forms and baskets, and the eight ADL queries with the
# coffea/uproot internals on and off (tests/test_internals.py), on iterative and futures (no engines needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# keep in step with the floors in pyproject.toml (checked below)
OLDEST=("coffea==2026.9.0" "uproot==5.7.0" "awkward==2.8.11")
TESTS=(tests/test_internals.py tests/test_nanoforms.py tests/test_baskets.py tests/test_core.py
       tests/test_coffea_dropin.py tests/test_checkpoint.py tests/test_open_files.py tests/test_backend_futures.py)
# engines are not installed here; the kill-and-resume and long futures runs are the main suite's
SKIP="dask or parsl or spark or workqueue or sigkill or whole_engine or short_chunks"
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
import re
import sys
import tomllib
from importlib.metadata import version

from packaging.version import Version

floors = {}
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,; ]+)", dep)
    if m:
        floors[m[1].lower()] = m[2]
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert version(name) == want, f"{name} {version(name)} is installed in .venv-oldest, {want} wanted"
    floor = floors.get(name, "none")
    got, low = Version(want).release, Version(floor).release if floor != "none" else ()
    assert low and got[:len(low)] == low and not any(got[len(low):]), (
        f"{name}: pyproject.toml's floor is {floor}, scripts/oldest.sh tests {want}: keep them in step")
    print(f"oldest: {name} {want} (pyproject.toml: >={floor})")
PY
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra -k "not ($SKIP)" "$@" "${TESTS[@]}"
