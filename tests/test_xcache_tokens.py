"""Bearer tokens: discovery, file permissions, redaction, and real token-protected servers."""

from __future__ import annotations

import os
import pickle
import traceback
from urllib.parse import quote

import pytest
from xrootd_fixtures import FILE, assert_same, export_dir, read_events, read_routed, require_xrootd

from casa_executors.errors import AllEndpointsFailed
from casa_executors.standins.issuer import LocalIssuer
from casa_executors.standins.xrootd import XCache, XRootDOrigin
from casa_executors.xcache.router import CacheRouter
from casa_executors.xcache.tokens import (
    REDACTED,
    Token,
    TokenError,
    TokenPermissionError,
    authz_query,
    default_token_files,
    discover_token,
    redact,
)

SECRET = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYXNhIn0.c2lnbmF0dXJlLXNlY3JldA"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("BEARER_TOKEN", "BEARER_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path


def _token_file(path, text=SECRET, mode=0o600):
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


# -- discovery and handling (no server) -----------------------------------------
def test_token_never_shows_its_secret():
    tok = Token(SECRET)
    assert SECRET not in repr(tok) and SECRET not in str(tok) and SECRET not in f"{tok}"
    assert tok.reveal() == SECRET
    assert pickle.loads(pickle.dumps(tok)) == tok
    with pytest.raises(TokenError):
        Token("  ")


def test_authz_query_and_redact():
    assert authz_query(SECRET) == f"authz=Bearer%20{SECRET}"
    url = f"root://h:1//store/f.root?a=1&{authz_query(Token(SECRET))}"
    assert SECRET not in redact(url, SECRET)
    assert redact(url) == f"root://h:1//store/f.root?a=1&authz=Bearer%20{REDACTED}"
    assert redact(f"Authorization: Bearer {SECRET}") == f"Authorization: Bearer {REDACTED}"
    # several secrets at once (a router's, a worker's error text), raw or URL-quoted: one placeholder
    text = f"{SECRET}/x?t={quote(SECRET + '/=', safe='')} and {SECRET}/="
    assert redact(text, [Token(SECRET + "/="), SECRET]) == f"{REDACTED}/x?t={REDACTED} and {REDACTED}"


def test_discovery_order(clean_env, monkeypatch):
    assert discover_token() is None or discover_token().source == f"file /tmp/bt_u{os.getuid()}"
    xdg_file = _token_file(clean_env / f"bt_u{os.getuid()}", "from-xdg")
    assert default_token_files() == [xdg_file, type(xdg_file)(f"/tmp/bt_u{os.getuid()}")]
    assert discover_token().reveal() == "from-xdg"
    env_file = _token_file(clean_env / "tok", "from-file")
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(env_file))
    assert discover_token().reveal() == "from-file"
    monkeypatch.setenv("BEARER_TOKEN", "from-env")
    assert discover_token().reveal() == "from-env"
    assert discover_token("explicit").reveal() == "explicit"
    assert discover_token(Token("object")).reveal() == "object"


def test_token_file_readable_by_others_is_refused(clean_env, monkeypatch):
    bad = _token_file(clean_env / "tok", mode=0o644)
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(bad))
    with pytest.raises(TokenPermissionError) as info:
        discover_token()
    assert str(bad) in str(info.value) and "chmod 600" in str(info.value)
    assert SECRET not in str(info.value)
    bad.chmod(0o640)  # group-readable is refused too
    with pytest.raises(TokenPermissionError):
        discover_token()
    bad.chmod(0o600)
    assert discover_token().reveal() == SECRET
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(clean_env / "absent"))
    with pytest.raises(TokenError, match="does not exist"):
        discover_token()


# -- real token-protected servers -----------------------------------------------
@pytest.fixture(scope="module")
def issuer():
    return LocalIssuer()


@pytest.fixture(scope="module")
def protected(issuer):
    require_xrootd()
    with (
        export_dir() as data,
        XRootDOrigin(data, token_issuer=issuer) as origin,
        XCache(origin) as cache,
        XCache(origin, forwarding=True) as fwd,
    ):
        yield origin, cache, fwd


@pytest.fixture(scope="module")
def direct(protected, issuer):
    return read_events(f"{protected[0].url(FILE)}?{authz_query(issuer.mint())}")


@pytest.mark.parametrize("server", ["origin", "cache", "forwarding cache"])
def test_valid_token_is_accepted(protected, issuer, direct, server):
    srv = protected[["origin", "cache", "forwarding cache"].index(server)]
    assert_same(read_events(f"{srv.url(FILE)}?{authz_query(issuer.mint())}"), direct)


@pytest.mark.parametrize("server", ["origin", "cache", "forwarding cache"])
@pytest.mark.parametrize("case", ["missing", "expired", "wrong scope", "wrong audience", "foreign issuer"])
def test_bad_token_is_refused(protected, issuer, server, case):
    srv = protected[["origin", "cache", "forwarding cache"].index(server)]
    token = {
        "missing": None,
        "expired": lambda: issuer.mint(lifetime=-300),
        "wrong scope": lambda: issuer.mint(scope="storage.read:/elsewhere storage.create:/"),
        "wrong audience": lambda: issuer.mint(audience="https://other.example"),
        "foreign issuer": lambda: LocalIssuer(issuer=issuer.issuer, kid=issuer.kid).mint(),
    }[case]
    url = srv.url(FILE) + (f"?{authz_query(token())}" if token else "")
    with pytest.raises(OSError, match="permission denied"):
        read_events(url)
    if case == "expired":  # this server itself checked the token
        assert "token expired" in srv.log_path.read_text(errors="replace")


def test_router_reads_protected_data_and_never_leaks_the_token(protected, issuer, direct):
    origin, cache, fwd = protected
    good = Token(issuer.mint(), source="test")
    for c, mode in ((cache, "plain"), (fwd, "forward")):
        arrays, io = read_routed(CacheRouter(c.endpoint, mode=mode, token=good), origin.url(FILE))
        assert io.endpoints == [f"xcache:{c.endpoint}"]
        assert_same(arrays, direct)

    for token in (good, Token(issuer.mint(scope="storage.read:/elsewhere"))):
        router = CacheRouter(cache.endpoint, token=token)
        secret = token.reveal()
        path = FILE if token is not good else "/store/missing.root"
        with pytest.raises(AllEndpointsFailed) as info:
            read_routed(router, origin.url(path))
        exc = info.value
        text = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)
        assert secret not in text
        assert origin.url(path) in str(exc)  # named, token-free
        assert all(secret not in s for s in (repr(router), router.describe(router.candidates(origin.url(path))[0][1])))
        assert set(router.secrets()) >= {secret}
