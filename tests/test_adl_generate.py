"""The synthetic ADL dataset: schema equal to the real sample's, deterministic,
distributions close to the full-file figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from casa_benchmarks.adl.generate import generate
from casa_benchmarks.adl.schema import branch_dtypes
from casa_benchmarks.adl.synth import multiplicities

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("gen")
    return generate(out, 30_000, files=2, seed=7, batch=10_000).files


@pytest.fixture(scope="module")
def arrays(dataset) -> ak.Array:
    return ak.concatenate([uproot.open(f)["Events"].arrays() for f in dataset])


def _layout(path) -> dict[str, tuple[str, str]]:
    tree = uproot.open(path)["Events"]
    return {b.name: (b.typename, str(b.interpretation)) for b in tree.branches}


def test_schema_equals_real_sample(dataset, sample_root):
    real = _layout(sample_root)
    assert len(real) == 86
    assert list(real) == list(branch_dtypes())  # names and order of the real file
    for f in dataset:
        assert _layout(f) == real  # names, order, C++ types (uint32 counters), jaggedness


def test_counters_and_event_ids(arrays):
    for coll in ("Muon", "Electron", "Tau", "Photon", "Jet"):
        assert arrays[f"n{coll}"].type.content.primitive == "uint32"
        assert np.array_equal(ak.to_numpy(arrays[f"n{coll}"]), ak.to_numpy(ak.num(arrays[f"{coll}_pt"])))
    ids = ak.to_numpy(arrays.event)
    assert ids.dtype == np.uint64 and np.all(np.diff(ids.astype(np.int64)) == 1)  # unique across files


def test_deterministic(dataset, tmp_path):
    again = generate(tmp_path, 30_000, files=2, seed=7, batch=10_000).files
    for a, b in zip(dataset, again):
        ta, tb = uproot.open(a)["Events"].arrays(), uproot.open(b)["Events"].arrays()
        for field in ta.fields:
            assert ak.array_equal(ta[field], tb[field], equal_nan=True), field
    other = generate(tmp_path / "other", 30_000, files=2, seed=8, batch=10_000).files
    assert not ak.array_equal(uproot.open(other[0])["Events"]["Jet_pt"].array(),
                              uproot.open(dataset[0])["Events"]["Jet_pt"].array())



def test_distributions_roughly_right(arrays):
    n = len(arrays)
    probs = multiplicities()
    for coll, mean in (("Jet", 3.20), ("Muon", 1.39), ("Electron", 0.215)):
        expected = float((np.arange(len(probs[coll])) * probs[coll]).sum())
        assert expected == pytest.approx(mean, abs=0.01)
        assert float(ak.mean(arrays[f"n{coll}"])) == pytest.approx(mean, rel=0.05), coll
    assert float(np.mean(ak.to_numpy(arrays.nJet) == 0)) == pytest.approx(0.231, abs=0.01)
    assert float(np.mean(ak.to_numpy(arrays.nMuon) == 1)) == pytest.approx(0.706, abs=0.01)
    assert float(ak.mean(arrays.nTau)) == pytest.approx(2.46, rel=0.05)
    assert float(ak.mean(arrays.nPhoton)) == pytest.approx(0.43, rel=0.07)
    jet_eta = ak.to_numpy(ak.flatten(arrays.Jet_eta))
    assert np.mean(np.abs(jet_eta) < 1) == pytest.approx(0.231, abs=0.02)
    btag = ak.to_numpy(ak.flatten(arrays.Jet_btag))
    assert np.mean(btag == -10) == pytest.approx(0.231, abs=0.01)
    assert np.all((btag == -10) | (btag == -1) | ((btag >= 0) & (btag <= 1)))
    assert np.all(ak.to_numpy(ak.flatten(arrays.Muon_mass)) == np.float32(0.10565837))
    assert np.all(ak.to_numpy(ak.flatten(arrays.Muon_jetIdx)) == -1)
    iso = ak.to_numpy(ak.flatten(arrays.Muon_pfRelIso03_all))
    assert 0.1 < np.mean(iso == -999) < 0.25
    assert np.median(ak.to_numpy(ak.flatten(arrays.Muon_pt))) == pytest.approx(29, rel=0.15)
    assert np.median(ak.to_numpy(ak.flatten(arrays.Electron_pt))) == pytest.approx(9.3, rel=0.15)
    assert ak.all(arrays.Jet_pt[:, :-1] >= arrays.Jet_pt[:, 1:])  # pT ordered, as in NanoAOD
    assert float(ak.mean(arrays.MET_pt)) == pytest.approx(30.0, rel=0.05)
    assert float(ak.mean(arrays.PV_npvs)) == pytest.approx(10.7, rel=0.05)
    assert n == 30_000


def test_query_fractions_close_to_full_file(dataset):
    """Selected fractions of Q4, Q5, Q7, Q8 (events) near the full-file ones."""
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    from casa_benchmarks.adl.queries import QUERIES

    ev = NanoEventsFactory.from_root({dataset[0]: "Events"}, schemaclass=NanoAODSchema, mode="virtual").events()
    n = len(ev)
    expected = {4: 0.1247, 5: 0.0556, 7: 0.3546, 8: 0.0936}
    for q, frac in expected.items():
        (values,) = QUERIES[q]().values(ev).values()
        assert len(values) / n == pytest.approx(frac, rel=0.25), f"Q{q}"


def test_cli_generate_json(tmp_path):
    out = tmp_path / "json"
    proc = subprocess.run(
        [sys.executable, "-m", "casa_benchmarks.adl", "generate", "--events", "5000", "--files", "2", "--seed", "3",
         "--out", str(tmp_path / "data"), "--json", str(out), "--compression", "zlib"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["events"] == 5000 and len(doc["files"]) == 2 and doc["compression"] == "zlib"
    assert doc["events_per_minute"] > 0
    assert sum(uproot.open(f)["Events"].num_entries for f in doc["files"]) == 5000
