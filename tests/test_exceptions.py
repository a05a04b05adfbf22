"""A chunk that fails for good raises the worker's own exception, on every backend.

The exception a run raises is the one the chunk's last attempt raised (coffea's ``Exception("Failed
processing file ...")`` whose ``__cause__`` is the processor's own): the same object in this process,
the same types with the same arguments and attributes from a worker, with the worker's traceback,
the chunk's attributes (``partial_output``, ``item``, ``attempts``, ``worker``, ``host``, ``phase``,
``report``) and a PEP 678 note naming the file, the entry range, the attempts and the worker. No
exception class is made at run time. A type the driver cannot import comes back as a RemoteError
naming it; an exception that refuses attributes is the ``__cause__`` of a ChunkError that has them.
"""

from __future__ import annotations

import ast
import os
import pickle
import traceback
from pathlib import Path

import cloudpickle
import pytest
import uproot
from analysis import Analysis, require_engine, run
from coffea.util import _exception_chain
from uproot.deserialization import DeserializationError

import casa_executors
from casa_executors import ChunkError, RemoteError, errors
from casa_executors.task import ErrorInfo
from casa_executors.xcache.tokens import REDACTED

cloudpickle.register_pickle_by_value(__import__(__name__))  # workers need not import this module


# -- exceptions and processors (module level: the driver can import their types) --------------------------
class Needy(Exception):
    """Its ``__init__`` takes an argument ``args`` does not keep: unpickling it calls ``__init__`` and fails."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.args[0]} (code {self.code})"  # reads what only its __init__ set


class Frozen(Exception):
    """Refuses every attribute once made: the driver cannot set the chunk's attributes on it."""

    def __setattr__(self, name, value):
        if not name.startswith("__"):  # Python's own (__traceback__, __notes__...) it takes
            raise AttributeError(f"Frozen takes no attribute {name!r}")
        super().__setattr__(name, value)


class Raising(Analysis):
    """Raises ``error()`` in chunks starting at ``bad``."""

    def __init__(self, error, bad: int = 500) -> None:
        self.error, self.bad = error, bad

    def process(self, events):
        if events.metadata["entrystart"] == self.bad:
            raise self.error()
        return super().process(events)


def key_error():
    return {"muons": 1}["electrons"]


def needy():
    raise Needy("not enough muons", 42)


# -- the engines, and a file with corrupt baskets ---------------------------------------------------------
@pytest.fixture(scope="module", params=casa_executors.BACKENDS)
def backend(request):
    """One engine per backend, held for all of that backend's tests."""
    require_engine(request.param)
    ex = casa_executors.create(request.param, status=False, **({} if request.param == "iterative" else {"workers": 2}))
    with ex:
        yield ex.backend


@pytest.fixture(scope="module")
def corrupt_baskets(sample_root, tmp_path_factory) -> Path:
    """The sample with the key header of every basket overwritten: uproot raises DeserializationError,
    an exception whose ``__str__`` reads attributes only its ``__init__`` sets."""
    data = bytearray(sample_root.read_bytes())
    for branch in uproot.open(sample_root)["Events"].branches:
        for i in range(branch.num_baskets):
            seek = int(branch.member("fBasketSeek")[i])
            data[seek:seek + 16] = b"\xde\xad\xbe\xef" * 4
    out = tmp_path_factory.mktemp("corrupt") / "corrupt_baskets.root"
    out.write_bytes(bytes(data))
    return out


def driver(backend, **options) -> casa_executors.Driver:
    return casa_executors.Driver(backend=backend, status=False, **options)


def raised(backend, files, proc=None, retries: int = 0, **runner_kw) -> BaseException:
    ex = driver(backend, retries=retries)
    with pytest.raises(BaseException) as caught:
        run(ex, files, proc, chunksize=500, **runner_kw)
    err = caught.value
    assert err.report is ex.report
    return err


def check_printable(err: BaseException) -> str:
    """str(), repr() and traceback.format_exception of the whole chain work; the formatted text."""
    for c in _exception_chain(err):
        assert isinstance(str(c), str) and isinstance(repr(c), str)
    return "".join(traceback.format_exception(err))


def check_no_made_types(err: BaseException) -> None:
    """Every type in the chain is the one its module defines (or our RemoteError): none made at run time."""
    for c in _exception_chain(err):
        kind = type(c)
        if "<locals>" not in kind.__qualname__:  # (a test's own local class cannot be imported by name)
            assert errors._import_type(errors.type_path(kind)) is kind, kind
        for k in kind.__mro__:
            assert not k.__module__.startswith("casa_executors") or getattr(errors, k.__name__, None) is k, kind


def check_chunk_attributes(err: BaseException, backend, phase: str = "processing", attempts: int = 1) -> None:
    assert set(errors.CHUNK_ATTRIBUTES) <= set(vars(err)), vars(err).keys()  # on the exception itself
    assert err.phase == phase and err.attempts == attempts and err.worker and err.host
    notes = "\n".join(err.__notes__)
    where = f"{phase} of {err.item.filename} entries {err.item.entrystart}-{err.item.entrystop}"
    assert where in notes and f"{attempts} attempt(s)" in notes and backend.name in notes
    assert f"last attempt on {err.worker}" in notes


def check_worker_traceback(err: BaseException, backend, function: str) -> None:
    """The traceback of the root cause reaches into the worker's code (its frames came back with it)."""
    root = _exception_chain(err)[-1]
    names = [frame.name for frame in traceback.extract_tb(root.__traceback__)]
    assert function in names, names


# -- on every backend ---------------------------------------------------------------------------------------
def test_corrupt_basket_with_skipbadfiles_raises_the_original_exception(backend, corrupt_baskets):
    err = raised(backend, [corrupt_baskets], retries=1, skipbadfiles=True)  # not an OSError: not skipped
    assert type(err) is Exception and str(err).startswith("Failed processing file")  # coffea's own, itself
    chain = _exception_chain(err)
    root = chain[-1]
    assert type(root) is DeserializationError, getattr(root, "reason", "")
    assert root.file_path == str(corrupt_baskets) and isinstance(root.context, dict)  # attributes __init__ set
    assert "TBasket" in str(root)  # its __str__ reads them
    text = check_printable(err)
    assert "DeserializationError" in text and "casa_executors: processing of" in text  # our note is printed
    check_no_made_types(err)
    check_chunk_attributes(err, backend, attempts=2)
    check_worker_traceback(err, backend, "_work_function")
    assert "partial_output" in vars(err) and err.partial_output is None  # no chunk of the file completed
    assert isinstance(pickle.loads(pickle.dumps(err)), Exception)


def test_key_error_in_process(backend, sample_root):
    err = raised(backend, [sample_root], Raising(key_error))
    root = _exception_chain(err)[-1]
    assert type(root) is KeyError and root.args == ("electrons",) and str(root) == "'electrons'"
    assert type(err) is Exception and err.__cause__ is root
    text = check_printable(err)
    assert "KeyError: 'electrons'" in text
    check_no_made_types(err)
    check_chunk_attributes(err, backend)
    assert err.item.entrystart == 500
    check_worker_traceback(err, backend, "key_error")
    assert err.partial_output["events"].value == 500  # the other chunk's output, as Runner returns it


def test_user_exception_whose_init_takes_more_arguments(backend, sample_root):
    err = raised(backend, [sample_root], Raising(needy))
    root = err.__cause__
    assert type(root) is Needy and root.code == 42 and root.args == ("not enough muons",)
    assert str(root) == "not enough muons (code 42)"
    text = check_printable(err)
    assert "Needy: not enough muons (code 42)" in text
    check_no_made_types(err)
    check_chunk_attributes(err, backend)
    check_worker_traceback(err, backend, "needy")
    try:
        raise err
    except Exception as caught:  # as a user would: the cause, with its attributes
        assert caught.__cause__.code == 42


def test_type_the_driver_cannot_import_comes_back_as_remote_error(backend, sample_root):
    class Local(Exception):  # defined here: not importable by name on the driver
        pass

    def local():
        raise Local("only the worker knows this type")

    err = raised(backend, [sample_root], Raising(local))
    check_printable(err)
    check_no_made_types(err)
    cause = err.__cause__
    if backend.in_process:  # never left this process: the object itself
        assert type(cause) is Local
        return
    assert type(cause) is RemoteError and cause.type_name == "Local"
    assert cause.type_path.startswith("test_exceptions:") and cause.type_path.endswith("Local")
    assert str(cause) == "Local: only the worker knows this type" and "cannot be imported here" in cause.reason
    assert "not rebuilt here" in "\n".join(cause.__notes__)
    check_worker_traceback(err, backend, "local")
    check_chunk_attributes(err, backend)


def test_exception_refusing_attributes_is_the_cause_of_a_chunk_error(backend, sample_root):
    err = raised(backend, [sample_root], Raising(lambda: Frozen("frozen"), bad=0), retries=0)
    # coffea's Exception takes the attributes: Frozen, its cause, is there as it was raised
    assert type(err) is Exception and type(err.__cause__) is Frozen and str(err.__cause__) == "frozen"
    # raised without coffea's wrapping, the driver cannot mark it: a ChunkError does, caused by it
    ex = driver(backend, retries=0)
    with pytest.raises(ChunkError) as caught:
        ex(list(range(2)), raise_frozen, None)
    wrapper = caught.value
    assert type(wrapper.__cause__) is Frozen and str(wrapper) == "Frozen: frozen 1"
    assert wrapper.attempts == 1 and wrapper.phase == "processing" and wrapper.report is ex.report
    assert "refused the chunk's attributes" in "\n".join(wrapper.__notes__)
    check_printable(wrapper)
    check_no_made_types(wrapper)


# what a task that ends its worker's process fails with, per engine (as test_backend_contract's kits say)
LOST = {"futures": "loky.process_executor:TerminatedWorkerError", "dask": "distributed:KilledWorker",
        "parsl": "parsl.executors.high_throughput.errors:WorkerLost", "spark": "casa_executors.errors:WorkerLost",
        "workqueue": "casa_executors.errors:WorkerLost"}


def die():
    os._exit(3)


@pytest.mark.parametrize("backend", [b for b in casa_executors.BACKENDS if b != "iterative"], indirect=True)
def test_lost_worker_is_a_clear_error(backend, sample_root):
    """Last on each engine (it loses a worker): the engine's own error, with the chunk's attributes and note.
    Not on iterative: there the chunk would end this process."""
    err = raised(backend, [sample_root], Raising(die, bad=0))
    assert type(err) is errors._import_type(LOST[backend.name])
    text = check_printable(err)
    check_no_made_types(err)
    assert err.phase == "processing" and err.attempts == 1 and err.item.entrystart == 0  # no worker: it is gone
    notes = "\n".join(err.__notes__)
    assert f"processing of {sample_root} entries 0-500" in notes and f"{type(err).__name__}: " in notes
    assert type(err).__name__ in text


def raise_frozen(item):
    if item == 1:
        raise Frozen(f"frozen {item}")
    return {"n": 1}


# -- the packing itself, in this process ---------------------------------------------------------------------
def round_trip(exc: BaseException, secrets=()) -> BaseException:
    """As the driver gets it from a worker: through pickle, without the live object."""
    try:
        raise exc
    except BaseException as raised_exc:
        info = ErrorInfo.capture(raised_exc, secrets)
    return pickle.loads(pickle.dumps(info)).exception()


def test_round_trip_keeps_types_attributes_links_and_traceback():
    try:
        try:
            needy()
        except Needy as inner:
            raise FileNotFoundError(2, "No such file or directory", "/data/a.root") from inner
    except FileNotFoundError:
        try:
            raise RuntimeError("while cleaning up")  # context, not cause
        except RuntimeError as last:
            exc = last
    back = round_trip(exc)
    assert type(back) is RuntimeError and back.__cause__ is None and not back.__suppress_context__
    fnf = back.__context__
    assert type(fnf) is FileNotFoundError and fnf.errno == 2 and fnf.filename == "/data/a.root"
    assert fnf.filename2 is None and str(fnf) == "[Errno 2] No such file or directory: '/data/a.root'"
    assert type(fnf.__cause__) is Needy and fnf.__cause__.code == 42 and fnf.__suppress_context__
    text = "".join(traceback.format_exception(back))
    assert "During handling of the above exception" in text and "direct cause" in text
    assert [f.name for f in traceback.extract_tb(fnf.__cause__.__traceback__)][-1] == "needy"


def test_deserialization_error_round_trip_prints(corrupt_baskets):
    with pytest.raises(DeserializationError) as caught:
        uproot.open(corrupt_baskets)["Events"]["MET_pt"].array()
    exc = caught.value
    back = round_trip(exc)
    assert type(back) is DeserializationError and back.file_path == exc.file_path and str(back) == str(exc)
    assert back.context.keys() == exc.context.keys()


def test_resources_stay_on_the_worker_and_what_does_not_pickle_is_named():
    exc = Needy("with a lock", 7)
    exc.lock = __import__("threading").Lock()  # a resource: a stand-in comes back
    exc.lines = (n for n in range(3))  # no resource, but it does not pickle: left out, named
    back = round_trip(exc)
    assert type(back) is Needy and back.code == 7 and not hasattr(back, "lines")
    assert type(back.lock) is errors.Unsent and "left on the worker" in repr(back.lock)
    assert "did not pickle were left on the worker: lines" in "\n".join(back.__notes__)


def test_in_process_exception_holding_a_resource_is_rebuilt_and_pickles_with_its_chain():
    """tblib's reducers (parsl and distributed install them for every exception type on import) pickle
    ``__cause__``: an in-process exception whose cause holds a lock must not be kept as it is."""
    import copyreg
    import io
    import threading
    import types

    from tblib import pickling_support

    cause = Needy("with a lock", 7)
    cause.lock = threading.Lock()
    try:
        try:
            raise cause
        except Needy as inner:
            raise Exception("Failed processing file") from inner
    except Exception as raised_exc:
        live = raised_exc
        info = ErrorInfo.capture(live, live=True)
        plain = ErrorInfo.capture(Exception("no resource"), live=True)
    assert plain.live is not None  # nothing left behind: the object itself
    assert info.live is None
    err = info.exception()
    assert type(err.__cause__) is Needy and type(err.__cause__.lock) is errors.Unsent

    def tblib_dumps(obj):  # as pickle.dumps after pickling_support.install(), without changing copyreg
        out = io.BytesIO()
        pickler = pickle.Pickler(out)
        pickler.dispatch_table = copyreg.dispatch_table.copy()
        for kind in (Exception, Needy):
            pickler.dispatch_table[kind] = pickling_support.pickle_exception
        pickler.dispatch_table[types.TracebackType] = pickling_support.pickle_traceback
        pickler.dump(obj)
        return out.getvalue()

    with pytest.raises(TypeError, match="lock"):
        tblib_dumps(live)  # the object itself does not pickle so
    back = pickle.loads(tblib_dumps(err))
    assert type(back.__cause__) is Needy and back.__cause__.code == 7


def test_secrets_are_redacted_from_text_arguments_and_attributes():
    secret = "s3cr3t-t0ken-value"
    exc = Needy(f"https://cache/?authz={secret}", 1)
    exc.url = f"root://cache//store?authz={secret}"
    info = ErrorInfo.capture(exc, [secret], live=True)
    assert info.live is None  # the object mentions the secret: the driver gets the redacted copy
    blob = pickle.dumps(info)
    assert secret.encode() not in blob
    back = pickle.loads(blob).exception()
    assert type(back) is Needy and back.url == f"root://cache//store?authz={REDACTED}" and back.code == 1
    assert secret not in "".join(traceback.format_exception(back))

    class Holder:  # a secret inside an object: not sent at all, only the text
        def __init__(self):
            self.token = secret

    exc = Needy("plain", 2)
    exc.holder = Holder()
    back = pickle.loads(pickle.dumps(ErrorInfo.capture(exc, [secret]))).exception()
    assert type(back) is RemoteError and back.type_name == "Needy" and "hold a secret" in back.reason


def test_no_exception_class_is_made_at_run_time():
    """No ``type(name, bases, namespace)`` call anywhere in the package."""
    package = Path(casa_executors.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type":
                assert len(node.args) == 1, f"{path}:{node.lineno} makes a class"
    for name in ("combined_type", "remote_type", "_COMBINED", "_REMOTE", "chunk_error"):
        assert not hasattr(errors, name), name
