"""The 86-branch flat NanoAOD-like schema of ``Run2012B_SingleMu.root``.

Branch order and dtypes follow the real file (see adl-facts.md). Jagged
collections are written as ``<Coll>_<field>`` with a ``n<Coll>`` uint32 counter.
"""

from __future__ import annotations

import numpy as np

EVENT: dict[str, str] = {
    "run": "int32",
    "luminosityBlock": "uint32",
    "event": "uint64",
    "HLT_IsoMu24_eta2p1": "bool",
    "HLT_IsoMu24": "bool",
    "HLT_IsoMu17_eta2p1_LooseIsoPFTau20": "bool",
    "PV_npvs": "int32",
    "PV_x": "float32",
    "PV_y": "float32",
    "PV_z": "float32",
}

_P4 = {"pt": "float32", "eta": "float32", "phi": "float32", "mass": "float32"}
_IP = {"dxy": "float32", "dxyErr": "float32", "dz": "float32", "dzErr": "float32"}
_IDX = {"jetIdx": "int32", "genPartIdx": "int32"}

# collection -> {field: dtype}, in file order
COLLECTIONS: dict[str, dict[str, str]] = {
    "Muon": {
        **_P4,
        "charge": "int32",
        "pfRelIso03_all": "float32",
        "pfRelIso04_all": "float32",
        "tightId": "bool",
        "softId": "bool",
        **_IP,
        **_IDX,
    },
    "Electron": {
        **_P4,
        "charge": "int32",
        "pfRelIso03_all": "float32",
        **_IP,
        "cutBasedId": "bool",
        "pfId": "bool",
        **_IDX,
    },
    "Tau": {
        **_P4,
        "charge": "int32",
        "decayMode": "int32",
        "relIso_all": "float32",
        **_IDX,
        "idDecayMode": "bool",
        "idIsoRaw": "float32",
        **{f"idIso{w}": "bool" for w in ("VLoose", "Loose", "Medium", "Tight")},
        **{f"idAntiEle{w}": "bool" for w in ("Loose", "Medium", "Tight")},
        **{f"idAntiMu{w}": "bool" for w in ("Loose", "Medium", "Tight")},
    },
    "Photon": {**_P4, "charge": "int32", "pfRelIso03_all": "float32", **_IDX},
    "Jet": {**_P4, "puId": "bool", "btag": "float32"},
}

MET: dict[str, str] = {
    f"MET_{f}": "float32"
    for f in ("pt", "phi", "sumet", "significance", "CovXX", "CovXY", "CovYY")
}

# order of the top-level groups in the file (Jet comes after MET)
LAYOUT: tuple[str, ...] = ("event", "Muon", "Electron", "Tau", "Photon", "met", "Jet")


def branch_dtypes() -> dict[str, np.dtype]:
    """All 86 branch names -> dtype, in file order (counters before their items)."""
    out: dict[str, np.dtype] = {}
    for group in LAYOUT:
        if group == "event":
            out.update({k: np.dtype(v) for k, v in EVENT.items()})
        elif group == "met":
            out.update({k: np.dtype(v) for k, v in MET.items()})
        else:
            out[f"n{group}"] = np.dtype("uint32")
            out.update(
                {f"{group}_{f}": np.dtype(t) for f, t in COLLECTIONS[group].items()}
            )
    return out
