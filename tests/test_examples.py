"""The example notebooks: executed top to bottom in a fresh kernel against stand-ins they start and
stop themselves, showing the progress bar and their plots; the committed copies carry the outputs of
such a run; the README's quick start is, character for character, a cell of examples/quickstart.ipynb."""

from __future__ import annotations

import difflib
import re

import nbformat
import pytest
from xrootd_fixtures import require_xrootd

from examples.execute import EXAMPLES, execute

README = EXAMPLES.parent / "README.md"
# notebook -> images it shows (histograms, events/s)
PLOTS = {
    "quickstart.ipynb": 1,
    "dask_tls_event_loop.ipynb": 1,
    "adl_q8_backends.ipynb": 2,
    "xcache_bearer_token.ipynb": 1,
    "watch_a_run.ipynb": 2,  # the histogram filling (one output, updated in place), the timeline
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
JWT = re.compile(r"eyJ[\w-]{10,}\.[\w-]{10,}\.")  # a signed token, as a bearer token looks
QUICKSTART_TAG = "readme-quickstart"


def outputs(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text(nb: nbformat.NotebookNode) -> str:
    """Everything a reader sees as text: streams and the plain-text form of displays."""
    parts = []
    for o in outputs(nb):
        parts.append(o.get("text", "") if o.output_type == "stream" else str(o.get("data", {}).get("text/plain", "")))
    return ANSI.sub("", "\n".join(parts))


def bars(nb: nbformat.NotebookNode, phase: str = "Processing") -> list[str]:
    """The final state of each progress bar of ``phase``, as text (each also has an HTML form)."""
    found = []
    for o in outputs(nb):
        data = o.get("data", {})
        plain = ANSI.sub("", str(data.get("text/plain", "")))
        if o.output_type == "display_data" and plain.startswith(f"{phase} ["):
            assert "<pre" in data.get("text/html", ""), "the bar must render as HTML in a notebook"
            found.append(plain.strip())
    return found


def check_common(nb: nbformat.NotebookNode, name: str) -> None:
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == PLOTS[name], f"{name}: {len(images)} images, expected {PLOTS[name]}"
    assert all(len(o.data["image/png"]) > 5_000 for o in images)  # a drawn figure, not an empty canvas
    assert bars(nb), f"{name} shows no progress bar"
    assert not JWT.search(nbformat.writes(nb)), f"{name} shows a bearer token"


def run(name: str) -> nbformat.NotebookNode:
    nb, left = execute(EXAMPLES / name)
    assert not left, f"{name} left processes running (stopped now): {left}"
    check_common(nb, name)
    return nb


def test_quickstart_notebook(no_leftover_processes):
    nb = run("quickstart.ipynb")
    (bar,) = bars(nb)
    assert bar.startswith("Processing [futures(2 workers)]") and "4/4 chunk" in bar and "ev/s" in bar
    assert "futures: 4/4 chunks, 1000 events" in text(nb)


def test_dask_tls_notebook(no_leftover_processes):
    nb = run("dask_tls_event_loop.ipynb")
    (bar,) = bars(nb)
    assert re.match(r"Processing \[dask\(2 workers, tls://127\.0\.0\.1:\d+\)\]", bar) and "12/12 chunk" in bar
    (pre,) = bars(nb, "Preprocessing")
    assert "3/3 file" in pre
    out = text(nb)
    assert "dask: 12/12 chunks, 3000 events" in out and "identical to the local loop" in out
    assert len(re.findall(r"tls://127\.0\.0\.1:\d+", out.split("chunks ran on")[1])) == 2


def test_adl_notebook(no_leftover_processes):
    nb = run("adl_q8_backends.ipynb")
    backends = ["iterative", "futures", "dask", "parsl", "workqueue", "spark"]
    shown = bars(nb)
    assert [re.match(r"Processing \[(\w+)", b).group(1) for b in shown] == backends
    assert all("6/6 chunk" in b for b in shown)
    # the table: one row per backend, identical to iterative, and events/s = events / wall s
    rows = {}
    for line in text(nb).splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(cells) == 10 and cells[0] == "Q8":
            rows[cells[1]] = cells
    assert sorted(rows) == sorted(backends), rows
    for name, (_, _, events, wall, rate, _eff, _mb, _vs, check, _warmup) in rows.items():
        events, wall, rate = int(events.replace(",", "")), float(wall), float(rate.replace(",", ""))
        assert events == 60_000 and check == "ok", rows[name]
        assert events / (wall + 0.005) - 1 <= rate <= events / max(wall - 0.005, 1e-3) + 1, rows[name]


def test_watch_notebook(no_leftover_processes):
    nb = run("watch_a_run.ipynb")
    (bar,) = bars(nb)
    assert bar.startswith("Processing [futures(2 workers)]") and "32/32 chunk" in bar
    out = text(nb)
    assert "futures: 32/32 chunks, 8000 events" in out
    # logging switched on with one call: the engine's start and stop, under the cell
    assert "INFO casa_executors.backends.base: futures(2 workers) started in" in out
    assert "INFO casa_executors.backends.base: futures stopped in" in out
    # the callback saw the histogram grow while the run went (16 chunks of at least 0.1 s a worker, calls at
    # most every 1.0 s: one at least before the end), and the last call had all of it
    m = re.search(r"on_progress called (\d+) times, with partial outputs of \[([\d, ]+)\] chunks", out)
    assert m, out
    counts = [int(x) for x in m.group(2).split(",")]
    assert int(m.group(1)) == len(counts) >= 2 and counts == sorted(counts) and counts[-1] == 32
    assert counts[0] < 32


def test_xcache_notebook(no_leftover_processes):
    require_xrootd()
    nb = run("xcache_bearer_token.ipynb")
    out = text(nb)
    assert "permission denied" in out  # no token: refused by the cache and by the origin
    assert re.search(r"\{'xcache:root://127\.0\.0\.1:\d+': 8\}", out)  # with the token: all 8 chunks via the cache
    assert out.count("'state': 'complete'") == 2 and "same histogram with the origin stopped" in out
    assert [b.split("]")[0] for b in bars(nb)] == ["Processing [futures(2 workers)",
                                                    "Processing [iterative(in this process)"]


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_committed_notebook_keeps_the_outputs_of_a_full_run(name):
    """What a reader sees on GitHub: outputs of one run from a fresh kernel, top to bottom, and small."""
    path = EXAMPLES / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{name}: not saved from one top-to-bottom run; refresh with: .venv/bin/python examples/execute.py {path}"
    )
    check_common(nb, name)
    assert "widgets" not in nb.metadata  # nothing that GitHub cannot render
    assert path.stat().st_size < 150_000


def quickstart_block() -> str:
    """The first python code block of the README's "Quick start" section."""
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "the README's Quick start has no ```python block"
    return m.group(1)


def test_readme_quickstart_is_a_cell_of_the_executed_notebook():
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    cells = [c for c in nb.cells if QUICKSTART_TAG in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code"
    cell, block = cells[0].source.rstrip("\n") + "\n", quickstart_block()
    diff = "".join(difflib.unified_diff(cell.splitlines(True), block.splitlines(True), "examples/quickstart.ipynb",
                                        "README.md"))
    assert cell == block, f"the README's quick start differs from the notebook cell tagged {QUICKSTART_TAG}:\n{diff}"
    assert "MyProcessor" in block and "casa_executors.futures" in block


def test_what_a_notebook_leaves_running_is_reported_and_stopped(tmp_path, no_leftover_processes):
    """The guard the tests above rely on: a dask scheduler (setproctitle blanks its environment) and a
    process that left our tree (its parent exited) are both found, and stopped by PID."""
    import psutil

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "dask = subprocess.Popen([str(Path(sys.executable).with_name('dask')), 'scheduler', '--host', '127.0.0.1',"
        " '--port', '0', '--dashboard-address', '127.0.0.1:0'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,"
        " start_new_session=True)\n"  # out of the kernel's process group, which the kernel's shutdown signals
        "subprocess.run(['setsid', 'sh', '-c', 'sleep 300 >/dev/null 2>&1 &'], check=True)\n"
        "time.sleep(3)\n"
        "print(dask.pid)"
    )])
    path = tmp_path / "leaky.ipynb"
    nbformat.write(nb, path)
    nb, left = execute(path, grace=1.0)
    assert len(left) == 2 and any("dask scheduler" in x for x in left) and any("sleep 300" in x for x in left), left
    dask_pid = int(nb.cells[0].outputs[0].text)
    assert not psutil.pid_exists(dask_pid) or psutil.Process(dask_pid).status() == psutil.STATUS_ZOMBIE
