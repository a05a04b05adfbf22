"""mypy on the public API (pyproject.toml's [tool.mypy]), and on a user's script that uses it.

Checked and required clean: the modules that define what ``casa_executors`` exports (PUBLIC). The
modules they import are read for their types but their own errors are not reported
(``follow_imports = "silent"``), and third-party packages are taken as ``Any``. The backend
implementations (``backends/dask``, ``parsl.py``, ...) are outside: users reach them through the factories,
whose signatures tests/test_api.py holds equal to theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[1]
PUBLIC = [
    "casa_executors/__init__.py",
    "casa_executors/options.py",
    "casa_executors/driver.py",
    "casa_executors/report.py",
    "casa_executors/errors.py",
    "casa_executors/backends/base.py",
    "casa_executors/xcache/tokens.py",
    "casa_executors/xcache/router.py",
]

USER_OK = """\
    from pathlib import Path

    import casa_executors
    from casa_executors import Driver

    def executors() -> list[Driver]:
        return [
            casa_executors.iterative(retries=1, status=False),
            casa_executors.futures(workers=2, merge="driver", compression=None),
            casa_executors.dask(workers=2, processes=False, cache="root://c:1094", token=Path("bt")),
            casa_executors.parsl(workers=2, adapt=None, worker_timeout=60.0),
            casa_executors.spark(master="local[2]", conf={"spark.ui.enabled": "false"}),
            casa_executors.workqueue(workers=2, warm=False, cache_mode="forward", token=False),
            casa_executors.create("futures", workers=2),
        ]
    """

# each line a mistake mypy must report (the line's number is checked)
USER_WRONG = """\
    import casa_executors

    casa_executors.dask(workers="2")
    casa_executors.futures(retries="3")
    casa_executors.futures(treereduction=4)
    casa_executors.iterative(merge="nowhere")
    casa_executors.spark(master=1)
    casa_executors.workqueue(port="9123")
    """


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(cache_dir: Path, *files: str | Path) -> subprocess.CompletedProcess[str]:
    # MYPYPATH: this checkout's package, also for a script outside it (before an installed copy)
    env = {**os.environ, "MYPYPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache_dir), *map(str, files)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_public_api_and_a_users_script_type_check(cache_dir, tmp_path):
    script = tmp_path / "user_ok.py"
    script.write_text(textwrap.dedent(USER_OK))
    run = mypy(cache_dir, *PUBLIC, script)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("Success: no issues found"), run.stdout


def test_wrong_options_are_type_errors(cache_dir, tmp_path):
    script = tmp_path / "user_wrong.py"
    script.write_text(textwrap.dedent(USER_WRONG))
    run = mypy(cache_dir, script)
    assert run.returncode == 1, run.stdout + run.stderr
    flagged = {int(line.split(":")[1]) for line in run.stdout.splitlines() if line.startswith(str(script))
               and ": error:" in line}
    assert flagged == set(range(3, 9)), run.stdout
    assert 'Unexpected keyword argument "treereduction"' in run.stdout
