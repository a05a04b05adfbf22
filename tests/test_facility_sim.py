"""The facility simulator over the real rules (casa_executors.state), in seconds; and a small Dask at scale."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from casa_benchmarks.facility_sim import Facility, Out, Settings, capacity_bound, main, simulate

KEYS = ("workers", "chunks", "driver_us_per_chunk", "rss_mb", "makespan_over_bound", "makespan_s", "bound_s",
        "idle_fraction", "series")


def test_cli_writes_the_json_and_the_plot(tmp_path):
    path, png = tmp_path / "sim.json", tmp_path / "sim.png"
    main(["--workers", "50", "--chunks", "2000", "--json", str(path), "--plot", str(png)])
    r = json.loads(path.read_text())
    assert all(k in r for k in KEYS), sorted(set(KEYS) - set(r))
    assert (r["workers"], r["chunks"], r["chunks_in_output"], r["given_up"]) == (50, 2000, 2000, 0)
    assert r["makespan_over_bound"] >= 1.0  # the bound is a lower bound
    assert 0.0 <= r["idle_fraction"] < 1.0 and r["driver_us_per_chunk"] > 0 and r["rss_mb"] > 0
    assert png.stat().st_size > 10_000


def test_with_every_fault_every_chunk_is_in_the_output_exactly_once():
    s = Settings(workers=50, chunks=2000, loss_rate=0.05, stragglers=0.05, preempt_rate=0.2, join_over=1.0,
                 speculate=True, speculate_factor=2.0, retries=10, seed=3)
    r = simulate(s)  # raises if the root misses a chunk or holds one twice
    assert r["lost_runs"] > 0 and r["preempted_runs"] > 0 and r["straggler_runs"] > 0
    assert r["chunks_in_output"] == 2000 and r["given_up"] == 0
    assert r["makespan_s"] >= r["bound_s"]


def test_out_of_attempts_chunks_are_in_the_failure_report_not_the_output():
    r = simulate(Settings(workers=20, chunks=500, loss_rate=0.5, retries=0, seed=2))
    assert r["given_up"] > 0  # the first loss aborts the run: that chunk and those not run are given up
    assert r["chunks_in_output"] + r["given_up"] == 500


def test_the_exactly_once_check_can_fail():
    with pytest.raises(AssertionError, match="two outputs"):
        Out.merge([Out(0, 0b11), Out(1, 0b1)])
    f = Facility(Settings(workers=5, chunks=40))
    f.run()
    f.result = Out.merge([Out(0, (1 << 39) - 1)])  # chunk 39 missing
    with pytest.raises(AssertionError, match="1 missing"):
        f.check_exactly_once()


def test_the_bound_counts_workers_as_they_join_and_leave():
    # one worker from 0, a second from 1: 1 worker-second by t=1, then 2 a second -> 3 by t=2
    assert capacity_bound([0.0, 1.0], [float("inf")] * 2, 3.0, 0.0) == pytest.approx(2.0)
    # the second leaves at 1.5: 1 + 1 by 1.5, then 1 a second -> 3 by 2.5
    assert capacity_bound([0.0, 1.0], [float("inf"), 1.5], 3.0, 0.0) == pytest.approx(2.5)
    assert capacity_bound([0.0], [1.0], 3.0, 0.0) == float("inf")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="--loss-rate"):
        Settings(loss_rate=1.5).check()
    with pytest.raises(SystemExit):
        main(["--workers", "0"])


def test_dask_at_scale_smoke():
    from casa_benchmarks.dask_at_scale import measure, predict

    before = threading.active_count()
    real = measure(workers=50, chunks=500, sleep_ms=5.0, waves=2)  # raises if the output is not 500 chunks
    assert real["attempts"] == 500 and real["engine_tasks"] >= 500 / 32
    assert real["makespan_s"] >= real["ideal_s"] and real["round_trip_ms"] > 0
    assert threading.active_count() < before + 10, "the cluster's 50 worker threads are still there"
    sim = predict(50, 500, 5.0, real["round_trip_ms"])
    assert sim["makespan_s"] >= sim["bound_s"] > 0


def test_a_lost_worker_is_noticed_loss_detect_s_later_and_speculation_covers_the_wait():
    base = dict(workers=20, chunks=400, loss_rate=0.05, seed=4)
    at_once = simulate(Settings(**base, loss_detect_s=0.0))
    late = simulate(Settings(**base, loss_detect_s=30.0))
    assert at_once["lost_runs"] > 0 and at_once["chunks_in_output"] == late["chunks_in_output"] == 400
    assert late["makespan_s"] > 30.0 > at_once["makespan_s"]  # a lost task's chunks wait for the timeout
    covered = simulate(Settings(**base, loss_detect_s=30.0, speculate=True))
    assert covered["speculated"] > 0 and covered["makespan_s"] < 0.5 * late["makespan_s"]


def test_stragglers_and_losses_are_duplicated_while_chunks_wait_and_the_output_stays_exactly_once():
    base = dict(workers=50, chunks=5000, loss_rate=0.01, stragglers=0.01, seed=1)
    plain, spec = simulate(Settings(**base)), simulate(Settings(**base, speculate=True))
    assert plain["speculated"] == 0 and spec["speculated"] > 0 and spec["cancelled"] > 0
    assert spec["chunks_in_output"] == plain["chunks_in_output"] == 5000  # each checked exactly once
    assert spec["makespan_over_bound"] < plain["makespan_over_bound"]


def test_an_engine_without_priorities_runs_duplicates_behind_the_queue():
    base = dict(workers=50, chunks=5000, loss_rate=0.01, stragglers=0.01, seed=1, speculate=True)
    first, fifo = simulate(Settings(**base)), simulate(Settings(**base, priorities=False))
    assert fifo["chunks_in_output"] == 5000 and fifo["makespan_s"] > first["makespan_s"]
    assert main(["--workers", "5", "--chunks", "50", "--no-priorities"])["priorities"] is False


def test_the_simulated_rules_are_the_drivers():
    from casa_executors.backends.base import Backend
    from casa_executors.driver import Driver, run_rules
    from casa_executors.outputs import EnginePlacement
    from casa_benchmarks.facility_sim import _SimBackend, rules_for

    s = Settings(workers=300, chunks=50_000, speculate=True)
    backend = _SimBackend(300)
    assert isinstance(backend, Backend)
    driver = Driver(backend=backend, speculate=True)
    expected = run_rules(driver, EnginePlacement(backend, 1), 50_000)
    # the same rules; the simulator's floor on a straggler's limit is shorter (its tasks last seconds)
    assert rules_for(s) == dataclasses.replace(expected, speculate_min_s=s.speculate_min_s)
    assert (expected.window, expected.batch, expected.speculate) == (2400, 32, True)


def test_a_cancelled_copy_runs_on_unless_the_engine_stops_it():
    base = dict(workers=50, chunks=5000, stragglers=0.02, seed=2, speculate=True)
    runs_on, stopped = simulate(Settings(**base)), simulate(Settings(**base, cancel_stops=True))
    assert runs_on["cancelled"] > 0 and stopped["cancelled"] > 0
    # the same work, but the workers are not held by copies whose result is dropped
    assert stopped["busy_s"] < runs_on["busy_s"] and stopped["makespan_s"] < runs_on["makespan_s"]
    assert stopped["chunks_in_output"] == 5000
