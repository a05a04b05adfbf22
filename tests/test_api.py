"""The factories as a user meets them: their signatures and help, the answer to a wrong option, cache=/token=.

Nothing here starts an engine: executors are only built.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pydoc
import re
from pathlib import Path

import pytest
from coffea import processor
from coffea.processor import executor as coffea_executors
from coffea.processor.taskvine_executor import TaskVineExecutor

import casa_executors as ce
from casa_executors.backends.scaling import DEFAULT_WORKER_TIMEOUT
from casa_executors.driver import Driver
from casa_executors.options import COFFEA_ADVICE, DRIVER_DOCS, DRIVER_INTERNAL, DriverOptions

FACTORIES = {name: getattr(ce, name) for name in ce.BACKENDS}
PRIVATE = [f.name for f in dataclasses.fields(Driver) if f.name in DRIVER_INTERNAL]
# coffea's option names the issue names, and the others of its executors that take no counterpart here
COFFEA_NAMES = ["treereduction", "merging", "mergepool", "pool", "tailtimeout", "heavy_input", "priority",
                "function_name", "desc", "unit", "skipbadfiles", "worker_affinity", "use_dataframes",
                "chunks_per_file"]


def backend_parameters(name: str) -> dict[str, inspect.Parameter]:
    cls = ce.backend_class(name)  # imports the engine's package (all are installed where CI runs)
    return {p.name: p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def options_of(name: str) -> list[str]:
    return list(inspect.signature(FACTORIES[name]).parameters)


def error_of(call) -> str:
    with pytest.raises(ce.ExecutorOptionError) as info:
        call()
    return str(info.value)


# -- the signatures: every option, typed, and none that drifts ---------------------------------------------


def test_every_driver_field_is_an_option_or_named_internal():
    """A new Driver field must be added to DriverOptions and DRIVER_DOCS (then every factory takes it,
    documented) or to DRIVER_INTERNAL, saying why users do not set it."""
    fields = {f.name for f in dataclasses.fields(Driver)}
    options = set(DriverOptions.__annotations__)
    assert options == set(DRIVER_DOCS), "DriverOptions and DRIVER_DOCS must list the same options"
    assert fields == options | set(DRIVER_INTERNAL), (
        f"Driver fields without a decision: {sorted(fields - options - set(DRIVER_INTERNAL))}; "
        f"gone from Driver: {sorted((options | set(DRIVER_INTERNAL)) - fields)}")
    assert not options & set(DRIVER_INTERNAL)


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_factory_signature_is_the_backends_and_the_drivers(name):
    """Each factory's signature: its backend's __init__ parameters (same names, defaults and type hints), then
    the driver's options with Driver's defaults; all keyword-only. A backend parameter added without the
    factory's fails here."""
    params = inspect.signature(FACTORIES[name]).parameters
    backend = backend_parameters(name)
    own = [p for p in params if p not in DRIVER_DOCS]
    assert own == [p for p in params][:len(own)], "the backend's parameters come first"
    assert set(own) == set(backend), f"{name}(): missing {set(backend) - set(own)}, extra {set(own) - set(backend)}"
    for p in own:
        assert params[p].default == backend[p].default, f"{name}({p}=): default differs from the backend's"
        assert params[p].annotation == backend[p].annotation, f"{name}({p}=): type hint differs from the backend's"
    defaults = {f.name: f.default for f in dataclasses.fields(Driver)}
    assert [p for p in params if p in DRIVER_DOCS] == list(DRIVER_DOCS)
    for p in DRIVER_DOCS:
        assert params[p].default == defaults[p]
        assert params[p].annotation not in (inspect.Parameter.empty, "Any")
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert inspect.signature(FACTORIES[name]).return_annotation == "Driver"


def test_the_factories_default_worker_timeout_is_the_backends():
    assert inspect.signature(ce.dask).parameters["worker_timeout"].default == DEFAULT_WORKER_TIMEOUT


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_help_shows_every_option_with_its_doc(name):
    text = pydoc.render_doc(FACTORIES[name], renderer=pydoc.plaintext)
    signature = text.split("\n\n")[1]  # after pydoc's title: "dask(*, client: ...) -> 'Driver'"
    assert signature.startswith(f"{name}(*, ")
    for option in options_of(name):
        assert re.search(rf"^ +{option} : \S", text, re.M), f"help({name}) does not describe {option}"
        assert re.search(rf"[(,] {option}: ", signature), f"help({name}): {option} is not in the signature"
    for option, (_, doc) in DRIVER_DOCS.items():
        first_words = " ".join(doc.split()[:4])
        assert first_words in " ".join(text.split()), f"help({name}): {option}'s doc is missing"
    for private in PRIVATE:
        assert f" {private}:" not in signature and not re.search(rf"^ +{private} : ", text, re.M), private
    assert "Returns" in text and "Driver" in text


def test_jupyter_shows_every_option():
    """What Shift-Tab in a notebook shows: IPython's inspector of the factory."""
    from IPython.core.oinspect import Inspector

    takes_theme = "theme_name" in inspect.signature(Inspector).parameters
    inspector = Inspector(theme_name="nocolor") if takes_theme else Inspector()
    info = inspector.info(ce.dask, oname="casa_executors.dask")
    for option in options_of("dask"):
        assert f"{option}:" in info["definition"]
        assert f"{option} : " in info["docstring"]


def test_create_takes_the_same_options_as_the_factories():
    ex = ce.create("futures", workers=2, retries=1, merge="driver", status=False)
    assert isinstance(ex, Driver) and ex.backend.workers == 2 and ex.retries == 1 and ex.merge == "driver"
    assert ex.status is False
    assert "wrokers" in error_of(lambda: ce.create("futures", wrokers=2))
    assert "unknown backend 'condor'" in error_of(lambda: ce.create("condor"))


# -- wrong options: coffea's names answered, public names only ----------------------------------------------


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_coffeas_own_option_names_say_what_to_use_instead(name):
    for option in COFFEA_NAMES:
        message = error_of(lambda option=option: ce.create(name, **{option: 1}))
        assert message.startswith(f"{name}(): {option!r} is coffea's option, not one of ours: ")
        assert message.endswith(COFFEA_ADVICE[option])
    assert "merge_fanin=" in error_of(lambda: ce.create(name, treereduction=4))
    assert "merge=" in error_of(lambda: ce.create(name, mergepool=2))
    assert "Runner(" in error_of(lambda: ce.create(name, skipbadfiles=True))
    assert "Runner(" in error_of(lambda: ce.create(name, chunksize=1000))


def test_every_option_of_coffeas_executors_is_taken_or_answered():
    """Every field of coffea's executors (and of its Runner) is an option of a factory here, or gets advice."""
    classes = [coffea_executors.IterativeExecutor, coffea_executors.FuturesExecutor,
               coffea_executors.DaskExecutor, coffea_executors.ParslExecutor, TaskVineExecutor, processor.Runner]
    ours = {option for name in ce.BACKENDS for option in options_of(name)}
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.name in ours or f.name in COFFEA_ADVICE, f"coffea's {cls.__name__}({f.name}=) has no answer"


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_options_coffea_and_we_share_are_taken(name):
    ex = ce.create(name, retries=1, recoverable=True, status=False, compression=None)
    assert (ex.retries, ex.recoverable, ex.status, ex.compression) == (1, True, False, None)


@pytest.mark.parametrize("name", ce.BACKENDS)
def test_unknown_options_are_answered_with_public_names_only(name):
    public = set(options_of(name))
    typo = error_of(lambda: ce.create(name, wrokers=2))
    assert typo == f"{name}(): unknown option 'wrokers' (did you mean 'workers'?)"
    for option in ["zzz", "_file_run", "routr", "backnd", "reprot", *PRIVATE]:
        if option in COFFEA_ADVICE:
            continue
        message = error_of(lambda option=option: ce.create(name, **{option: 1}))
        hint = re.search(r"did you mean '(\w+)'", message)
        assert hint is None or hint[1] in public
        listed = re.search(r"its options are: ([\w, ]+) \(help", message)
        assert listed or option != "zzz", "with no close match, the options are listed"
        if listed:
            assert set(listed[1].split(", ")) == public
        for private in PRIVATE:
            if private != option:
                assert repr(private) not in message and not re.search(rf"[:,] {private}\b", message), message
    other = "master" if name != "spark" else "client"
    assert error_of(lambda: ce.create(name, **{other: 1})).endswith(
        "it is an option of spark()" if other == "master" else "it is an option of dask()")


def test_several_wrong_options_are_all_named():
    message = error_of(lambda: ce.futures(wrokers=2, treereduction=4))
    assert "'wrokers'" in message and "'treereduction'" in message


def test_the_error_is_the_one_coffea_users_catch():
    assert issubclass(ce.ExecutorOptionError, TypeError) and issubclass(ce.ExecutorOptionError, ValueError)
    with pytest.raises(TypeError):
        ce.futures(treereduction=4)


# -- cache= and token=: checked when the executor is built -----------------------------------------------


@pytest.mark.parametrize("cache, why", [
    ("xroot:/bad", "give root://host[:port] or host[:port]"),
    ("root://", "it names no host"),
    ("root://:1094", "it names no host"),
    ("http://cache.example:1094", "the scheme must be one of root://, xroot://, roots://, xroots://, not http://"),
    ("https://cache.example", "not https://"),
    ("root://cache.example:99999", "its port must be a number from 1 to 65535"),
    ("root://cache.example:port", "its port must be a number from 1 to 65535"),
    ("root://cache.example:1094/store", "without a path"),
    ("", "an endpoint is a string"),
])
def test_a_malformed_cache_fails_at_build(cache, why):
    message = error_of(lambda: ce.futures(cache=cache))
    assert message.startswith(f"cache=: {cache!r} is not an XCache endpoint") and why in message
    message = error_of(lambda: ce.iterative(cache=["root://good.example:1094", cache]))
    assert message.startswith(f"cache=: {cache!r}")


def test_a_cache_that_is_not_a_string_or_list_fails_at_build():
    assert error_of(lambda: ce.futures(cache=1094)).startswith("cache= must be an XCache endpoint")
    assert error_of(lambda: ce.futures(cache=[])).startswith("cache= must be an XCache endpoint")
    assert "cache_mode must be 'plain' or 'forward'" in error_of(
        lambda: ce.futures(cache="root://c:1094", cache_mode="proxy", token=False))


@pytest.mark.parametrize("cache, endpoint", [
    ("root://cache.example:1094", "root://cache.example:1094"),
    ("cache.example:1094", "root://cache.example:1094"),
    ("roots://cache.example:1094/", "roots://cache.example:1094"),
    ("xroot://[::1]:1094", "xroot://[::1]:1094"),
])
def test_a_good_cache_is_taken(cache, endpoint):
    assert ce.iterative(cache=cache, token=False).router.caches == [endpoint]


@pytest.fixture
def no_discovered_token(monkeypatch, tmp_path):
    """WLCG discovery finds nothing unless a test says so."""
    for var in ("BEARER_TOKEN", "BEARER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    if Path(f"/tmp/bt_u{os.getuid()}").exists():
        pytest.skip(f"/tmp/bt_u{os.getuid()} exists: discovery would find it")


def token_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_file_is_read_at_build(tmp_path, no_discovered_token):
    f = token_file(tmp_path / "bt", "eyJhbGciOi.secret.sig\n")
    ex = ce.futures(cache="root://c:1094", token=f)
    assert ex.router.token.reveal() == "eyJhbGciOi.secret.sig" and "secret" not in repr(ex)


def test_a_token_file_that_cannot_be_used_fails_at_build_naming_token(tmp_path, no_discovered_token):
    missing = tmp_path / "missing"
    assert error_of(lambda: ce.futures(cache="root://c:1094", token=missing)) == (
        f"token=: token file {missing} does not exist")
    shared = token_file(tmp_path / "shared", "secret-value", 0o644)
    message = error_of(lambda: ce.futures(cache="root://c:1094", token=shared))
    assert message.startswith(f"token=: token file {shared} is readable by group/others")
    assert "secret-value" not in message
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    assert error_of(lambda: ce.futures(cache="root://c:1094", token=folder)).startswith("token=: ")
    empty = token_file(tmp_path / "empty", "\n")
    assert "is empty" in error_of(lambda: ce.futures(cache="root://c:1094", token=empty))


def test_a_discovered_token_file_that_cannot_be_used_fails_at_build(tmp_path, monkeypatch, no_discovered_token):
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(tmp_path / "gone"))
    message = error_of(lambda: ce.futures(cache="root://c:1094"))
    assert message.startswith("token=: token file") and "found by WLCG token discovery" in message
    ce.futures(cache="root://c:1094", token=False)  # no token wanted: discovery is not asked


def test_a_token_path_given_as_text_is_refused(tmp_path, no_discovered_token):
    f = token_file(tmp_path / "bt", "secret")
    message = error_of(lambda: ce.futures(cache="root://c:1094", token=str(f)))
    assert message.startswith("token= is the token itself") and "pathlib.Path" in message
    assert "must be a token" in error_of(lambda: ce.futures(cache="root://c:1094", token=1234))
    assert error_of(lambda: ce.futures(token="abc")) == "token= is only used with cache=; give cache= too"
