"""A synthetic stand-in for ``Run2012B_SingleMu.root``, one batch at a time.

Vectorised numpy only. Jet, muon and electron multiplicities are drawn from
the full-file distribution (``data/particle-distribution.csv``); shapes are
tuned to the real 1000-event sample and the full-file query results of
adl-facts.md:

* jets: a hard, central component and a soft, forward (pile-up like) one,
  sorted by pT; b-tag -10 for 23% of jets, -1 for 12%, else the sample's
  U-shaped [0, 1] distribution; mass about 0.21 pT.
* muons: a trigger muon (W-like, 24+ GeV) plus soft ones; in a fraction of the
  events with two or more muons the first two come from a Z -> mu mu decay
  (Breit-Wigner mass, boosted), which is what Q5 and Q8 select.
* electrons, taus and photons follow the sample's means and shapes; isolation
  and impact parameters carry the -999 placeholders, ``jetIdx``/``genPartIdx``
  are -1 as in data.
* MET is gamma distributed with parameters per event class (Z, two hard jets,
  other) matching the full-file Q1/Q4/Q5 means and widths.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from casa_benchmarks.adl.rootio import Batch

MUON_MASS = np.float32(0.10565837)
Z_MASS, Z_WIDTH = 91.1876, 2.4952
F4 = np.float32
RUN0 = 193834  # first run of 2012B

# [0, 1] b-tag shape fitted to the real sample: (weight, Beta a, b) + uniform rest
BTAG_LIGHT = (0.55, 1.0, 4.5)
BTAG_HEAVY = (0.22, 15.0, 0.7)

# tuned constants (see module docstring)
HARD_JETS = np.array([0.53, 0.17, 0.16, 0.08, 0.04, 0.02])  # P(D = 0, 1, ...)
# Pareto index of the leading hard jet's pT above 30 GeV (one / several hard jets)
HARD_INDEX_SINGLE = 2.9
HARD_INDEX_MULTI = 1.4
HARD_SHARE = (5.0, 1.0)  # Beta parameters of the other hard jets' share
SOFT_INDEX = 2.4  # truncated Pareto index of soft jet pT in [15, 30)
HARD_ETA_SIGMA = 1.5
SOFT_ETA_MAX = 4.7
SOFT_ETA_POWER = 0.85  # |eta| = max * u**power: < 1 pushes soft jets forward
ETA_MAX = 4.7
Z_FRACTION = 0.13  # of events with >= 2 muons


@cache
def multiplicities() -> dict[str, np.ndarray]:
    """Probabilities of n = 0, 1, ... electrons, jets and muons (full file)."""
    path = Path(__file__).with_name("data") / "particle-distribution.csv"
    rows = [line.split(",") for line in path.read_text().split()[1:]]
    out = {}
    for col, name in ((1, "Electron"), (2, "Jet"), (3, "Muon")):
        size = int(rows[-1][0]) + 1
        counts = np.zeros(size)
        for r in rows:
            if r[col]:
                counts[int(r[0])] = float(r[col])
        out[name] = counts / counts.sum()
    return out


def _draw_counts(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(n), side="right").astype(np.uint32)


def _trunc_normal(rng: np.random.Generator, n: int, sigma: float, limit: float) -> np.ndarray:
    x = rng.normal(0, sigma, n)
    bad = np.abs(x) >= limit
    while bad.any():
        x[bad] = rng.normal(0, sigma, int(bad.sum()))
        bad = np.abs(x) >= limit
    return x


def _phi(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-np.pi, np.pi, n)


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.where(rng.random(n) < 0.5, -1, 1).astype(np.int32)


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return rng.lognormal(np.log(median), sigma, n)


def _placeholder(rng: np.random.Generator, x: np.ndarray, fraction: float) -> np.ndarray:
    return np.where(rng.random(len(x)) < fraction, -999.0, x)


def _event_index(counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def _first_in_event(counts: np.ndarray) -> np.ndarray:
    """For each object, its position inside its event."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def z_decays(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """(pt, eta, phi) of both muons, shape (2, n), for n Z -> mu mu decays
    with both muons inside |eta| < 2.4 and pT > 3 GeV."""
    out = np.empty((3, 2, n))
    todo = np.arange(n)
    while len(todo):
        k = len(todo)
        mass = Z_MASS + 0.5 * Z_WIDTH * np.tan(np.pi * (rng.random(k) - 0.5))
        mass = np.clip(mass, 40.0, 200.0) + rng.normal(0, 1.8, k)
        zpt = rng.gamma(1.3, 7.0, k)
        y = rng.normal(0, 1.1, k)
        zphi = _phi(rng, k)
        mt = np.hypot(mass, zpt)
        zp = np.stack([zpt * np.cos(zphi), zpt * np.sin(zphi), mt * np.sinh(y)])
        ze = mt * np.cosh(y)
        cos_t = rng.uniform(-1, 1, k)
        sin_t = np.sqrt(1 - cos_t**2)
        ph = _phi(rng, k)
        pstar = np.sqrt(np.maximum(mass**2 / 4 - float(MUON_MASS) ** 2, 0))
        d = np.stack([sin_t * np.cos(ph), sin_t * np.sin(ph), cos_t]) * pstar
        beta = zp / ze
        gamma = ze / mass
        ok = np.ones(k, bool)
        for i, sign in enumerate((1.0, -1.0)):
            p = sign * d
            bp = (beta * p).sum(axis=0)
            p_lab = p + beta * (gamma**2 / (gamma + 1) * bp + gamma * mass / 2)
            pt = np.hypot(p_lab[0], p_lab[1])
            eta = np.arcsinh(p_lab[2] / pt)
            out[0, i, todo], out[1, i, todo] = pt, eta
            out[2, i, todo] = np.arctan2(p_lab[1], p_lab[0])
            ok &= (np.abs(eta) < 2.4) & (pt > 3)
        todo = todo[~ok]
    return out[0], out[1], out[2]


def _jets(rng: np.random.Generator, counts: np.ndarray) -> dict[str, np.ndarray]:
    n = int(counts.sum())
    # the first min(nJet, D) jets of an event are hard (pT > 30), the rest soft
    n_hard = np.minimum(counts, _draw_counts(rng, HARD_JETS, len(counts)))
    hard = _first_in_event(counts) < np.repeat(n_hard, counts)
    # hard jets share their event's scale: the leading one sets it, the
    # others take a Beta-distributed fraction of its excess over 30 GeV
    index = np.where(n_hard >= 2, HARD_INDEX_MULTI, HARD_INDEX_SINGLE)
    lead_pt = np.repeat(30.0 * rng.random(len(counts)) ** (-1.0 / index), counts)
    frac = np.where(_first_in_event(counts) == 0, 1.0, rng.beta(*HARD_SHARE, n))
    pt_hard = 30.0 + (lead_pt - 30.0) * frac
    u = rng.random(n)  # truncated Pareto on [15, 30)
    pt_soft = 15.0 * (1 - u * (1 - 2.0**-SOFT_INDEX)) ** (-1.0 / SOFT_INDEX)
    pt = np.minimum(np.where(hard, pt_hard, pt_soft), 3000.0)
    eta = np.where(
        hard,
        _trunc_normal(rng, n, HARD_ETA_SIGMA, ETA_MAX),
        SOFT_ETA_MAX * rng.random(n) ** SOFT_ETA_POWER * _signs(rng, n),
    )
    # NanoAOD order: by pT, descending, within each event
    order = np.lexsort((-pt, _event_index(counts)))
    pt, eta = pt[order], eta[order]
    btag = _btag(rng, n)
    return {
        "pt": pt.astype(F4),
        "eta": eta.astype(F4),
        "phi": _phi(rng, n).astype(F4),
        "mass": (pt * np.clip(rng.normal(0.21, 0.06, n), 0.05, None)).astype(F4),
        "puId": rng.random(n) < 0.9976,
        "btag": btag.astype(F4),
    }


def _btag(rng: np.random.Generator, n: int) -> np.ndarray:
    """-10 (tagger failed) for 23.1%, -1 for 11.7%, else the sample's [0, 1] shape."""
    (w1, a1, b1), (w2, a2, b2) = BTAG_LIGHT, BTAG_HEAVY
    u, v = rng.random(n), rng.random(n)
    shape = np.where(v < w1, rng.beta(a1, b1, n), np.where(v < w1 + w2, rng.beta(a2, b2, n), rng.random(n)))
    return np.where(u < 0.231, -10.0, np.where(u < 0.348, -1.0, shape))


def _muons(rng: np.random.Generator, counts: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    n = int(counts.sum())
    pos = _first_in_event(counts)
    leading = pos == 0
    trigger = leading & (rng.random(n) < 0.8)
    pt = np.where(trigger, 24.0 + rng.gamma(2.2, 7.0, n), 3.0 + rng.gamma(0.9, 7.0, n))
    eta = _trunc_normal(rng, n, 1.3, 2.4)
    phi = _phi(rng, n)
    charge = _signs(rng, n)
    # Z -> mu mu: the first two muons of a fraction of the events with >= 2
    is_z = (counts >= 2) & (rng.random(len(counts)) < Z_FRACTION)
    zev = np.flatnonzero(is_z)
    if len(zev):
        zpt, zeta, zphi = z_decays(rng, len(zev))
        first = (np.cumsum(counts) - counts)[zev]
        q = _signs(rng, len(zev))
        for i in (0, 1):
            idx = first + i
            pt[idx], eta[idx], phi[idx] = zpt[i], zeta[i], zphi[i]
            charge[idx] = q if i == 0 else -q
    no_ip = rng.random(n) < 0.16
    iso03 = np.where(rng.random(n) < 0.3, 0.0, _lognormal(rng, n, 0.12, 1.6))
    iso04 = iso03 * (1 + rng.uniform(0, 0.8, n))
    no_iso = rng.random(n) < 0.178
    fields = {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": np.full(n, MUON_MASS),
        "charge": charge,
        "pfRelIso03_all": np.where(no_iso, -999.0, iso03),
        "pfRelIso04_all": np.where(no_iso, -999.0, iso04),
        "tightId": rng.random(n) < 0.75,
        "softId": rng.random(n) < 0.80,
        "dxy": np.where(no_ip, -999.0, rng.standard_t(2, n) * 0.002),
        "dxyErr": np.where(no_ip, -999.0, _lognormal(rng, n, 0.0014, 0.5)),
        "dz": np.where(no_ip, -999.0, rng.standard_t(2, n) * 0.004),
        "dzErr": np.where(no_ip, -999.0, _lognormal(rng, n, 0.004, 0.6)),
    }
    return fields, is_z


def _electrons(rng: np.random.Generator, counts: np.ndarray) -> dict[str, np.ndarray]:
    n = int(counts.sum())
    hard = rng.random(n) < 0.3
    pt = np.where(hard, 5.0 + rng.gamma(1.6, 14.0, n), 5.0 + rng.exponential(3.0, n))
    return {
        "pt": pt,
        "eta": _trunc_normal(rng, n, 1.3, 2.5),
        "phi": _phi(rng, n),
        "mass": rng.normal(0, 0.01, n),
        "charge": _signs(rng, n),
        "pfRelIso03_all": _placeholder(rng, _lognormal(rng, n, 2.5, 1.2), 0.59),
        "dxy": rng.standard_t(2, n) * 0.01,
        "dxyErr": _lognormal(rng, n, 0.005, 0.9),
        "dz": rng.standard_t(2, n) * 0.02,
        "dzErr": _lognormal(rng, n, 0.005, 0.9),
        "cutBasedId": rng.random(n) < 0.99,
        "pfId": rng.random(n) < 0.41,
    }


def _nested(rng: np.random.Generator, n: int, fractions: tuple[float, ...]) -> list[np.ndarray]:
    u = rng.random(n)
    return [u < f for f in fractions]


def _taus(rng: np.random.Generator, counts: np.ndarray) -> dict[str, np.ndarray]:
    n = int(counts.sum())
    dm = rng.choice(np.array([-1, 0, 1, 2, 10], np.int32), n, p=[0.401, 0.311, 0.162, 0.022, 0.104])
    mass = np.select(
        [dm == -1, dm == 0, dm == 10],
        [rng.gamma(2.0, 2.5, n), np.full(n, 0.1057), rng.normal(1.1, 0.2, n)],
        np.clip(rng.normal(0.8, 0.3, n), 0.2, None),
    )
    wide = rng.random(n) < 0.5
    eta = np.where(wide, rng.uniform(-4.6, 4.6, n), _trunc_normal(rng, n, 1.3, 4.6))
    rel = np.where(rng.random(n) < 0.3, 0.0, rng.exponential(0.5, n))
    vl, lo, me, ti = _nested(rng, n, (0.258, 0.234, 0.194, 0.184))
    el, em, et = _nested(rng, n, (0.598, 0.534, 0.266))
    ml, mm, mt = _nested(rng, n, (0.642, 0.634, 0.634))
    return {
        "pt": 15.0 + rng.gamma(1.1, 13.0, n),
        "eta": eta,
        "phi": _phi(rng, n),
        "mass": np.abs(mass),
        "charge": np.where(dm == -1, 0, _signs(rng, n)).astype(np.int32),
        "decayMode": dm,
        "relIso_all": np.where(dm == -1, np.nan, rel),
        "idDecayMode": (dm >= 0) & (rng.random(n) < 0.93),
        "idIsoRaw": np.where(rng.random(n) < 0.55, 0.0, rng.exponential(20.0, n)),
        "idIsoVLoose": vl, "idIsoLoose": lo, "idIsoMedium": me, "idIsoTight": ti,
        "idAntiEleLoose": el, "idAntiEleMedium": em, "idAntiEleTight": et,
        "idAntiMuLoose": ml, "idAntiMuMedium": mm, "idAntiMuTight": mt,
    }


def _photons(rng: np.random.Generator, counts: np.ndarray) -> dict[str, np.ndarray]:
    n = int(counts.sum())
    return {
        "pt": 9.5 + rng.gamma(0.8, 17.5, n),
        "eta": _trunc_normal(rng, n, 1.35, 2.9),
        "phi": _phi(rng, n),
        "mass": rng.normal(0, 1e-6, n),
        "charge": np.zeros(n, np.int32),
        "pfRelIso03_all": _lognormal(rng, n, 0.27, 1.0),
    }


def _with_indices(fields: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {**fields, "jetIdx": np.full(n, -1, np.int32), "genPartIdx": np.full(n, -1, np.int32)}


def _met(
    rng: np.random.Generator, is_z: np.ndarray, dijet: np.ndarray, npv: np.ndarray, njet: np.ndarray
) -> dict[str, np.ndarray]:
    n = len(is_z)
    shape = np.select([is_z, dijet], [2.04, 2.03], 3.2)
    scale = np.select([is_z, dijet], [8.5, 14.7], 9.56)
    pt = rng.gamma(shape, scale)
    sumet = np.maximum(225.0 + 30.0 * npv + 25.0 * njet + rng.normal(0, 120, n), 100.0)
    cxx = 0.31 * sumet * rng.gamma(8, 1 / 8, n)
    cyy = 0.31 * sumet * rng.gamma(8, 1 / 8, n)
    return {
        "MET_pt": pt,
        "MET_phi": _phi(rng, n),
        "MET_sumet": sumet,
        "MET_significance": pt**2 / (0.5 * (cxx + cyy)) * rng.gamma(6, 1 / 6, n),
        "MET_CovXX": cxx,
        "MET_CovXY": rng.normal(0, 0.07, n) * sumet,
        "MET_CovYY": cyy,
    }


def make_batch(rng: np.random.Generator, n: int, first: int) -> Batch:
    """``n`` events; ``first`` is the global index of the first one."""
    probs = multiplicities()
    n_mu = _draw_counts(rng, probs["Muon"], n)
    n_el = _draw_counts(rng, probs["Electron"], n)
    n_jet = _draw_counts(rng, probs["Jet"], n)
    n_tau = rng.negative_binomial(2.0, 2.0 / 4.46, n).astype(np.uint32)
    n_pho = rng.negative_binomial(1.0, 1.0 / 1.434, n).astype(np.uint32)
    npv = np.maximum(rng.negative_binomial(25.4, 25.4 / 36.1, n), 1).astype(np.int32)

    muons, is_z = _muons(rng, n_mu)
    jets = _jets(rng, n_jet)
    dijet = np.bincount(_event_index(n_jet)[jets["pt"] > 40], minlength=n) >= 2

    index = first + np.arange(n, dtype=np.int64)
    lead_pt = np.zeros(n)
    lead_eta = np.zeros(n)
    has_mu = n_mu > 0
    first_mu = (np.cumsum(n_mu) - n_mu)[has_mu]
    lead_pt[has_mu] = muons["pt"][first_mu]
    lead_eta[has_mu] = muons["eta"][first_mu]
    iso_mu24 = (lead_pt > 24) & (rng.random(n) < 0.85)

    batch: dict = {
        "run": (RUN0 + index // 600_000).astype(np.int32),
        "luminosityBlock": (1 + (index // 1_500) % 2_000).astype(np.uint32),
        "event": (1 + index).astype(np.uint64),
        "HLT_IsoMu24_eta2p1": iso_mu24 & (np.abs(lead_eta) < 2.1),
        "HLT_IsoMu24": iso_mu24,
        "HLT_IsoMu17_eta2p1_LooseIsoPFTau20": rng.random(n) < 0.139,
        "PV_npvs": npv,
        "PV_x": rng.normal(0.0722, 0.0025, n),
        "PV_y": rng.normal(0.0627, 0.0022, n),
        "PV_z": rng.normal(-0.3, 5.1, n),
        "Muon": (n_mu, _with_indices(muons, int(n_mu.sum()))),
        "Electron": (n_el, _with_indices(_electrons(rng, n_el), int(n_el.sum()))),
        "Tau": (n_tau, _with_indices(_taus(rng, n_tau), int(n_tau.sum()))),
        "Photon": (n_pho, _with_indices(_photons(rng, n_pho), int(n_pho.sum()))),
        **_met(rng, is_z, dijet, npv, n_jet),
        "Jet": (n_jet, jets),
    }
    return batch
