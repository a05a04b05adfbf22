"""Convert the real 1000-event ADL sample (parquet) to a NanoAOD-like ROOT file."""

from __future__ import annotations

import awkward as ak
import numpy as np

from casa_benchmarks.adl.rootio import TreeWriter
from casa_benchmarks.adl.schema import COLLECTIONS, EVENT, LAYOUT, MET


def read_parquet_batch(parquet_path: str) -> dict:
    """The parquet sample as a writer batch with the ROOT file's dtypes."""
    events = ak.from_parquet(parquet_path)
    batch: dict = {}
    for group in LAYOUT:
        if group in ("event", "met"):
            flat = EVENT if group == "event" else MET
            for name, dtype in flat.items():
                batch[name] = ak.to_numpy(events[name]).astype(dtype)
        else:
            fields = COLLECTIONS[group]
            counts = ak.to_numpy(ak.num(events[f"{group}_pt"])).astype(np.uint32)
            if not np.array_equal(counts, ak.to_numpy(events[f"n{group}"])):
                raise ValueError(f"n{group} disagrees with the length of {group}_pt")
            values = {
                f: ak.to_numpy(ak.flatten(events[f"{group}_{f}"])).astype(t)
                for f, t in fields.items()
            }
            batch[group] = (counts, values)
    return batch


def write_root(parquet_path: str, out_path: str, tree: str = "Events") -> str:
    """Write ``parquet_path`` as ROOT file ``out_path`` (all 86 branches); return it."""
    with TreeWriter(out_path, tree) as writer:
        writer.extend(read_parquet_batch(parquet_path))
    return out_path
