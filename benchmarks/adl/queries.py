"""The eight ADL benchmark queries as coffea processors (NanoAODSchema).

Each processor's ``process(events)`` returns ``{name: hist.Hist, ..., "events": n}``
with integer-count (Int64) histograms, so merging chunks is exact. Binning is in
``benchmarks.adl.binning`` (100 regular bins per histogram).

Choices (shared with ``reference.py`` and ``rdf.py``, which implement them
independently):

* All derived kinematics (masses, ΔR, mT, sums) are computed in float64 from
  the float32 branches, so the result does not depend on float32 rounding
  order; four-momenta come from (pt, eta, phi, mass).
* Q5 fills MET once per event that has at least one opposite-charge muon
  pair with 60 < m < 120 GeV.
* Q6 keeps the first trijet (order i < j < k) in case of a tie; the search runs
  in a numba kernel over the jagged offsets (exact, no per-combination arrays).
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
from coffea.nanoevents.methods import vector

from benchmarks.adl.binning import BINNING, HISTOGRAMS
from benchmarks.adl.kernels import trijet_closest

Z_MASS = 91.2


def make_hist(name: str) -> hist.Hist:
    bins, lo, hi, label = BINNING[name]
    return hist.Hist(hist.axis.Regular(bins, lo, hi, name="x", label=label), storage=hist.storage.Int64())


def _f8(x: ak.Array) -> ak.Array:
    return ak.values_astype(x, np.float64)


def p4(coll: ak.Array, **extra: ak.Array) -> ak.Array:
    """float64 PtEtaPhiM Lorentz vectors (coffea vector behaviour) of a collection."""
    fields = {f: _f8(coll[f]) for f in ("pt", "eta", "phi", "mass")}
    return ak.zip({**fields, **extra}, with_name="PtEtaPhiMLorentzVector", behavior=vector.behavior)


def _flat(x: ak.Array) -> np.ndarray:
    return ak.to_numpy(ak.flatten(x, axis=None))


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
        muons = p4(events.Muon, charge=events.Muon.charge)
        a, b = ak.unzip(ak.combinations(muons, 2))
        mass = (a + b).mass
        good = (a.charge != b.charge) & (mass > 60) & (mass < 120)
        return {"q5": ak.to_numpy(events.MET.pt[ak.any(good, axis=1)])}


class Q6(AdlQuery):
    """Trijet closest to the top mass: its pT and the largest b-tag of its jets."""

    query = 6

    def values(self, events: Any) -> dict[str, np.ndarray]:
        jets = events.Jet
        layout = ak.to_layout(jets.pt).to_ListOffsetArray64(True)
        offsets = np.asarray(layout.offsets)
        cols = [_flat(jets[f]) for f in ("pt", "eta", "phi", "mass", "btag")]
        pt, btag, _ = trijet_closest(offsets, *cols)
        return {"q6_pt": pt, "q6_btag": btag}


class Q7(AdlQuery):
    """Scalar pT sum of jets (pT > 30) away from light leptons (pT > 10)."""

    query = 7

    def values(self, events: Any) -> dict[str, np.ndarray]:
        jets = events.Jet[events.Jet.pt > 30]
        leptons = ak.concatenate(
            [events.Muon[events.Muon.pt > 10], events.Electron[events.Electron.pt > 10]], axis=1
        )
        jv, lv = p4(jets), p4(leptons)
        dr = jv[:, :, None].delta_r(lv[:, None, :])
        clean = ak.all(dr >= 0.4, axis=2)
        sumpt = ak.sum(jv.pt[clean], axis=1)
        return {"q7": ak.to_numpy(sumpt[ak.any(clean, axis=1)])}


class Q8(AdlQuery):
    """mT of MET and the leading lepton outside the SFOS pair closest to the Z."""

    query = 8

    def values(self, events: Any) -> dict[str, np.ndarray]:
        mu, el = events.Muon, events.Electron
        leptons = ak.concatenate(
            [
                p4(mu, charge=mu.charge, flavour=ak.zeros_like(mu.charge)),
                p4(el, charge=el.charge, flavour=ak.ones_like(el.charge)),
            ],
            axis=1,
        )
        keep = ak.num(leptons) >= 3
        leptons, met = leptons[keep], events.MET[keep]
        pairs = ak.argcombinations(leptons, 2, fields=["i", "j"])
        a, b = leptons[pairs.i], leptons[pairs.j]
        sfos = (a.flavour == b.flavour) & (a.charge != b.charge)
        best = ak.argmin(ak.mask(abs((a + b).mass - Z_MASS), sfos), axis=1, keepdims=True)
        has_pair = ~ak.is_none(best, axis=1)[:, 0]
        leptons, met = leptons[has_pair], met[has_pair]
        best_pair = ak.drop_none(ak.firsts(pairs[has_pair][best[has_pair]]))
        idx = ak.local_index(leptons)
        rest = leptons[(idx != best_pair.i) & (idx != best_pair.j)]
        lead = ak.firsts(rest[ak.argmax(rest.pt, axis=1, keepdims=True)])
        dphi = lead.phi - _f8(met.phi)
        mt = np.sqrt(2.0 * lead.pt * _f8(met.pt) * (1.0 - np.cos(dphi)))
        return {"q8": ak.to_numpy(ak.drop_none(mt))}


QUERIES: dict[int, type[processor.ProcessorABC]] = {
    cls.query: cls for cls in (Q1, Q2, Q3, Q4, Q5, Q6, Q7, Q8)
}

__all__ = ["HISTOGRAMS", "QUERIES", "AdlQuery", "make_hist", "p4"]
