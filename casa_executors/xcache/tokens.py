"""WLCG bearer-token discovery and handling that never leaks the secret.

Discovery order (WLCG Bearer Token Discovery): explicit ``token=``,
``BEARER_TOKEN``, ``BEARER_TOKEN_FILE``, ``$XDG_RUNTIME_DIR/bt_u$UID``,
``/tmp/bt_u$UID``. A token file that group or others may read is refused.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

REDACTED = "<redacted-token>"  # the one placeholder for a scrubbed secret
# "Bearer <jwt>" in any URL-ish spelling: space, %20, +.
_BEARER_RE = re.compile(r"(Bearer(?:%20|\+|\s)+)[A-Za-z0-9._~+/=%-]+")


class TokenError(RuntimeError):
    """A token source is configured but unusable (message names the source only)."""


class TokenPermissionError(TokenError, PermissionError):
    """A token file is readable by group or others."""


class Token:
    """A bearer token whose ``repr``/``str`` never show the secret."""

    __slots__ = ("_secret", "source")

    def __init__(self, secret: str, source: str = "explicit") -> None:
        secret = secret.strip()
        if not secret or any(c.isspace() for c in secret):
            raise TokenError(f"token from {source} is empty or contains whitespace")
        self._secret = secret
        self.source = source

    def reveal(self) -> str:
        """The raw token; use only to build a request."""
        return self._secret

    def __repr__(self) -> str:
        return f"Token({REDACTED}, source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and other._secret == self._secret

    def __hash__(self) -> int:
        return hash(self._secret)

    def __getstate__(self) -> tuple[str, str]:
        return self._secret, self.source

    def __setstate__(self, state: tuple[str, str]) -> None:
        self._secret, self.source = state


def read_token_file(path: str | os.PathLike[str]) -> Token:
    """Read a token file, refusing one that group/others can read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise TokenError(f"token file {p} does not exist") from None
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        raise TokenPermissionError(
            f"token file {p} is readable by group/others (mode {stat.filemode(st.st_mode)}); "
            f"refusing to use it: run `chmod 600 {p}`"
        )
    return Token(p.read_text(), source=f"file {p}")


def default_token_files() -> list[Path]:
    uid = os.getuid()
    files = []
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(xdg) / f"bt_u{uid}")
    files.append(Path(f"/tmp/bt_u{uid}"))
    return files


def discover_token(token: Token | str | None = None) -> Token | None:
    """Find a bearer token (see module doc); ``None`` when there is none."""
    if isinstance(token, Token):
        return token
    if token is not None:
        return Token(token, source="explicit")
    if env := os.environ.get("BEARER_TOKEN"):
        return Token(env, source="$BEARER_TOKEN")
    if fname := os.environ.get("BEARER_TOKEN_FILE"):
        return read_token_file(fname)  # configured explicitly: errors are raised
    for path in default_token_files():
        if path.is_file():
            return read_token_file(path)
    return None


def authz_query(token: Token | str) -> str:
    """``authz=Bearer%20<jwt>``: the CGI xrootd's token plugins read."""
    secret = token.reveal() if isinstance(token, Token) else token
    return "authz=" + quote(f"Bearer {secret}", safe="")


def redact(text: str, secrets: Token | str | Iterable[Token | str] | None = None) -> str:
    """Replace each secret (raw or URL-quoted) and any ``Bearer <x>`` in ``text`` by :data:`REDACTED`.

    The one scrubber: router URLs, fail-over errors, worker exceptions and tracebacks go through it.
    """
    items = [secrets] if isinstance(secrets, Token | str) else list(secrets or ())
    for item in items:
        secret = item.reveal() if isinstance(item, Token) else item
        if secret:
            for form in sorted({secret, quote(secret, safe=""), quote(secret)}, key=len, reverse=True):
                text = text.replace(form, REDACTED)
    return _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
