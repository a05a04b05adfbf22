"""Summaries of query histograms and the full-file figures they are judged by."""

from __future__ import annotations

import numpy as np

from casa_benchmarks.adl.binning import BINNING

# adl-facts.md, full Run2012B_SingleMu.root (53,446,198 events):
# name -> (entries, mean, std); q6_mass is the trijet mass (not histogrammed)
FULL_FILE_EVENTS = 53_446_198
FULL_FILE: dict[str, tuple[float, float, float]] = {
    "q1": (53_446_198, 30.0, 17.7),
    "q2": (170_952_895, 22.7, 9.4),
    "q3": (39_563_735, 28.1, 11.7),
    "q4": (6_665_702, 29.9, 21.0),
    "q5": (2_970_887, 21.7, 15.2),
    "q6_mass": (23_752_864, 151.0, 47.0),
    "q6_btag": (23_752_864, 0.55, 0.36),
    "q7": (18_950_000, 68.4, 38.6),
    "q8": (5_003_286, 24.5, 22.3),
}


def summarize(name: str, counts_with_flow: np.ndarray) -> tuple[int, float, float]:
    """(entries including flow, mean and std of the in-range part from bin centres)."""
    n, lo, hi, _ = BINNING[name]
    counts = np.asarray(counts_with_flow, dtype=float)
    inner = counts[1:-1]
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    total = inner.sum()
    if total == 0:
        return int(counts.sum()), float("nan"), float("nan")
    mean = float((inner * centres).sum() / total)
    std = float(np.sqrt((inner * (centres - mean) ** 2).sum() / total))
    return int(counts.sum()), mean, std


def moments(values: np.ndarray) -> tuple[int, float, float]:
    v = np.asarray(values, dtype=float)
    return len(v), float(v.mean()) if len(v) else float("nan"), float(v.std()) if len(v) else float("nan")
