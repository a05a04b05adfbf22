"""Map an input URL to the XCache(s) to read it through, with origin fail-over.

Pure and picklable: built on the driver, used on workers. ``candidates(url)``
gives ``[(label, url_to_open), ...]`` in the order to try: the cache (chosen
by consistent hashing when there are several), then the origin URL itself.
The worker-side reader (``casa_executors.source.MeteredSource``) tries them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .tokens import Token, authz_query, redact

XROOTD_SCHEMES = ("root", "xroot", "roots", "xroots")
Mode = Literal["plain", "forward"]


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def split_xrootd_url(url: str) -> tuple[str, str, str, str] | None:
    """``root://host:port//p?q`` -> ``("root", "host:port", "/p", "q")``; else None."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in XROOTD_SCHEMES:
        return None
    hostport, _, pathq = rest.partition("/")
    path, _, query = pathq.partition("?")
    if not hostport:
        return None
    return scheme.lower(), hostport, "/" + path.lstrip("/"), query


def check_endpoint(cache: object) -> str | None:
    """None if ``cache`` is an XCache endpoint (``root://host[:port]``, ``roots://``, ``xroot://``, ``xroots://``,
    or ``host[:port]``), else what is wrong with it."""
    if not isinstance(cache, str) or not cache.strip():
        return "an endpoint is a string, root://host[:port] or host[:port]"
    scheme, sep, rest = cache.strip().partition("://")
    if not sep:
        scheme, rest = "root", scheme.rstrip("/")
        if "/" in rest:
            return "give root://host[:port] or host[:port]"
    elif scheme.lower() not in XROOTD_SCHEMES:
        return f"the scheme must be one of {', '.join(s + '://' for s in XROOTD_SCHEMES)}, not {scheme}://"
    parts = urlsplit(f"{scheme}://{rest.rstrip('/')}")
    try:
        port = parts.port
    except ValueError:
        return "its port must be a number from 1 to 65535"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "its port must be a number from 1 to 65535"
    if parts.path.strip("/") or parts.query or parts.fragment:
        return "an endpoint is a host and a port, without a path"
    return None


def _normalize_endpoint(cache: str) -> str:
    why = check_endpoint(cache)
    if why is not None:
        raise ValueError(f"not an xrootd endpoint: {cache!r} ({why})")
    cache = cache.strip().rstrip("/")
    return cache if "://" in cache else "root://" + cache


def _strip_authz(query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "authz"]
    return urlencode(pairs, safe="/:")


class CacheRouter:
    """Route ``root://`` URLs through XCache; ``mode`` picks the URL form.

    ``plain``: ``root://cache//store/x.root`` (the cache has a fixed origin);
    ``forward``: ``root://cache//root://origin//store/x.root``.
    ``spares`` adds that many further caches (next on the ring) before the origin.
    """

    def __init__(
        self,
        caches: str | list[str],
        mode: Mode = "plain",
        token: Token | str | None = None,
        vnodes: int = 160,
        spares: int = 0,
    ) -> None:
        if mode not in ("plain", "forward"):
            raise ValueError(f"mode must be 'plain' or 'forward', not {mode!r}")
        if not isinstance(spares, int) or isinstance(spares, bool) or spares < 0:
            raise ValueError(f"spares must be a whole number >= 0, not {spares!r}")
        names = [caches] if isinstance(caches, str) else list(caches)
        self.caches = list(dict.fromkeys(_normalize_endpoint(c) for c in names))
        if not self.caches:
            raise ValueError("at least one cache endpoint is needed")
        self.mode: Mode = mode
        self.token = Token(token) if isinstance(token, str) else token
        self.vnodes, self.spares = vnodes, spares
        ring = sorted((_hash64(f"{c}#{i}"), n) for n, c in enumerate(self.caches) for i in range(vnodes))
        self._points = [h for h, _ in ring]
        self._owners = [n for _, n in ring]

    # -- routing ---------------------------------------------------------------
    def caches_for(self, key: str) -> list[str]:
        """Caches for a file key (its path), primary first, all distinct."""
        i = bisect.bisect(self._points, _hash64(key)) % len(self._points)
        out: list[str] = []
        for j in range(len(self._points)):
            c = self.caches[self._owners[(i + j) % len(self._points)]]
            if c not in out:
                out.append(c)
                if len(out) == len(self.caches):
                    break
        return out

    def _with_token(self, url: str) -> str:
        if self.token is None:
            return url
        base, _, query = url.partition("?")
        if any(k == "authz" for k, _ in parse_qsl(query)):
            return url  # an explicit token in the URL wins
        return f"{base}?{query + '&' if query else ''}{authz_query(self.token)}"

    def candidates(self, url: str) -> list[tuple[str, str]]:
        """``[(endpoint_label, url_to_open), ...]``: cache(s) first, then origin."""
        parts = split_xrootd_url(url)
        if parts is None:
            kind = "local" if "://" not in url or url.startswith("file://") else "direct"
            return [(kind, url)]
        scheme, hostport, path, query = parts
        origin = f"{scheme}://{hostport}"
        if origin in self.caches:  # already a cache URL: nothing to add
            return [(f"xcache:{origin}", self._with_token(url))]
        origin_url = f"{origin}/{path}" + (f"?{query}" if query else "")
        out = []
        for cache in self.caches_for(path)[: 1 + self.spares]:
            inner = origin_url if self.mode == "forward" else path + (f"?{query}" if query else "")
            out.append((f"xcache:{cache}", self._with_token(f"{cache}//{inner.lstrip('/')}")))
        out.append((f"origin:{origin}", self._with_token(origin_url)))
        return out

    def secrets(self) -> list[str]:
        """Strings to scrub from any text that may carry the token."""
        if self.token is None:
            return []
        raw = self.token.reveal()
        return list(dict.fromkeys([raw, quote(raw, safe=""), quote(raw)]))

    def describe(self, url: str) -> str:
        """The URL without any token, for logs and reports."""
        base, sep, query = url.partition("?")
        query = _strip_authz(query) if sep else ""
        return redact(base + (f"?{query}" if query else ""), self.token)

    def __repr__(self) -> str:
        tok = "yes" if self.token is not None else "no"
        return f"CacheRouter({self.caches!r}, mode={self.mode!r}, token={tok})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheRouter) and (self.caches, self.mode, self.token, self.vnodes, self.spares) == (
            other.caches,
            other.mode,
            other.token,
            other.vnodes,
            other.spares,
        )


def moved_fraction(before: CacheRouter, after: CacheRouter, keys: Iterable[str]) -> float:
    """Share of keys whose primary cache differs between two routers."""
    keys = list(keys)
    moved = sum(before.caches_for(k)[0] != after.caches_for(k)[0] for k in keys)
    return moved / max(1, len(keys))
