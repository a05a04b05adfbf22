"""Loop-based reference implementation of the eight ADL queries.

Independent of ``queries.py``: plain Python loops over events and ``math``
only, reading the file with uproot into Python lists. Float32 branch values
become Python floats exactly; everything derived is float64, with the same
conventions as the columnar version (see its docstring): four-momenta from
(pt, eta, phi, mass) via px = pt cos(phi), py = pt sin(phi), pz = pt sinh(eta),
E = sqrt(p^2 + m^2); first candidate wins ties; Q7 skips events without a
clean jet. Bin indices follow boost-histogram's regular-axis arithmetic, so
counts include the under/overflow bins at index 0 and n + 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import uproot

from casa_benchmarks.adl.binning import BINNING, HISTOGRAMS

Event = dict[str, list]


def bin_index(x: float, name: str) -> int:
    n, lo, hi, _ = BINNING[name]
    z = (x - lo) / (hi - lo)
    if z < 1:
        return int(z * n) + 1 if z >= 0 else 0
    return n + 1  # overflow, also NaN


def _four(pt: float, eta: float, phi: float, m: float) -> tuple[float, float, float, float]:
    px = pt * math.cos(phi)
    py = pt * math.sin(phi)
    pz = pt * math.sinh(eta)
    return px, py, pz, math.sqrt(px * px + py * py + pz * pz + m * m)


def _mass(*vs: tuple[float, float, float, float]) -> float:
    x = y = z = e = 0.0
    first = True
    for v in vs:
        if first:
            x, y, z, e = v
            first = False
        else:
            x, y, z, e = x + v[0], y + v[1], z + v[2], e + v[3]
    m2 = e * e - x * x - y * y - z * z
    return math.sqrt(m2) if m2 > 0 else 0.0


def _dphi(a: float, b: float) -> float:
    d = a - b
    while d > math.pi:
        d -= 2 * math.pi
    while d <= -math.pi:
        d += 2 * math.pi
    return d


def q1(ev: Event) -> Iterable[tuple[str, float]]:
    yield "q1", ev["MET_pt"]


def q2(ev: Event) -> Iterable[tuple[str, float]]:
    for pt in ev["Jet_pt"]:
        yield "q2", pt


def q3(ev: Event) -> Iterable[tuple[str, float]]:
    for pt, eta in zip(ev["Jet_pt"], ev["Jet_eta"]):
        if abs(eta) < 1:
            yield "q3", pt


def q4(ev: Event) -> Iterable[tuple[str, float]]:
    if sum(1 for pt in ev["Jet_pt"] if pt > 40) >= 2:
        yield "q4", ev["MET_pt"]


def q5(ev: Event) -> Iterable[tuple[str, float]]:
    n = len(ev["Muon_pt"])
    mus = [
        _four(ev["Muon_pt"][i], ev["Muon_eta"][i], ev["Muon_phi"][i], ev["Muon_mass"][i])
        for i in range(n)
    ]
    for i in range(n):
        for j in range(i + 1, n):
            if ev["Muon_charge"][i] != ev["Muon_charge"][j]:
                m = _mass(mus[i], mus[j])
                if 60 < m < 120:
                    yield "q5", ev["MET_pt"]
                    return


def q6(ev: Event) -> Iterable[tuple[str, float]]:
    n = len(ev["Jet_pt"])
    if n < 3:
        return
    jets = [_four(ev["Jet_pt"][i], ev["Jet_eta"][i], ev["Jet_phi"][i], ev["Jet_mass"][i]) for i in range(n)]
    best, chosen = math.inf, (0, 1, 2)
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(j + 1, n):
                d = abs(_mass(jets[i], jets[j], jets[k]) - 172.5)
                if d < best:
                    best, chosen = d, (i, j, k)
    i, j, k = chosen
    px = jets[i][0] + jets[j][0] + jets[k][0]
    py = jets[i][1] + jets[j][1] + jets[k][1]
    yield "q6_pt", math.sqrt(px * px + py * py)
    yield "q6_btag", max(ev["Jet_btag"][i], ev["Jet_btag"][j], ev["Jet_btag"][k])


def q7(ev: Event) -> Iterable[tuple[str, float]]:
    leptons = []
    for coll in ("Muon", "Electron"):
        for pt, eta, phi in zip(ev[f"{coll}_pt"], ev[f"{coll}_eta"], ev[f"{coll}_phi"]):
            if pt > 10:
                leptons.append((eta, phi))
    total, found = 0.0, False
    for pt, eta, phi in zip(ev["Jet_pt"], ev["Jet_eta"], ev["Jet_phi"]):
        if pt <= 30:
            continue
        if all(math.sqrt((eta - le) ** 2 + _dphi(phi, lp) ** 2) >= 0.4 for le, lp in leptons):
            total += pt
            found = True
    if found:
        yield "q7", total


def q8(ev: Event) -> Iterable[tuple[str, float]]:
    leps = []  # (p4, pt, phi, charge, flavour): muons first, then electrons
    for flavour, coll in enumerate(("Muon", "Electron")):
        for i in range(len(ev[f"{coll}_pt"])):
            pt, eta, phi = ev[f"{coll}_pt"][i], ev[f"{coll}_eta"][i], ev[f"{coll}_phi"][i]
            leps.append((_four(pt, eta, phi, ev[f"{coll}_mass"][i]), pt, phi, ev[f"{coll}_charge"][i], flavour))
    n = len(leps)
    if n < 3:
        return
    best, pair = math.inf, None
    for i in range(n):
        for j in range(i + 1, n):
            if leps[i][4] == leps[j][4] and leps[i][3] != leps[j][3]:
                d = abs(_mass(leps[i][0], leps[j][0]) - 91.2)
                if d < best:
                    best, pair = d, (i, j)
    if pair is None:
        return
    lead = None
    for i in range(n):
        if i not in pair and (lead is None or leps[i][1] > leps[lead][1]):
            lead = i
    pt, phi = leps[lead][1], leps[lead][2]
    yield "q8", math.sqrt(2.0 * pt * ev["MET_pt"] * (1.0 - math.cos(phi - ev["MET_phi"])))


QUERY_FUNCS: dict[int, Callable[[Event], Iterable[tuple[str, float]]]] = {
    1: q1, 2: q2, 3: q3, 4: q4, 5: q5, 6: q6, 7: q7, 8: q8,
}

BRANCHES = (
    "MET_pt", "MET_phi",
    *(f"Jet_{f}" for f in ("pt", "eta", "phi", "mass", "btag")),
    *(f"Muon_{f}" for f in ("pt", "eta", "phi", "mass", "charge")),
    *(f"Electron_{f}" for f in ("pt", "eta", "phi", "mass", "charge")),
)


def read_events(path: str, tree: str = "Events") -> list[Event]:
    """Events of ``path`` as dicts of Python scalars / lists."""
    arrays = uproot.open(path)[tree].arrays(list(BRANCHES), library="np")
    columns = {k: [v.tolist() for v in arr] if arr.dtype == object else arr.tolist() for k, arr in arrays.items()}
    return [{k: columns[k][i] for k in BRANCHES} for i in range(len(columns["MET_pt"]))]


def reference_counts(events: list[Event], queries: Iterable[int] = range(1, 9)) -> dict[str, np.ndarray]:
    """Counts per histogram, flow bins included (length n + 2)."""
    out: dict[str, np.ndarray] = {}
    for q in queries:
        func = QUERY_FUNCS[q]
        counts = {name: [0] * (BINNING[name][0] + 2) for name in HISTOGRAMS[q]}
        for ev in events:
            for name, value in func(ev):
                counts[name][bin_index(value, name)] += 1
        for name in counts:
            out[name] = np.array(counts[name], dtype=np.int64)
    return out
