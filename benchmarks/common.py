"""Helpers the top-level benchmark scripts share: the ADL dataset, a timed Runner call, histogram counts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from coffea import processor
from coffea.nanoevents import NanoAODSchema

from benchmarks.adl.generate import generate
from benchmarks.adl.queries import QUERIES


def dataset(directory: Path, events: int, files: int) -> list[str]:
    """``files`` synthetic ADL files holding ``events`` in all, generated once under ``directory``."""
    d = directory / f"adl-{events}-{files}"
    paths = sorted(str(p) for p in d.glob("adl-*.root"))
    if len(paths) != files:
        paths = generate(d, events, files, seed=1).files
    return paths


def timed(executor: Any, files: list[str], query: int, chunksize: int) -> tuple[float, dict]:
    """Wall time and output of one ``Runner`` call of ADL query ``query`` (no metadata cache)."""
    runner = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={})
    t0 = time.perf_counter()
    out = runner({"adl": files}, QUERIES[query](), treename="Events")
    return time.perf_counter() - t0, out


def counts(out: dict, flow: bool = False) -> dict[str, list]:
    """The bin contents of every histogram in an output, to compare runs."""
    return {k: h.values(flow=flow).tolist() for k, h in out.items() if hasattr(h, "values")}
