"""CacheRouter: URL forms, tokens, local paths, consistent hashing (no server).

The fail-over over its candidates is the production reader's (``MeteredSource``); with a
server it is exercised in test_xcache_servers.py, here only against ports nobody listens on.
"""

from __future__ import annotations

import collections
import pickle

import pytest

from casa_executors.errors import AllEndpointsFailed
from casa_executors.standins.ports import free_ports
from casa_executors.xcache.client_env import apply_client_env
from casa_executors.xcache.router import CacheRouter, moved_fraction
from casa_executors.xcache.tokens import Token

C1, C2 = "root://cache1:1094", "root://cache2:1094"
ORIGIN = "root://eos.example:1094"
URL = f"{ORIGIN}//store/data/f.root"
JWT = "aaa.bbb.ccc"
PATHS = [f"/store/mc/run{i // 100}/file{i}.root" for i in range(10_000)]


def test_plain_form_then_origin():
    assert CacheRouter(C1).candidates(URL) == [
        (f"xcache:{C1}", f"{C1}//store/data/f.root"),
        (f"origin:{ORIGIN}", URL),
    ]


def test_forward_form():
    assert CacheRouter(C1, mode="forward").candidates(URL) == [
        (f"xcache:{C1}", f"{C1}//{URL}"),
        (f"origin:{ORIGIN}", URL),
    ]


def test_single_slash_urls_and_bare_endpoints():
    router = CacheRouter("cache1:1094/")
    assert router.caches == [C1]
    assert router.candidates(f"{ORIGIN}/store/data/f.root") == router.candidates(URL)
    assert CacheRouter(C1).candidates("xroot://h//a.root")[0][1] == f"{C1}//a.root"


def test_token_is_appended_and_merged():
    router = CacheRouter(C1, token=JWT)
    (_, cache), (_, origin) = router.candidates(URL)
    assert cache == f"{C1}//store/data/f.root?authz=Bearer%20{JWT}"
    assert origin == f"{URL}?authz=Bearer%20{JWT}"
    (_, cache), _ = router.candidates(URL + "?svcClass=x")
    assert cache == f"{C1}//store/data/f.root?svcClass=x&authz=Bearer%20{JWT}"
    fwd = CacheRouter(C1, mode="forward", token=Token(JWT)).candidates(URL)[0][1]
    assert fwd == f"{C1}//{URL}?authz=Bearer%20{JWT}"
    explicit = URL + "?authz=Bearer%20mine"
    assert all(u.endswith("authz=Bearer%20mine") for _, u in router.candidates(explicit))


def test_describe_and_repr_are_token_free():
    router = CacheRouter(C1, token=JWT)
    for _, url in router.candidates(URL + "?a=1"):
        assert JWT not in router.describe(url)
        assert "a=1" in router.describe(url)
    assert router.describe(URL + f"?authz=Bearer%20{JWT}") == URL
    assert JWT not in repr(router) and all(JWT not in label for label, _ in router.candidates(URL))
    assert router.secrets()[0] == JWT and CacheRouter(C1).secrets() == []


@pytest.mark.parametrize("url", ["/data/f.root", "data/f.root", "file:///data/f.root", "https://h/f.root"])
def test_non_xrootd_urls_are_unchanged(url):
    assert CacheRouter([C1, C2], token=JWT).candidates(url) == [("direct" if url.startswith("https") else "local", url)]


def test_url_already_on_a_cache_is_not_wrapped():
    assert CacheRouter(C1).candidates(f"{C1}//store/f.root") == [(f"xcache:{C1}", f"{C1}//store/f.root")]


def test_picklable_and_stable():
    router = CacheRouter([f"root://c{i}:1094" for i in range(4)], mode="forward", token=JWT)
    clone = pickle.loads(pickle.dumps(router))
    assert clone == router
    assert [clone.candidates(f"{ORIGIN}/{p}") for p in PATHS[:500]] == [
        router.candidates(f"{ORIGIN}/{p}") for p in PATHS[:500]
    ]
    # the key is the path: the same file from another origin goes to the same cache
    assert router.caches_for("/store/x.root") == CacheRouter(list(reversed(router.caches))).caches_for("/store/x.root")


def test_consistent_hashing_balance_and_minimal_movement():
    caches = [f"root://c{i}:1094" for i in range(4)]
    four = CacheRouter(caches)
    counts = collections.Counter(four.caches_for(p)[0] for p in PATHS)
    assert set(counts) == set(caches)
    assert all(0.15 < n / len(PATHS) < 0.35 for n in counts.values()), counts

    five = CacheRouter([*caches, "root://c4:1094"])
    moved = moved_fraction(four, five, PATHS)
    assert 0.12 < moved < 0.28, moved  # ~1/5 of files move ...
    assert all(
        five.caches_for(p)[0] == "root://c4:1094"  # ... and only to the new cache
        for p in PATHS
        if four.caches_for(p)[0] != five.caches_for(p)[0]
    )

    three = CacheRouter(caches[:3])  # removing a cache moves only its own files
    assert all(three.caches_for(p)[0] == four.caches_for(p)[0] for p in PATHS if four.caches_for(p)[0] != caches[3])


def test_spares_give_distinct_caches_before_the_origin():
    router = CacheRouter([C1, C2, "root://cache3:1094"], spares=1)
    cands = router.candidates(URL)
    assert len(cands) == 3 and cands[0][0] != cands[1][0] and cands[-1][0] == f"origin:{ORIGIN}"


def test_bad_arguments():
    with pytest.raises(ValueError):
        CacheRouter(C1, mode="proxy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CacheRouter([])


def test_every_endpoint_failing_is_one_token_free_error():
    """Cache and origin both refuse: one AllEndpointsFailed naming the URL, never the token."""
    apply_client_env()  # before the XRootD client loads: a refused connection then fails at once
    pytest.importorskip("fsspec_xrootd", reason="the XRootD client (pip install casa_executors[xcache])")
    from xrootd_fixtures import read_routed
    cache_port, origin_port = free_ports(2)  # nobody listens on them
    cache, origin = f"root://127.0.0.1:{cache_port}", f"root://127.0.0.1:{origin_port}"
    url = f"{origin}//store/data/f.root"
    router = CacheRouter(cache, token=JWT)
    for given in (url, f"{url}?authz=Bearer%20{JWT}"):  # the token added by the router, or in the URL itself
        with pytest.raises(AllEndpointsFailed) as info:
            read_routed(router, given)
        assert url in str(info.value) and JWT not in str(info.value) + repr(info.value.args)
        assert f"xcache:{cache}" in str(info.value) and f"origin:{origin}" in str(info.value)  # both were tried
        assert info.value.__cause__ is None and info.value.__suppress_context__
