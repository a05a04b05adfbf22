"""The docs site: `mkdocs build --strict` passes (broken links and anchors, pages missing from the nav, an
API reference that does not resolve all fail it), and every ```python block of docs/*.md and README.md runs.

A page's blocks run in order in one namespace (as a reader pastes them into one session), in a temporary
working directory, with two names given: ``fileset`` (the repository's 1000-event CMS sample as a ROOT
file) and ``MyProcessor`` (the README's quick-start processor). A marker line right before a block (at the
start of the line) says, with a reason, that the block

    <!-- docs-test: skip (needs a site's Slurm and its partitions) -->   is not run: CI has no such facility
    <!-- docs-test: slow (starts a JVM and a SparkContext) -->          starts an engine that takes seconds

A page with a slow block runs, all of it, in `test_slow_code_blocks_run` (marked slow, run by the full
suite); the other pages in `test_code_blocks_run`, which stays fast. Skipped blocks are few and listed by
`test_the_blocks_not_run_are_few_and_say_why`.
"""

from __future__ import annotations

import linecache
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"^<!-- docs-test: (?P<kind>skip|slow) \((?P<why>[^)]+)\) -->\s*$")
MAX_SKIPPED = 8  # facility-only examples; a page of them means the page is not tested

MY_PROCESSOR = '''
import hist
from coffea import processor


class MyProcessor(processor.ProcessorABC):
    def process(self, events):
        met = hist.Hist.new.Reg(50, 0, 200, name="met", label="MET [GeV]").Int64()
        met.fill(met=events.MET.pt)
        return {"met": met, "events": len(events)}

    def postprocess(self, accumulator):
        return accumulator
'''


def marked(page: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(line, code, marker kind or None, its reason) of each ```python block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARKER.search(before)
        kind, why = mark.group("kind", "why") if mark else (None, None)
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), kind, why))
    return out


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, why skipped or None) of each ```python block of ``page``."""
    return [(line, code, why if kind == "skip" else None) for line, code, kind, why in marked(page)]


def slow(page: Path) -> bool:
    return any(kind == "slow" for _, _, kind, _ in marked(page))


def with_code(pages: list[Path]) -> list[Path]:
    return [p for p in pages if any(why is None for _, _, why in blocks(p))]


@pytest.fixture(scope="module")
def fileset(sample_root) -> dict[str, list[str]]:
    from casa_benchmarks.adl.runner import quiet_nanoaod

    quiet_nanoaod()  # the sample has no GenPart etc.: NanoAODSchema would warn per chunk
    return {"SingleMu": [str(sample_root)]}


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra: pip install -e '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    for name in ("casa_executors.dask", "casa_executors.Driver", "casa_executors.Report",
                 "casa_executors.ExecutorOptionError"):
        assert f'id="{name}"' in api, f"the API reference has no entry for {name}"
    assert (site / "driver-rules" / "index.html").is_file()


def run_page(page: Path, fileset: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}", "fileset": fileset}
    exec(compile(MY_PROCESSOR, "<MyProcessor>", "exec"), namespace)
    level = logging.getLogger("casa_executors").level  # a page may switch the package's logging on
    try:
        for line, code, why in blocks(page):
            if why is None:
                name = f"{page.relative_to(ROOT)}:{line}"
                linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # tracebacks show the code
                exec(compile(code, name, "exec"), namespace)
    finally:
        logging.getLogger("casa_executors").setLevel(level)
    shutil.rmtree(tmp_path, ignore_errors=True)


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", [p for p in with_code(PAGES) if not slow(p)], ids=page_id)
def test_code_blocks_run(page, fileset, tmp_path, monkeypatch, no_leftover_processes):
    run_page(page, fileset, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in with_code(PAGES) if slow(p)], ids=page_id)
def test_slow_code_blocks_run(page, fileset, tmp_path, monkeypatch, no_leftover_processes):
    run_page(page, fileset, tmp_path, monkeypatch)


def test_the_blocks_not_run_are_few_and_say_why():
    skipped = [(p.name, line, why) for p in PAGES for line, _, why in blocks(p) if why is not None]
    assert all(len(why) > 10 for p in PAGES for _, _, kind, why in marked(p) if kind), "a marker needs a reason"
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} blocks not run: {skipped}"
    # the marker must sit right before a block: one that lost its block would silently skip nothing
    for page in PAGES:
        text = page.read_text()
        markers = len(re.findall(r"^<!-- docs-test:", text, re.M))
        blocks_marked = sum(kind is not None for _, _, kind, _ in marked(page))
        assert markers == blocks_marked, f"{page.name}: a marker without a block"
