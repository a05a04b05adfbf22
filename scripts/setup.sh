#!/usr/bin/env bash
# Idempotent set-up on Debian with Python >= 3.11: system packages (when root), .venv, the package with all extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEBS="xrootd-server xrootd-server-plugins xrootd-client xrootd-scitokens-plugins coop-computing-tools python3-workqueue openjdk-17-jre-headless iproute2 procps slurmctld slurmd slurm-client munge"
missing=""
for d in $DEBS; do dpkg -s "$d" >/dev/null 2>&1 || missing="$missing $d"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: missing Debian packages (need root to install):$missing" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.casa-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[all,test,docs]"  # docs: the site tests/test_docs.py builds
  touch "$stamp"
fi
