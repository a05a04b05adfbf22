"""The run as data and as a picture: per-chunk times, workers and memory in the report, the report as a
DataFrame, the timeline figure, logging switched on with one call, and the on_progress hook."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from analysis import Analysis, Failing, run, same
from matplotlib.figure import Figure

import casa_executors
from casa_executors.errors import ExecutorOptionError

CHUNKSIZE = 250  # 1000 events a file, three files: 12 chunks


def _executor(name: str, **options):
    extra = {"workers": 2} if name == "futures" else {}
    return casa_executors.create(name, status=False, **extra, **options)


@pytest.fixture(scope="module")
def failing_run(sample_files, tmp_path_factory):
    """futures with two workers, every chunk starting at entry 250 failing once: a report with retries."""
    log = tmp_path_factory.mktemp("failing") / "attempts.log"
    ex = _executor("futures", retries=1)
    t0 = time.time()
    with ex:
        out = run(ex, sample_files, Failing(str(log), bad_starts={250}, fail_times=1), chunksize=CHUNKSIZE)
    return ex.report, out, t0, time.time()


def test_rows_have_times_worker_host_and_peak_memory(failing_run, reference):
    report, out, t0, t1 = failing_run
    assert same(out, reference)
    rows = report.rows()
    assert len(rows) == 12
    for r in rows:
        assert t0 <= r.started < r.ended <= t1, r
        assert r.worker and r.host
        assert r.peak_rss > 10 << 20  # a worker that imported coffea holds far more than 10 MB
    retried = [r for r in rows if r.entrystart == 250]
    assert len(retried) == 3 and all(r.attempts == 2 for r in retried)
    # a retried chunk's row has its last (successful) attempt's times; the failed one ran before it
    spans = sorted((s for s in report.processing.spans() if s.index == retried[0].index), key=lambda s: s.attempt)
    assert [(s.attempt, s.ok) for s in spans] == [(1, False), (2, True)]
    assert (retried[0].started, retried[0].ended) == (spans[1].started, spans[1].ended)
    assert spans[0].ended <= spans[1].started


def test_to_pandas(failing_run):
    report = failing_run[0]
    df = report.to_pandas()
    assert len(df) == 12 and list(df["index"]) == list(range(12))
    assert {"started", "ended", "worker", "host", "peak_rss", "peak_rss_rise", "status", "events"} <= set(df.columns)
    assert str(df["started"].dtype) == "datetime64[ns, UTC]"
    assert (df["ended"] > df["started"]).all()
    assert df["events"].sum() == 3000 and (df["status"] == "ok").all()
    attempts = report.to_pandas(attempts=True)
    assert len(attempts) == 15 and (~attempts["ok"]).sum() == 3
    assert set(attempts["worker"]) == set(df["worker"])
    # the same rows as the report's JSON
    assert list(df["worker"]) == [r.worker for r in report.rows()]


def test_to_pandas_of_an_empty_report():
    df = casa_executors.Report().to_pandas()
    assert len(df) == 0 and "started" in df.columns


def test_timeline_draws_one_row_per_worker_and_a_bar_per_attempt(failing_run, tmp_path):
    report = failing_run[0]
    fig = report.timeline()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    workers = sorted({s.worker for s in report.processing.spans()})
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == sorted(workers)
    bars = sum(len(c.get_paths()) for c in ax.collections)
    assert bars == 15  # 12 chunks, 3 failed attempts
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["computed (12)", "failed (3)"]
    fig.savefig(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 5000
    by_dataset = report.timeline(color="dataset")
    assert [t.get_text() for t in by_dataset.axes[0].get_legend().get_texts()] == ["SingleMu (15)",
                                                                                  "failed attempt"]
    with pytest.raises(ValueError, match="color must be"):
        report.timeline(color="rainbow")


def test_several_runs_on_one_time_axis(failing_run, sample_files):
    from casa_executors.timeline import draw_runs

    ex = _executor("iterative")
    run(ex, sample_files, chunksize=CHUNKSIZE)
    first, second = failing_run[0].processing, ex.report.processing
    fig = draw_runs({"futures run": first, "iterative run": second})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["futures run (15)", "iterative run (12)",
                                                                   "failed attempt"]
    assert len(ax.get_yticklabels()) == len({s.worker for s in first.spans()} | {s.worker for s in second.spans()})
    # the second run starts later on the same axis
    lefts = [min(x for x, _ in c.get_paths()[0].vertices) for c in ax.collections]
    assert max(lefts) >= second.started - first.started - 1e-6


def test_timeline_needs_a_run():
    with pytest.raises(ValueError, match="no processing run"):
        casa_executors.Report().timeline()


# -- logging -----------------------------------------------------------------------------------------


@pytest.fixture
def logged():
    stream = io.StringIO()
    handler = casa_executors.log_to_stderr("INFO", stream=stream)
    yield stream
    logger = logging.getLogger("casa_executors")
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_log_to_stderr_shows_the_engine_starting_and_stopping(logged, sample_files, reference):
    ex = _executor("futures")
    out = run(ex, sample_files, chunksize=CHUNKSIZE)
    ex.close()
    assert same(out, reference)
    text = logged.getvalue()
    assert "INFO casa_executors.backends.base: futures(2 workers) started in" in text
    assert "INFO casa_executors.backends.base: futures stopped in" in text
    assert "INFO casa_executors.driver: processing: 12/12 done in" in text


def test_log_to_stderr_twice_keeps_one_handler(logged):
    stream = io.StringIO()
    casa_executors.log_to_stderr("WARNING", stream=stream)
    try:
        logger = logging.getLogger("casa_executors")
        assert sum(isinstance(h, logging.StreamHandler) for h in logger.handlers) == 1
        logging.getLogger("casa_executors.driver").info("not shown")
        logging.getLogger("casa_executors.driver").warning("shown")
        assert stream.getvalue().count("shown") == 1 and "not shown" not in stream.getvalue()
        assert logged.getvalue() == ""
    finally:
        for h in list(logging.getLogger("casa_executors").handlers):
            if isinstance(h, logging.StreamHandler):
                logging.getLogger("casa_executors").removeHandler(h)


def test_log_to_stderr_refuses_an_unknown_level():
    with pytest.raises(ValueError, match="unknown logging level 'LOUD'"):
        casa_executors.log_to_stderr("LOUD")


# -- on_progress -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_on_progress_sees_the_output_fill(backend, sample_files, reference):
    seen = []

    def watch(p: casa_executors.Progress) -> None:
        met = p.output["met"].values(flow=True).sum() if p.output is not None else 0
        seen.append((p.chunks_done, p.chunks_in_output, met, p.events, p.final))

    ex = _executor(backend, on_progress=watch, progress_interval=0)
    with ex:
        out = run(ex, sample_files, chunksize=CHUNKSIZE)
    assert same(out, reference)
    assert seen[-1][4] and not any(final for *_, final in seen[:-1])
    # the partial output only grows, holds what has arrived, and ends as the full output
    done = [d for d, *_ in seen]
    assert done == sorted(done) and seen[-1][:2] == (12, 12)
    for _, in_output, met, _, _ in seen:
        assert met == in_output * CHUNKSIZE
    assert seen[-1][3] == 3000
    if backend == "iterative":  # every chunk comes back on its own, with progress_interval=0 a call each
        assert [d for d, *_ in seen] == [*range(1, 13), 12]
    info = ex.report.summary()["progress"]
    assert info["calls"] == len(seen) and info["chunks_in_output"] == 12 and info["error"] == ""


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_on_progress_partial_output_equals_the_output(backend, sample_files, reference):
    last = {}

    def keep(p):
        last["output"], last["in"] = p.output, p.chunks_in_output

    ex = _executor(backend, on_progress=keep, progress_interval=3600)  # only the final call
    with ex:
        out = run(ex, sample_files, chunksize=CHUNKSIZE)
    assert same(out, reference)
    assert ex.report.summary()["progress"]["calls"] == 1
    partial = last["output"]
    assert last["in"] == 12
    assert np.array_equal(partial["met"].values(flow=True), out["met"].values(flow=True))
    assert partial["events"].value == 3000 and partial["datasets"] == {"SingleMu"}
    assert partial is not out and partial["met"] is not out["met"]


@pytest.mark.parametrize("backend", ["iterative", "futures"])
def test_a_callback_changing_the_partial_output_leaves_the_output_alone(backend, sample_files, reference):
    def spoil(p):
        if p.output is not None:
            p.output["met"].reset()
            p.output["events"].value = -1
            p.output["datasets"].add("spoilt")

    ex = _executor(backend, on_progress=spoil, progress_interval=0)
    with ex:
        assert same(run(ex, sample_files, chunksize=CHUNKSIZE), reference)


def test_on_progress_with_retries_counts_each_chunk_once(sample_files, reference, tmp_path):
    last = {}
    ex = _executor("futures", retries=2, on_progress=lambda p: last.update(p=p), progress_interval=0)
    with ex:
        out = run(ex, sample_files, Failing(str(tmp_path / "log"), bad_starts={0, 500}, fail_times=2),
                  chunksize=CHUNKSIZE)
    assert same(out, reference)
    p = last["p"]
    assert p.final and p.chunks_in_output == 12 and p.output["events"].value == 3000


def test_on_progress_has_what_a_checkpoint_restored(sample_files, reference, tmp_path):
    ex = _executor("futures", checkpoint=str(tmp_path / "ck"))
    with ex:
        run(ex, sample_files, chunksize=CHUNKSIZE)
    last = {}
    again = _executor("futures", checkpoint=str(tmp_path / "ck"), on_progress=lambda p: last.update(p=p),
                      progress_interval=3600)
    with again:
        out = run(again, sample_files, chunksize=CHUNKSIZE)
    assert same(out, reference) and again.report.summary()["restored"] == 12
    p = last["p"]
    assert p.final and p.chunks_in_output == 12 and p.chunks_done == 12
    assert np.array_equal(p.output["met"].values(flow=True), reference["met"].values(flow=True))


def test_on_progress_on_dask_reads_outputs_from_worker_memory(sample_files, reference):
    from analysis import require_engine

    require_engine("dask")
    last = {}
    ex = _executor("dask", workers=2, on_progress=lambda p: last.update(p=p), progress_interval=0)
    with ex:
        out = run(ex, sample_files, chunksize=CHUNKSIZE)
    assert same(out, reference) and ex.report.summary()["merge"]["outputs"] == "engine"
    p = last["p"]
    assert p.final and p.chunks_in_output == 12
    assert np.array_equal(p.output["met"].values(flow=True), reference["met"].values(flow=True))


def test_on_progress_errors_are_reported_and_the_run_goes_on(sample_files, reference, caplog):
    calls = []

    def broken(p):
        calls.append(p.chunks_done)
        if len(calls) == 2:
            raise KeyError("no such histogram")

    ex = _executor("iterative", on_progress=broken, progress_interval=0)
    with caplog.at_level(logging.ERROR, logger="casa_executors"), \
            pytest.warns(RuntimeWarning, match="on_progress raised KeyError: 'no such histogram'; it is not called"):
        out = run(ex, sample_files, chunksize=CHUNKSIZE)
    assert same(out, reference)
    assert calls == [1, 2]
    assert ex.report.summary()["progress"]["error"] == "KeyError: 'no such histogram'"
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


def test_on_progress_is_off_by_default(sample_files):
    ex = _executor("iterative")
    run(ex, sample_files, Analysis(), chunksize=CHUNKSIZE)
    assert ex.report.summary()["progress"] is None


@pytest.mark.parametrize(("options", "message"), [
    ({"on_progress": 3}, "on_progress must be a function"),
    ({"on_progress": print, "progress_interval": -1}, "progress_interval must be a number of seconds >= 0"),
    ({"on_progress": print, "progress_interval": "1"}, "progress_interval must be a number"),
])
def test_on_progress_options_are_checked(options, message):
    with pytest.raises(ExecutorOptionError, match=message):
        casa_executors.iterative(**options)
