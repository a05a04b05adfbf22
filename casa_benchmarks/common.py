"""Helpers the top-level benchmark scripts share: options, the ADL dataset, a timed Runner call,
histogram counts, the order of contenders, the JSON file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from coffea import processor
from coffea.nanoevents import NanoAODSchema

from casa_benchmarks.adl.generate import generate
from casa_benchmarks.adl.queries import QUERIES

DATA_DIR = Path.home() / ".cache" / "casa_executors"


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


def dataset_options(ap: argparse.ArgumentParser, events: int, files: int, chunksize: int, workers: int = 2) -> None:
    """The options of a benchmark on the synthetic ADL dataset (and ``--json``)."""
    ap.add_argument("--events", type=int, default=events)
    ap.add_argument("--files", type=int, default=files)
    ap.add_argument("--workers", type=int, default=workers)
    ap.add_argument("--chunksize", type=int, default=chunksize)
    ap.add_argument("--data-dir", default=str(DATA_DIR), help="where the generated files are kept between runs")
    ap.add_argument("--json", default=None, help="write the results to this file")


def rotated(names: list[str], rep: int) -> list[str]:
    """The contenders in the order of repetition ``rep``: each goes first in turn (no warm-up favourite)."""
    k = rep % len(names)
    return names[k:] + names[:k]


def save_json(result: dict, path: str | None) -> dict:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
    return result
