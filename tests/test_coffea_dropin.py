"""A drop-in for coffea's executors, on every backend: exception types, results in the user's terms,
use_result_type, savemetrics, plain callables, parquet and RNTuple input, maxchunks, align_clusters
and coffea's per-chunk checkpointer.

One engine per backend is held for the whole module (a module-scoped parametrised fixture, so
pytest runs one backend's tests together). The input: the real 1000-event sample, cut to a few
columns and written as a TTree in 4 clusters, as an RNTuple and as parquet.
"""

from __future__ import annotations

import pickle
import traceback
from pathlib import Path

import awkward as ak
import cloudpickle
import numpy as np
import pytest
import uproot
from analysis import require_engine
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from coffea.processor import Err, Ok
from coffea.processor.executor import UprootMissTreeError
from conftest import SAMPLE_PARQUET

import casa_executors
from casa_executors import Driver, RemoteError

cloudpickle.register_pickle_by_value(__import__(__name__))  # workers need not import this module

CLUSTER = 250  # entries per cluster (and per chunk) of the TTree


# -- processors and exceptions (module level: the driver can import their types) -------------------------
def count(events) -> dict:
    """A plain callable as the processor."""
    return {"n": len(events), "nmuons": int(ak.sum(ak.num(events.Muon))),
            "starts": processor.set_accumulator({events.metadata["entrystart"]})}


class Counting(processor.ProcessorABC):
    """Fails in chunks starting at ``bad``, with ``error(start)``; postprocess marks the output."""

    def __init__(self, bad: tuple[int, ...] = (), error=None) -> None:
        self.bad, self.error = bad, error

    def process(self, events):
        start = events.metadata["entrystart"]
        if start in self.bad:
            raise self.error(start)
        return count(events)

    def postprocess(self, accumulator):
        accumulator["post"] = True
        return accumulator


class TwoArgError(Exception):
    """Cannot be unpickled from its args (two required arguments, one in args)."""

    def __init__(self, what: str, where: int) -> None:
        super().__init__(f"{what} at {where}")


def zero_division(start: int) -> BaseException:
    return ZeroDivisionError(f"planted at {start}")


def os_error(start: int) -> BaseException:
    return ConnectionResetError(f"planted at {start}")


def runtime_error(start: int) -> BaseException:
    return RuntimeError(f"planted at {start}")


def two_arg_error(start: int) -> BaseException:
    return TwoArgError("planted", start)


# -- inputs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    events = ak.from_parquet(SAMPLE_PARQUET, columns=["run", "luminosityBlock", "event", "nMuon", "Muon_pt",
                                                      "Muon_eta", "Muon_phi", "Muon_mass", "Muon_charge", "MET_pt"])
    flat = {name: events[name] for name in events.fields}
    d = tmp_path_factory.mktemp("dropin")
    out = {"ttree": d / "events.root", "rntuple": d / "events_rntuple.root", "parquet": d / "events.parquet"}
    muon = ak.zip({f: events[f"Muon_{f}"] for f in ("pt", "eta", "phi", "mass", "charge")})
    with uproot.recreate(out["ttree"]) as f:  # one extend per cluster
        for start in range(0, len(events), CLUSTER):
            part = {name: events[name][start:start + CLUSTER] for name in ("run", "luminosityBlock", "event",
                                                                           "MET_pt")}
            part["Muon"] = muon[start:start + CLUSTER]
            if start == 0:
                f["Events"] = part
            else:
                f["Events"].extend(part)
    with uproot.recreate(out["rntuple"]) as f:
        f.mkrntuple("Events", ak.zip(flat, depth_limit=1))
    ak.to_parquet(ak.zip(flat, depth_limit=1), out["parquet"])
    return out


@pytest.fixture(scope="module")
def expected(inputs) -> dict:
    events = ak.from_parquet(SAMPLE_PARQUET, columns=["nMuon"])
    per_chunk = {s: int(ak.sum(events.nMuon[s:s + CLUSTER])) for s in range(0, 1000, CLUSTER)}
    return {"n": 1000, "nmuons": sum(per_chunk.values()), "per_chunk": per_chunk}


@pytest.fixture(scope="module", params=casa_executors.BACKENDS)
def backend(request):
    """One engine per backend, held for all of that backend's tests."""
    name = request.param
    require_engine(name)
    ex = casa_executors.create(name, status=False, **({} if name == "iterative" else {"workers": 2}))
    with ex:
        yield ex.backend


def executor(backend, **options) -> Driver:
    return Driver(backend=backend, status=False, **options)


def runner(backend, retries: int = 0, driver: dict | None = None, **options) -> processor.Runner:
    options.setdefault("chunksize", CLUSTER)
    options.setdefault("metadata_cache", {})
    return processor.Runner(executor=executor(backend, retries=retries, **(driver or {})),
                            schema=NanoAODSchema, **options)


def fileset(path: Path) -> dict:
    return {"SingleMu": [str(path)]}


def plain(out: dict) -> dict:
    return {k: v for k, v in out.items() if k not in ("starts", "post")}


# -- results in the user's terms ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ttree", "rntuple", "parquet"])
def test_plain_callable_on_ttree_rntuple_and_parquet(backend, inputs, expected, kind):
    run = runner(backend, format="parquet" if kind == "parquet" else "root")
    out = run(fileset(inputs[kind]), count, treename="Events")
    assert plain(out) == {"n": 1000, "nmuons": expected["nmuons"]}
    assert out["starts"] == {0, 250, 500, 750}
    assert run.executor.report.summary()["processed"] == 4


def test_maxchunks_and_align_clusters(backend, inputs, expected):
    out = runner(backend, maxchunks=2)(fileset(inputs["ttree"]), count, treename="Events")
    assert out["starts"] == {0, 250} and out["n"] == 500
    assert out["nmuons"] == expected["per_chunk"][0] + expected["per_chunk"][250]
    # chunks of 300 entries on clusters of 250: aligned chunks end on cluster boundaries
    run = runner(backend, chunksize=300, align_clusters=True)
    out = run(fileset(inputs["ttree"]), count, treename="Events")
    assert out["starts"] == {0, 500} and plain(out) == {"n": 1000, "nmuons": expected["nmuons"]}
    assert [(r.entrystart, r.entrystop) for r in run.executor.report.rows()] == [(0, 500), (500, 1000)]


def test_savemetrics_gives_coffeas_metrics_plus_ours(backend, inputs, expected):
    out, metrics = runner(backend, savemetrics=True)(fileset(inputs["ttree"]), Counting(), treename="Events")
    assert plain(out) == {"n": 1000, "nmuons": expected["nmuons"]}
    assert metrics["chunks"] == 4 and metrics["entries"] == 1000 and metrics["bytesread"] > 0
    assert "processtime" in metrics and any(c.startswith("Muon") for c in metrics["columns"])
    ours = metrics["casa_executors"]
    # coffea's per-chunk bytesread, summed, is what our report metered to the chunks (kept TTrees and
    # read-ahead included)
    assert metrics["bytesread"] == ours["bytes_read"], (metrics["bytesread"], ours)
    assert ours["backend"] == backend.name and ours["events"] == 1000 and ours["attempts"] == 4


def test_coffeas_per_chunk_checkpointer(backend, inputs, expected, tmp_path):
    checkpointer = processor.SimpleCheckpointer(str(tmp_path / "checkpoints"))
    first = runner(backend, checkpointer=checkpointer)(fileset(inputs["ttree"]), Counting(), treename="Events")
    assert len(list((tmp_path / "checkpoints").rglob("*.coffea"))) == 4
    # every chunk now comes from its checkpoint: a processor that fails everywhere is never called
    again = runner(backend, checkpointer=checkpointer)(
        fileset(inputs["ttree"]), Counting(bad=(0, 250, 500, 750), error=zero_division), treename="Events")
    assert again == first and plain(again) == {"n": 1000, "nmuons": expected["nmuons"]}


# -- exceptions keep their type -------------------------------------------------------------------------
def test_processor_error_keeps_its_type_with_chunk_attempts_and_partial_output(backend, inputs, expected):
    run = runner(backend, retries=1)
    with pytest.raises(Exception) as caught:
        run(fileset(inputs["ttree"]), Counting(bad=(500,), error=zero_division), treename="Events")
    err = caught.value  # what coffea's own executors raise: its Exception, caused by the processor's
    assert type(err) is Exception and type(err.__cause__) is ZeroDivisionError
    assert str(err.__cause__) == "planted at 500"
    assert err.item.entrystart == 500 and err.attempts == 2 and err.phase == "processing"
    assert err.report is run.executor.report
    notes = "\n".join(err.__notes__)
    assert "entries 500-750" in notes and "2 attempt(s)" in notes and backend.name in notes
    assert "ZeroDivisionError: planted at 500" in notes
    # the processor's own (post-processed) output of the chunks that did complete, as Runner returns it
    done = {r.entrystart for r in run.executor.report.rows() if r.status == "ok"}
    assert err.partial_output["post"] is True and err.partial_output["starts"] == done and 500 not in done
    assert err.partial_output["nmuons"] == sum(expected["per_chunk"][s] for s in done)
    failed = run.executor.report.failures()
    assert [(r.entrystart, r.attempts) for r in failed if r.attempts] == [(500, 2)]  # others: not run
    copy = pickle.loads(pickle.dumps(err))  # (pickle keeps no exception's __cause__)
    assert type(copy) is type(err) and copy.attempts == 2 and copy.item == err.item and copy.args == err.args


def test_missing_file_and_tree_raise_what_coffea_raises(backend, inputs, tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        runner(backend, retries=1)(fileset(tmp_path / "missing.root"), Counting(), treename="Events")
    err = caught.value
    assert type(err) is FileNotFoundError and err.phase == "preprocessing" and err.attempts == 2
    assert err.partial_output is None and str(tmp_path / "missing.root") in str(err)
    assert err.filename == str(tmp_path / "missing.root") and err.errno == 2
    with pytest.raises(UprootMissTreeError) as caught:
        runner(backend)(fileset(inputs["ttree"]), Counting(), treename="NotEvents")
    assert type(caught.value) is UprootMissTreeError  # coffea's, caused by uproot's
    cause = caught.value.__cause__
    assert type(cause) is uproot.exceptions.KeyInFileError and cause.key == "NotEvents"


def test_exceptions_that_do_not_unpickle_keep_their_type(backend, inputs):
    with pytest.raises(Exception) as caught:
        runner(backend)(fileset(inputs["ttree"]), Counting(bad=(250,), error=two_arg_error), treename="Events")
    err = caught.value
    assert type(err) is Exception and "planted at 250" in "\n".join([str(err), *err.__notes__])
    assert type(err.__cause__) is TwoArgError and err.__cause__.args == ("planted at 250",)  # rebuilt, no __init__
    # the worker's traceback came with it, down to the processor
    assert "process" in [f.name for f in traceback.extract_tb(err.__cause__.__traceback__)]

    class LocalError(Exception):  # no type the driver could import: a RemoteError naming it
        pass

    def local_error(start):
        return LocalError(f"local at {start}")

    with pytest.raises(Exception) as caught:
        runner(backend)(fileset(inputs["ttree"]), Counting(bad=(250,), error=local_error), treename="Events")
    assert type(caught.value) is Exception and caught.value.attempts == 1
    cause = caught.value.__cause__
    if backend.in_process:
        assert type(cause) is LocalError
    else:
        assert type(cause) is RemoteError and cause.type_name == "LocalError"
        assert str(cause) == "LocalError: local at 250"
        assert "process" in [f.name for f in traceback.extract_tb(cause.__traceback__)]


# -- use_result_type: coffea's Ok / Err ---------------------------------------------------------------------
def test_use_result_type_ok_and_err_like_coffea(backend, inputs, expected, tmp_path):
    good = runner(backend, use_result_type=True, skipbadfiles=True)
    result = good(fileset(inputs["ttree"]), Counting(), treename="Events")
    assert isinstance(result, Ok) and plain(result.unwrap()) == {"n": 1000, "nmuons": expected["nmuons"]}
    # a file skipbadfiles covers, in preprocessing: Err, as coffea's executors give
    result = runner(backend, use_result_type=True, skipbadfiles=True)(
        fileset(tmp_path / "missing.root"), Counting(), treename="Events")
    assert isinstance(result, Err) and type(result.exception) is FileNotFoundError
    assert result.exception.phase == "preprocessing" and result.exception.attempts == 1
    # a chunk skipbadfiles covers, in processing: Err with the output of all the other chunks
    result = runner(backend, use_result_type=True, skipbadfiles=True)(
        fileset(inputs["ttree"]), Counting(bad=(500,), error=os_error), treename="Events")
    assert isinstance(result, Err) and type(result.exception.__cause__) is ConnectionResetError  # coffea's wrapping
    assert result.value["starts"] == {0, 250, 750} and result.value["post"] is True
    # a failure skipbadfiles does not cover propagates (with the partial output), not Err
    with pytest.raises(Exception) as caught:
        runner(backend, use_result_type=True, skipbadfiles=(OSError,))(
            fileset(inputs["ttree"]), Counting(bad=(500,), error=runtime_error), treename="Events")
    assert type(caught.value) is Exception and type(caught.value.__cause__) is RuntimeError
    assert 500 not in caught.value.partial_output["starts"]


def test_recoverable_keeps_going_and_reports(backend, inputs, expected):
    run = runner(backend, driver={"recoverable": True})
    with pytest.warns(UserWarning, match="1 of 4 processing items failed"):
        out = run(fileset(inputs["ttree"]), Counting(bad=(250,), error=zero_division), treename="Events")
    assert out["starts"] == {0, 500, 750}
    assert out["nmuons"] == expected["nmuons"] - expected["per_chunk"][250]
    assert [r.entrystart for r in run.executor.report.failed_items()] == [250]
    assert np.all([r.status == "ok" for r in run.executor.report.rows() if r.entrystart != 250])
