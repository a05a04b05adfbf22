"""Write a synthetic ADL dataset: K ROOT files (tree ``Events``), 86 branches.

Deterministic for (events, files, seed, batch): file i uses the numpy seed
sequence ``[seed, i]`` and covers global events [i N / K, (i + 1) N / K).
Events are made and written ``batch`` at a time (one basket per branch per
batch), so memory stays bounded whatever N is. Compression: LZ4 level 1
(fast to decompress for uproot and ROOT alike; ``--compression zlib`` gives
ZLIB level 1).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import uproot

from casa_benchmarks.adl.rootio import TreeWriter
from casa_benchmarks.adl.schema import COLLECTIONS, EVENT, MET
from casa_benchmarks.adl.synth import make_batch

COMPRESSION = {"lz4": uproot.LZ4(1), "zlib": uproot.ZLIB(1), "zstd": uproot.ZSTD(1), "none": None}
DEFAULT_BATCH = 200_000


@dataclass
class GenerateResult:
    files: list[str]
    events: int
    seed: int
    compression: str
    wall_s: float
    cpu_s: float
    bytes_written: int
    events_per_minute: float = field(init=False)

    def __post_init__(self) -> None:
        self.events_per_minute = 60.0 * self.events / self.wall_s if self.wall_s else 0.0


def cast(batch: dict) -> dict:
    """Give every branch its schema dtype."""
    flat = {**EVENT, **MET}
    out = {}
    for name, value in batch.items():
        if isinstance(value, tuple):
            counts, fields = value
            dtypes = COLLECTIONS[name]
            out[name] = (counts, {f: np.asarray(fields[f], dtype=dtypes[f]) for f in dtypes})
        else:
            out[name] = np.asarray(value, dtype=flat[name])
    return out


def file_ranges(events: int, files: int) -> list[tuple[int, int]]:
    return [(i * events // files, (i + 1) * events // files) for i in range(files)]


def write_file(path: str, start: int, stop: int, seed: int, index: int, batch: int, compression: str) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    with TreeWriter(path, "Events", COMPRESSION[compression]) as writer:
        for first in range(start, stop, batch):
            n = min(batch, stop - first)
            writer.extend(cast(make_batch(rng, n, first)))


def generate(
    out_dir: str | os.PathLike,
    events: int,
    files: int = 1,
    seed: int = 1,
    batch: int = DEFAULT_BATCH,
    compression: str = "lz4",
    prefix: str = "adl",
) -> GenerateResult:
    if events < files or files < 1:
        raise ValueError(f"need at least one event per file (events={events}, files={files})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    paths = []
    for i, (start, stop) in enumerate(file_ranges(events, files)):
        path = out / f"{prefix}-{i:03d}.root"
        tmp = path.with_suffix(".root.part")
        write_file(str(tmp), start, stop, seed, i, batch, compression)
        tmp.replace(path)  # complete files only
        paths.append(str(path))
    return GenerateResult(
        files=paths,
        events=events,
        seed=seed,
        compression=compression,
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
        bytes_written=sum(os.path.getsize(p) for p in paths),
    )


def write_json(result: GenerateResult, path: str) -> None:
    Path(path).write_text(json.dumps(asdict(result), indent=2) + "\n")
