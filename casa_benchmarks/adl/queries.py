"""The eight ADL benchmark queries as coffea processors (NanoAODSchema).

Each processor's ``process(events)`` returns ``{name: hist.Hist, ..., "events": n}``
with integer-count (Int64) histograms, so merging chunks is exact. Binning is in
``casa_benchmarks.adl.binning`` (100 regular bins per histogram).

Choices (shared with ``reference.py`` and ``rdf.py``, which implement them
independently):

* All derived kinematics (masses, ΔR, mT, sums) are computed in float64 from
  the float32 branches, so the result does not depend on float32 rounding
  order; four-momenta come from (pt, eta, phi, mass).
* Q5 fills MET once per event that has at least one opposite-charge muon
  pair with 60 < m < 120 GeV.
* Q6 keeps the first trijet (order i < j < k) in case of a tie. Q5 to Q8
  (the queries that compare objects with each other) run in numba kernels over
  the jagged offsets (``kernels.py``: exact, no per-combination arrays).
  Events whose three b-tags are all -10 (tagger failed) land in the underflow.
* Q7 skips events without any clean jet (jet pT > 30 GeV, ΔR >= 0.4 to every
  electron and muon with pT > 10 GeV); the full-file count of such events
  (about 18.95 M of 53.4 M) is what the facts table quotes.
* Q8 leptons are the muons followed by the electrons; the SFOS pair closest
  to 91.2 GeV and the highest-pT remaining lepton are the first in that order
  when tied.
"""

from __future__ import annotations

from typing import Any, ClassVar

import awkward as ak
import hist
import numpy as np
from coffea import processor

from casa_benchmarks.adl.binning import BINNING, HISTOGRAMS
from casa_benchmarks.adl.kernels import clean_jet_sum, has_opposite_pair_in_window, trijet_closest, z_lepton_mt


def make_hist(name: str) -> hist.Hist:
    bins, lo, hi, label = BINNING[name]
    return hist.Hist(hist.axis.Regular(bins, lo, hi, name="x", label=label), storage=hist.storage.Int64())


def _flat(x: ak.Array) -> np.ndarray:
    return ak.to_numpy(ak.flatten(x, axis=None))


def _jagged(coll: ak.Array, *fields: str) -> list[np.ndarray]:
    """A collection's offsets (from 0) and the flat contents of its ``fields``, for the kernels."""
    offsets = np.asarray(ak.to_layout(coll[fields[0]]).to_ListOffsetArray64(True).offsets)
    return [offsets, *(_flat(coll[f]) for f in fields)]


class AdlQuery(processor.ProcessorABC):
    """Common plumbing: fresh histograms, fill, count events."""

    query: ClassVar[int] = 0

    def process(self, events: Any) -> dict[str, Any]:
        out: dict[str, Any] = {name: make_hist(name) for name in HISTOGRAMS[self.query]}
        for name, values in self.values(events).items():
            out[name].fill(values)
        out["events"] = len(events)
        return out

    def values(self, events: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


class Q1(AdlQuery):
    """MET of every event."""

    query = 1

    def values(self, events: Any) -> dict[str, np.ndarray]:
        return {"q1": ak.to_numpy(events.MET.pt)}


class Q2(AdlQuery):
    """pT of every jet."""

    query = 2

    def values(self, events: Any) -> dict[str, np.ndarray]:
        return {"q2": _flat(events.Jet.pt)}


class Q3(AdlQuery):
    """pT of jets with |eta| < 1."""

    query = 3

    def values(self, events: Any) -> dict[str, np.ndarray]:
        jets = events.Jet
        # pt and eta share their offsets: select on the flat contents
        pt, eta = _flat(jets.pt), _flat(jets.eta)
        return {"q3": pt[np.abs(eta) < 1]}


class Q4(AdlQuery):
    """MET of events with at least two jets of pT > 40 GeV."""

    query = 4

    def values(self, events: Any) -> dict[str, np.ndarray]:
        keep = ak.sum(events.Jet.pt > 40, axis=1) >= 2
        return {"q4": ak.to_numpy(events.MET.pt[keep])}


class Q5(AdlQuery):
    """MET of events with an opposite-charge muon pair of 60 < m < 120 GeV."""

    query = 5

    def values(self, events: Any) -> dict[str, np.ndarray]:
        good = has_opposite_pair_in_window(*_jagged(events.Muon, "pt", "eta", "phi", "mass", "charge"), 60.0, 120.0)
        return {"q5": ak.to_numpy(events.MET.pt)[good]}


class Q6(AdlQuery):
    """Trijet closest to the top mass: its pT and the largest b-tag of its jets."""

    query = 6

    def values(self, events: Any) -> dict[str, np.ndarray]:
        pt, btag, _ = trijet_closest(*_jagged(events.Jet, "pt", "eta", "phi", "mass", "btag"))
        return {"q6_pt": pt, "q6_btag": btag}


class Q7(AdlQuery):
    """Scalar pT sum of jets (pT > 30) away from light leptons (pT > 10)."""

    query = 7

    def values(self, events: Any) -> dict[str, np.ndarray]:
        fields = ("pt", "eta", "phi")
        return {"q7": clean_jet_sum(*_jagged(events.Jet, *fields), *_jagged(events.Muon, *fields),
                                    *_jagged(events.Electron, *fields))}


class Q8(AdlQuery):
    """mT of MET and the leading lepton outside the SFOS pair closest to the Z."""

    query = 8

    def values(self, events: Any) -> dict[str, np.ndarray]:
        fields = ("pt", "eta", "phi", "mass", "charge")
        met = events.MET
        return {"q8": z_lepton_mt(*_jagged(events.Muon, *fields), *_jagged(events.Electron, *fields),
                                  ak.to_numpy(met.pt), ak.to_numpy(met.phi))}


QUERIES: dict[int, type[processor.ProcessorABC]] = {
    cls.query: cls for cls in (Q1, Q2, Q3, Q4, Q5, Q6, Q7, Q8)
}

__all__ = ["HISTOGRAMS", "QUERIES", "AdlQuery", "make_hist"]
