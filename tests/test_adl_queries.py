"""The ADL processors against the loop-based reference on the real 1000-event
sample: every histogram must agree bin for bin, flow bins included."""

from __future__ import annotations

import math

import hist
import numpy as np
import pytest
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from casa_benchmarks.adl import runner
from casa_benchmarks.adl.binning import BINNING
from casa_benchmarks.adl.kernels import trijet_closest
from casa_benchmarks.adl.queries import HISTOGRAMS, QUERIES, make_hist
from casa_benchmarks.adl.reference import QUERY_FUNCS, read_events, reference_counts
from casa_benchmarks.adl.reference import q6 as reference_q6

pytestmark = pytest.mark.filterwarnings("ignore:Branch Photon_:RuntimeWarning")


@pytest.fixture(scope="module")
def events(sample_root):
    return read_events(str(sample_root))


@pytest.fixture(scope="module")
def reference(events):
    return reference_counts(events)


def run_coffea(path, query: int, chunksize: int = 400) -> dict:
    runner = processor.Runner(executor=processor.IterativeExecutor(status=False), schema=NanoAODSchema,
                              chunksize=chunksize)
    return runner({"sample": [str(path)]}, QUERIES[query](), treename="Events")


@pytest.mark.parametrize("query", range(1, 9))
def test_processor_matches_reference(sample_root, reference, query):
    out = run_coffea(sample_root, query)
    assert set(out) == {*HISTOGRAMS[query], "events"}
    assert out["events"] == 1000
    for name in HISTOGRAMS[query]:
        got = out[name].values(flow=True)
        assert got.sum() > 20, f"{name}: too few entries for a meaningful comparison"
        diff = np.flatnonzero(got != reference[name])
        assert diff.size == 0, f"{name}: bins {diff.tolist()}: ours {got[diff]}, reference {reference[name][diff]}"


@pytest.mark.parametrize("query", range(1, 9))
def test_values_agree_to_float64_precision(sample_root, events, query):
    """Stronger than equal histograms: every filled value agrees to 1e-12
    (a float32 step anywhere would show up as ~1e-7)."""
    from coffea.nanoevents import NanoEventsFactory

    ev = NanoEventsFactory.from_root({str(sample_root): "Events"}, schemaclass=NanoAODSchema,
                                     mode="virtual").events()
    ours = QUERIES[query]().values(ev)
    for name in HISTOGRAMS[query]:
        ref = np.array([v for e in events for n, v in QUERY_FUNCS[query](e) if n == name])
        got = np.asarray(ours[name], dtype=np.float64)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0, err_msg=name)


def test_known_entry_counts(reference):
    """Independent of both implementations: counts read off the sample itself."""
    assert reference["q1"].sum() == 1000
    assert reference["q2"].sum() == 1699  # jets in the sample
    assert reference["q6_pt"].sum() == reference["q6_btag"].sum() == 274  # events with >= 3 jets


def test_comparison_can_fail(sample_root, events):
    """Momenta scaled by 1% must change every histogram: the equality above is not vacuous."""
    scaled = []
    for ev in events:
        ev = dict(ev)
        for k in ("MET_pt", "Jet_pt", "Muon_pt", "Electron_pt", "Jet_mass"):
            ev[k] = [x * 1.01 for x in ev[k]] if isinstance(ev[k], list) else ev[k] * 1.01
        scaled.append(ev)
    ref = reference_counts(scaled)
    for query in range(1, 9):
        out = run_coffea(sample_root, query)
        for name in HISTOGRAMS[query]:
            assert not np.array_equal(out[name].values(flow=True), ref[name]), name


def test_chunking_does_not_change_results(sample_root):
    for query in (2, 6, 8):
        a, b = run_coffea(sample_root, query, 1000), run_coffea(sample_root, query, 137)
        for name in HISTOGRAMS[query]:
            assert np.array_equal(a[name].values(flow=True), b[name].values(flow=True))


def test_histogram_layout():
    assert sorted(QUERIES) == list(range(1, 9))
    assert [n for q in sorted(HISTOGRAMS) for n in HISTOGRAMS[q]] == [
        "q1", "q2", "q3", "q4", "q5", "q6_pt", "q6_btag", "q7", "q8"]
    for query, cls in QUERIES.items():
        assert issubclass(cls, processor.ProcessorABC)
        for name in HISTOGRAMS[query]:
            n, lo, hi, _ = BINNING[name]
            h = make_hist(name)
            assert isinstance(h, hist.Hist) and h.storage_type is hist.storage.Int64
            assert h.axes[0].size == n == 100 and h.axes[0].edges[0] == lo and h.axes[0].edges[-1] == hi


def test_trijet_kernel_against_loops():
    """Random kinematics, 0-12 jets per event plus one event with 70 jets
    (beyond the kernel's initial 64-jet buffer)."""
    rng = np.random.default_rng(11)
    counts = np.append(rng.integers(0, 13, 300), 70)
    n = int(counts.sum())
    cols = [rng.uniform(15, 200, n), rng.uniform(-4.5, 4.5, n), rng.uniform(-math.pi, math.pi, n),
            rng.uniform(1, 30, n), np.where(rng.random(n) < 0.2, -10.0, rng.random(n))]
    cols = [c.astype(np.float32) for c in cols]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    pt, btag, _ = trijet_closest(offsets, *cols)
    expected = []
    for i in range(len(counts)):
        sl = slice(offsets[i], offsets[i + 1])
        ev = {f"Jet_{f}": cols[k][sl].tolist() for k, f in enumerate(("pt", "eta", "phi", "mass", "btag"))}
        expected.extend(v for _, v in reference_q6(ev))
    assert len(expected) == 2 * len(pt) == 2 * int((counts >= 3).sum())
    assert np.array_equal(np.column_stack([pt, btag]).ravel(), np.array(expected))


def test_trijet_ties_keep_the_first_combination():
    # four identical jets: every trijet has exactly the same mass; the first is (0, 1, 2)
    offsets = np.array([0, 4])
    pt = np.full(4, 50, np.float32)
    eta = np.zeros(4, np.float32)
    phi = np.full(4, 0.5, np.float32)
    mass = np.full(4, 10, np.float32)
    btag = np.array([0.1, 0.2, 0.3, 0.9], np.float32)
    _, b, _ = trijet_closest(offsets, pt, eta, phi, mass, btag)
    assert b.tolist() == [np.float32(0.3)]


def test_rdataframe_matches_reference(sample_root, reference):
    """RDataFrame single-thread and implicit-MT, through the CLI's peer runner."""
    pytest.importorskip("ROOT", reason="PyPI package 'root' is not installed")
    rows = runner.run_rdf_peer([str(sample_root)], runner.Settings(list(range(1, 9)), workers=2, chunksize=0))
    assert sorted((r.backend, r.query) for r in rows) == sorted(
        (b, q) for b in ("rdf-st", "rdf-mt") for q in range(1, 9))
    for r in rows:
        assert r.error is None and r.events == 1000, r.error
        for name, counts in r.counts.items():
            assert np.array_equal(counts, reference[name]), f"{r.backend} {name} differs"
