"""Executors reading real CMS events through a real XRootD origin + XCache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from analysis import Analysis, run, same
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from xrootd_fixtures import export_dir, require_xrootd

import casa_executors as ce
from casa_executors.errors import AllEndpointsFailed
from casa_executors.standins.issuer import LocalIssuer
from casa_executors.standins.xrootd import XCache, XRootDOrigin
from casa_executors.xcache.client_env import CLIENT_ENV

NAMES = ("a.root", "b.root", "c.root")
EXECUTORS = {
    "iterative": lambda **kw: ce.iterative(**{"status": False, "retries": 0, **kw}),
    "futures": lambda **kw: ce.futures(**{"workers": 2, "status": False, "retries": 0, **kw}),
}


@pytest.fixture(scope="module")
def export(sample_files):
    require_xrootd()
    with export_dir(dict(zip(NAMES, sample_files))) as d:
        yield d




def origin_urls(origin):
    return [origin.url(f"/store/{n}") for n in NAMES]


@pytest.mark.parametrize("name", EXECUTORS)
def test_through_cache_identical_and_bookkeeping_keeps_origin_urls(name, export, reference, no_leftover_processes):
    with XRootDOrigin(export) as origin, XCache(origin) as cache:
        urls = origin_urls(origin)
        ex = EXECUTORS[name](cache=cache.endpoint)
        metadata_cache: dict = {}
        runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=250, metadata_cache=metadata_cache)
        out = runner({"SingleMu": urls}, Analysis(), treename="Events")
        assert out["events"].value == 3000
        assert out.keys() == reference.keys()
        # same physics as a direct local read; bookkeeping names the user's URLs
        assert sorted(out["files"]) == sorted(urls)
        assert {m.filename for m in metadata_cache} == set(urls)
        assert {r.filename for r in ex.report.rows()} == set(urls)
        local = {os.path.basename(k): v for k, v in reference["files"].items()}
        assert {os.path.basename(k): v for k, v in out["files"].items()} == local
        for key in ("met", "jetpt"):
            assert (out[key].values(flow=True) == reference[key].values(flow=True)).all()
        s = ex.report.summary()
        assert s["served_by"] == {f"xcache:{cache.endpoint}": 12} and s["failovers"] == 0
        for n in NAMES:
            assert cache.cached_path(f"/store/{n}").exists()
            assert Path(str(cache.cached_path(f"/store/{n}")) + ".cinfo").exists()

        # origin gone: fully cached files are still served
        origin.stop()
        out2 = run(EXECUTORS[name](cache=cache.endpoint), urls)
        assert same(out2, out)


@pytest.mark.parametrize("name", EXECUTORS)
def test_cache_down_fails_over_to_origin_fast(name, export, no_leftover_processes):
    with XRootDOrigin(export) as origin, XCache(origin) as cache:
        urls = origin_urls(origin)
        direct = run(ce.iterative(status=False), urls)
        cache.stop()
        ex = EXECUTORS[name](cache=cache.endpoint)
        t0 = time.monotonic()
        out = run(ex, urls)
        took = time.monotonic() - t0
        assert same(out, direct)
        s = ex.report.summary()
        assert s["served_by"] == {f"origin:{origin.endpoint}": 12}
        # each file's first open (its metadata step) went from the dead cache to the origin; a chunk that found
        # the file's TTree kept from it reads through that source, and tries the dead cache no more
        pre = ex.report.preprocessing.rows
        assert len(pre) == len(NAMES) and all(r.failovers for r in pre), pre
        rows = [*pre, *ex.report.rows()]
        assert all(f.startswith(f"xcache:{cache.endpoint}: ") for r in rows for f in r.failovers)
        assert took < 60, f"fail-over took {took:.1f} s"  # guards against the client's 120 s defaults


@pytest.mark.parametrize("name", EXECUTORS)
def test_cache_back_serves_the_next_run_of_kept_trees(name, export, no_leftover_processes):
    """A worker keeps the TTrees of a run that failed over to the origin; the next run reads them
    through the cache again, once it is back (sources are opened anew, routed afresh, every run)."""
    with XRootDOrigin(export) as origin, XCache(origin) as cache:
        urls = origin_urls(origin)
        cache.stop()
        ex = EXECUTORS[name](cache=cache.endpoint)
        with ex:  # the same worker processes for both runs
            first = run(ex, urls)
            assert ex.report.summary()["served_by"] == {f"origin:{origin.endpoint}": 12}
            cache.start()
            time.sleep(int(CLIENT_ENV["XRD_STREAMERRORWINDOW"]) + 1)  # XrdCl shuns a failed endpoint this long
            second = run(ex, urls)
        s = ex.report.summary()
        assert s["served_by"] == {f"xcache:{cache.endpoint}": 12} and s["failovers"] == 0, s
        # each file's baskets again, not only each chunk's file header (~700 B): nothing read kept from the
        # first run (within a run, a file's later chunks on a worker share the baskets its first one read)
        for n in NAMES:
            read = [r.bytes_read for r in ex.report.rows() if r.filename.endswith(n)]
            assert max(read) > 10_000, (n, read)
        assert same(first, second)


def test_both_down_and_missing_file_are_clear_errors(export, no_leftover_processes):
    with XRootDOrigin(export) as origin, XCache(origin) as cache:
        missing = origin.url("/store/missing.root")
        with pytest.raises(AllEndpointsFailed, match=r"preprocessing of .*//store/missing\.root") as err:
            run(EXECUTORS["iterative"](cache=cache.endpoint), [missing])
        assert "could not read" in str(err.value) and missing in str(err.value)
        assert type(err.value) is AllEndpointsFailed and err.value.url == missing and err.value.phase == "preprocessing"
        # skipbadfiles: the missing file is skipped (it is an OSError), the good one read
        ex = EXECUTORS["futures"](cache=cache.endpoint)
        with pytest.warns(UserWarning):
            out = run(ex, [missing, origin.url("/store/a.root")], skipbadfiles=True)
        assert out["events"].value == 1000 and ex.report.failed_files() == {"SingleMu": [missing]}
        urls = origin_urls(origin)
        cache.stop()
        origin.stop()
        ex = EXECUTORS["iterative"](cache=cache.endpoint)
        pattern = r"could not read root://127\.0\.0\.1:\d+//store/a\.root: xcache:.*origin:"
        with pytest.raises(AllEndpointsFailed, match=pattern) as err:
            run(ex, urls[:1])
        assert type(err.value) is AllEndpointsFailed and len(err.value.errors) == 2  # the cache's, the origin's


@pytest.fixture(scope="module")
def issuer():
    return LocalIssuer()


@pytest.mark.parametrize("name", EXECUTORS)
def test_token_protected_origin_through_cache(name, export, issuer, capfd, tmp_path, no_leftover_processes):
    with XRootDOrigin(export, token_issuer=issuer) as origin, XCache(origin) as cache:
        urls = origin_urls(origin)[:1]
        good = issuer.mint()
        ex = EXECUTORS[name](cache=cache.endpoint, token=good, status=True)
        out = run(ex, urls)
        assert out["events"].value == 1000
        assert ex.report.summary()["served_by"] == {f"xcache:{cache.endpoint}": 4}
        report_json = ex.report.to_json(str(tmp_path / "r.json"))
        for bad in ("missing", "expired", "scope"):
            token = {"missing": False, "expired": issuer.mint(lifetime=-300),
                     "scope": issuer.mint(scope="storage.read:/elsewhere")}[bad]
            ex = EXECUTORS[name](cache=cache.endpoint, token=token, status=True)
            with pytest.raises(AllEndpointsFailed) as err:  # the worker's own, rebuilt on the driver by futures
                run(ex, urls)
            assert type(err.value) is AllEndpointsFailed and err.value.url == urls[0]
            text = str(err.value) + repr(err.value.__cause__) + ex.report.to_json() + str(ex.report)
            assert "could not read" in text and urls[0] in text
            if bad != "missing":
                assert token not in text
                assert token[:40] not in json.dumps(ex.report.summary())
        printed = capfd.readouterr()
        for secret in (good, issuer.mint(lifetime=-300)):
            assert secret not in printed.out + printed.err
        assert good not in report_json and good not in repr(ex)


def test_token_discovery_refuses_a_file_others_can_read(tmp_path, monkeypatch):
    f = tmp_path / "bt"
    f.write_text("eyJ.secret.token\n")
    f.chmod(0o644)
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(f))
    monkeypatch.delenv("BEARER_TOKEN", raising=False)
    with pytest.raises(Exception, match=str(f)) as err:
        ce.iterative(cache="root://127.0.0.1:1094")
    assert "secret" not in str(err.value)
    f.chmod(0o600)
    ex = ce.iterative(cache="root://127.0.0.1:1094")
    assert ex.router.token is not None and "secret" not in repr(ex) + repr(ex.router)


def test_several_caches_spread_files_consistently(export, reference, no_leftover_processes):
    with XRootDOrigin(export) as origin, XCache(origin) as c1, XCache(origin) as c2:
        urls = origin_urls(origin)
        ex = EXECUTORS["futures"](cache=[c1.endpoint, c2.endpoint])
        out = run(ex, urls)
        assert out["events"].value == 3000
        by_file = {}
        for r in ex.report.rows():
            by_file.setdefault(r.filename, set()).update(r.endpoints)
        assert all(len(v) == 1 for v in by_file.values())  # a file always goes to the same cache
        expected = {u: f"xcache:{ex.router.caches_for(u.split('//', 2)[2].join(['/', '']))[0]}" for u in urls}
        assert {u: next(iter(v)) for u, v in by_file.items()} == expected


def test_cache_spares_read_from_the_next_cache_before_the_origin(export, no_leftover_processes):
    with XRootDOrigin(export) as origin, XCache(origin) as c1, XCache(origin) as c2:
        urls = origin_urls(origin)
        ex = EXECUTORS["iterative"](cache=[c1.endpoint, c2.endpoint], cache_spares=1)
        assert ex.router.spares == 1 and ex.copy().router == ex.router  # Runner copies the executor
        first = ex.router.caches_for("/store/a.root")  # a.root's cache, then its spare
        down, spare = (c1, c2) if first[0] == c1.endpoint else (c2, c1)
        down.stop()
        out = run(ex, urls)
        assert out["events"].value == 3000
        s = ex.report.summary()
        assert s["served_by"] == {f"xcache:{spare.endpoint}": 12}  # never the origin
        # a.root's first open (its metadata step) at least went from the dead cache to the spare
        pre = ex.report.preprocessing.rows
        assert any(r.failovers for r in pre if r.filename.endswith("/a.root")), pre
        rows = [*pre, *ex.report.rows()]
        assert all(f.startswith(f"xcache:{down.endpoint}: ") for r in rows for f in r.failovers)
    for bad in (-1, "1", True):
        with pytest.raises(ce.ExecutorOptionError, match="cache_spares"):
            ce.iterative(cache="root://127.0.0.1:1094", cache_spares=bad)
