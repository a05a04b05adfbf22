"""Query results of a dataset, summarised like the full-file table of adl-facts.md."""

from __future__ import annotations

import awkward as ak
import numpy as np
import uproot

from casa_benchmarks.adl.kernels import trijet_closest
from casa_benchmarks.adl.stats import moments, summarize

TRIJET_MASS_RANGE = (0.0, 300.0)


def trijet_masses(files: list[str], step: int = 500_000) -> np.ndarray:
    """Mass of the Q6 trijet of every event with >= 3 jets."""
    out = []
    branches = [f"Jet_{f}" for f in ("pt", "eta", "phi", "mass", "btag")]
    for arrays in uproot.iterate([{f: "Events"} for f in files], branches, step_size=step, library="ak"):
        jet_pt = arrays["Jet_pt"].layout.to_ListOffsetArray64(True)
        offsets = np.asarray(jet_pt.offsets)
        cols = [ak.to_numpy(ak.flatten(arrays[b])) for b in branches]
        out.append(trijet_closest(offsets, *cols)[2])
    return np.concatenate(out) if out else np.empty(0)


def dataset_stats(files: list[str]) -> tuple[dict[str, tuple[int, float, float]], int]:
    """name -> (entries, in-range mean, in-range std) and the number of events."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from casa_benchmarks.adl.queries import QUERIES

    stats: dict[str, tuple[int, float, float]] = {}
    events = 0
    meta: dict = {}
    for cls in QUERIES.values():
        run = processor.Runner(executor=processor.IterativeExecutor(status=False), schema=NanoAODSchema,
                               chunksize=500_000, metadata_cache=meta)
        out = run({"adl": files}, cls(), treename="Events")
        events = out["events"]
        for name, h in out.items():
            if name != "events":
                stats[name] = summarize(name, h.values(flow=True))
    mass = trijet_masses(files)
    lo, hi = TRIJET_MASS_RANGE
    _, mean, std = moments(mass[(mass >= lo) & (mass < hi)])
    stats["q6_mass"] = (len(mass), mean, std)
    return stats, events
