"""NanoEvents' base form and a tree's type names, built once per tree in a process (casa_executors.nanoforms).

coffea derives a chunk's form from every branch of the tree, for every chunk; the memo keeps it by file
UUID, tree and options. These tests check that a tree's branches are walked once for many chunks, that
each chunk gets a copy of its own, that another file (another UUID) gets its own form, and that a
run's output is unchanged; the same for the type names coffea asks the tree for.
"""

from __future__ import annotations

import shutil

import uproot
from analysis import run, same
from coffea.nanoevents.mapping.uproot import UprootSourceMapping

import casa_executors
from casa_executors import internals, nanoforms


def _counting(tree, calls: list[int], method: str = "iteritems"):
    """``tree`` with its ``method`` counting its calls into ``calls`` (the walk our caches are to spare)."""
    walk = getattr(tree, method)

    def counted(*args, **kwargs):
        calls.append(1)
        return walk(*args, **kwargs)

    setattr(tree, method, counted)
    return tree


def test_a_trees_form_is_built_once_and_each_call_gets_its_own_copy(sample_files, monkeypatch):
    # forms of earlier runs in this process: the sample's copies share its UUID, so one of them may be kept
    monkeypatch.setattr(nanoforms, "_forms", type(nanoforms._forms)())
    calls: list[int] = []
    with internals.allowed(), uproot.open(sample_files[0]) as f:  # as in a task of ours
        tree = _counting(f["Events"], calls)
        first = UprootSourceMapping._extract_base_form(tree)
        first["typenames"] = {"coffea": "adds this to its own copy"}
        first["contents"][0]["parameters"]["mutated"] = True
        second = UprootSourceMapping._extract_base_form(tree)
    assert calls == [1], "the branches were walked again for the same tree"
    assert "typenames" not in second and "mutated" not in second["contents"][0]["parameters"]
    assert second["fields"] == first["fields"] and len(second["fields"]) > 50


def test_another_file_gets_its_own_form(sample_files, tmp_path):
    """A rewritten file has a new UUID: its form is built again, not taken from the old one."""
    import awkward as ak

    path = tmp_path / "x.root"
    shutil.copy(sample_files[0], path)
    with internals.allowed(), uproot.open(path) as f:
        before = UprootSourceMapping._extract_base_form(f["Events"])
    with uproot.recreate(path) as f:  # another file at the same path, with one branch only
        f["Events"] = {"MET_pt": ak.Array([1.0, 2.0])}
    calls: list[int] = []
    with internals.allowed(), uproot.open(path) as f:
        after = UprootSourceMapping._extract_base_form(_counting(f["Events"], calls))
    assert calls == [1] and after["fields"] == ["MET_pt"] and len(before["fields"]) > 50


def test_the_output_is_coffeas_own(sample_files, monkeypatch):
    """coffea's IterativeExecutor with its own per-chunk form, then ours with the form kept: the same bits;
    coffea's function is its own again outside our tasks."""
    from coffea import processor

    coffeas = UprootSourceMapping.__dict__["_extract_base_form"]
    want = run(processor.IterativeExecutor(), sample_files, chunksize=100)
    monkeypatch.setattr(nanoforms, "_forms", type(nanoforms._forms)())
    assert same(run(casa_executors.iterative(status=False), sample_files, chunksize=100), want)
    assert len(nanoforms._forms) == 1, "the sample's copies share one UUID: one form kept"
    assert UprootSourceMapping.__dict__["_extract_base_form"] is coffeas


def test_outside_our_tasks_coffea_builds_the_form(sample_files, monkeypatch):
    """A thread not running a task of ours (coffea's own executor, a user) gets coffea's own function,
    even while another thread's task has the wrapper in place; so does a task with the switch off."""
    monkeypatch.setattr(nanoforms, "_forms", type(nanoforms._forms)())
    calls: list[int] = []
    with uproot.open(sample_files[0]) as f:
        tree = _counting(f["Events"], calls)
        with internals.allowed(False):
            UprootSourceMapping._extract_base_form(tree)
            UprootSourceMapping._extract_base_form(tree)
        assert internals.installed() == []
        with internals.allowed():
            assert "UprootSourceMapping._extract_base_form" in internals.installed()
            with internals.allowed(False):  # e.g. another thread's: the patch is in place, this one is off
                UprootSourceMapping._extract_base_form(tree)
    assert calls == [1, 1, 1] and not nanoforms._forms


def test_a_trees_typenames_are_listed_once_and_each_call_gets_its_own_dict(sample_files, monkeypatch):
    monkeypatch.setattr(nanoforms, "_typenames", type(nanoforms._typenames)())
    calls: list[int] = []
    with uproot.open(sample_files[0]) as f:
        tree = _counting(f["Events"], calls, "itertypenames")
        want = tree.typenames()  # uproot's own, outside our tasks
        with internals.allowed():  # as in a task of ours
            first = tree.typenames()
            first["coffea"] = "adds to its own"
            second = tree.typenames()
            filtered = tree.typenames(filter_name="MET_*")  # with options: uproot's own, every time
        assert internals.installed() == []
        tree.typenames()
    assert calls == [1, 1, 1, 1], "listed again for the same tree, or a filtered call was taken from the memo"
    assert second == want and "coffea" not in second and len(want) > 50
    assert filtered == {k: v for k, v in want.items() if k.startswith("MET_")}


def test_another_file_gets_its_own_typenames(sample_files, tmp_path):
    """A rewritten file at the same path (a new UUID): its type names are listed again."""
    import awkward as ak

    path = tmp_path / "x.root"
    shutil.copy(sample_files[0], path)
    with internals.allowed(), uproot.open(path) as f:
        before = f["Events"].typenames()
    with uproot.recreate(path) as f:
        f["Events"] = {"MET_pt": ak.Array([1.0, 2.0])}
    with internals.allowed(), uproot.open(path) as f:
        after = f["Events"].typenames()
    assert after == {"MET_pt": "double"} and len(before) > 50


def _chunks(path: str, schemaclass, ranges) -> list:
    """The form, metadata and two columns of NanoEvents of ``ranges`` of a file's tree, made as coffea's work
    function makes them."""
    from coffea.nanoevents import NanoEventsFactory

    out = []
    with uproot.open(path) as f:
        for start, stop in ranges:
            factory = NanoEventsFactory.from_root(f, treepath="Events", schemaclass=schemaclass, mode="virtual",
                                                  entry_start=start, entry_stop=stop,
                                                  metadata={"dataset": "d", "entrystart": start, "entrystop": stop})
            events = factory.events()
            out.append((factory._schema.form, events.metadata, events.MET.pt.tolist(), events.Jet.pt.tolist()))
    return out


def _counting_schema(monkeypatch, schemaclass, calls: list[int]):
    build = schemaclass._build_collections

    def _build_collections(self, *args, **kwargs):
        calls.append(1)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(schemaclass, "_build_collections", _build_collections)


def test_a_trees_schema_is_built_once_per_run_with_each_chunks_metadata(sample_files, monkeypatch):
    from coffea.nanoevents import NanoAODSchema

    from casa_executors.source import open_files

    ranges = [(0, 10), (10, 25), (25, 40)]
    want = _chunks(sample_files[0], NanoAODSchema, ranges)  # coffea's own: a schema per chunk
    calls: list[int] = []
    _counting_schema(monkeypatch, NanoAODSchema, calls)
    try:
        open_files("run-1")
        with internals.allowed():  # as in a task of ours
            got = _chunks(sample_files[0], NanoAODSchema, ranges)
            assert len(calls) == 1, "the schema was built again for the same tree"
            open_files("run-2")  # another run: built again (a schema class may have changed in between)
            _chunks(sample_files[0], NanoAODSchema, ranges[:1])
            assert len(calls) == 2
    finally:
        open_files("").close()
    assert got == want
    for (_, metadata, _, _), (start, stop) in zip(got, ranges):
        assert metadata == {"dataset": "d", "entrystart": start, "entrystop": stop, "version": "latest"}
    assert got[0][0]["parameters"] is not got[1][0]["parameters"], "chunks share their metadata"


def test_a_schema_of_ones_own_is_built_for_every_chunk(sample_files, monkeypatch):
    """A subclass may do anything with a chunk's metadata: coffea's way, a schema per chunk."""
    from coffea.nanoevents import NanoAODSchema

    from casa_executors.source import open_files

    class Mine(NanoAODSchema):
        pass

    calls: list[int] = []
    _counting_schema(monkeypatch, Mine, calls)
    try:
        open_files("run-1")
        with internals.allowed():
            _chunks(sample_files[0], Mine, [(0, 10), (10, 25)])
        assert len(calls) == 2 and not open_files().schemas
    finally:
        open_files("").close()
