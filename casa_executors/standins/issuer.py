"""A local WLCG token issuer for tests: RSA key, JWT minting, offline JWKS.

xrootd's ``libXrdAccSciTokens`` verifies tokens with scitokens-cpp, which looks
up the issuer's keys in an SQLite cache before going to the network:
``$XDG_CACHE_HOME/scitokens/scitokens_cpp.sqllite`` with table
``keycache(issuer text UNIQUE PRIMARY KEY NOT NULL, keys text NOT NULL)``;
``keys`` is the JSON ``{"jwks": <JWKS>, "next_update": <unix s>,
"expires": <unix s>}``. A row whose ``expires`` is past is deleted; after
``next_update`` a refresh is tried and its failure ignored.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

KEYCACHE_SCHEMA = "CREATE TABLE IF NOT EXISTS keycache (issuer text UNIQUE PRIMARY KEY NOT NULL,keys text NOT NULL)"


def _b64url_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class LocalIssuer:
    """Mints WLCG-profile tokens that a local xrootd verifies offline."""

    def __init__(
        self,
        issuer: str = "https://localhost/casa-test-issuer",
        audience: str = "https://xcache.casa.test",
        base_path: str = "/store",
        kid: str = "casa-test-rs256",
    ) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer, self.audience, self.base_path, self.kid = issuer, audience, base_path, kid
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        pub = self._key.public_key().public_numbers()
        key = {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": _b64url_uint(pub.n),
            "e": _b64url_uint(pub.e),
        }
        return {"keys": [key]}

    def mint(
        self,
        scope: str = "storage.read:/",
        lifetime: int = 600,
        audience: str | None = None,
        subject: str = "casa-test-user",
        now: int | None = None,
    ) -> str:
        """A signed JWT; a negative ``lifetime`` gives an expired token."""
        import jwt

        now = int(time.time()) if now is None else now
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.audience,
            "scope": scope,
            "wlcg.ver": "1.0",
            "jti": str(uuid.uuid4()),
            "iat": now - 5 if lifetime > 0 else now + lifetime - 60,
            "nbf": now - 5 if lifetime > 0 else now + lifetime - 60,
            "exp": now + lifetime,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def seed_keycache(self, xdg_cache_home: str | Path, valid_for: int = 7 * 86400) -> Path:
        """Write our JWKS into scitokens-cpp's key cache below ``xdg_cache_home``."""
        db = Path(xdg_cache_home) / "scitokens" / "scitokens_cpp.sqllite"
        db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = int(time.time())
        keys = json.dumps({"jwks": self.jwks(), "next_update": now + valid_for // 2, "expires": now + valid_for})
        with sqlite3.connect(db) as con:
            con.execute(KEYCACHE_SCHEMA)
            con.execute("INSERT OR REPLACE INTO keycache VALUES (?, ?)", (self.issuer, keys))
        con.close()
        return db

    def scitokens_config(self, base_paths: list[str] | None = None) -> str:
        """Config for ``ofs.authlib libXrdAccSciTokens.so config=FILE``.

        A token's ``/`` maps to each of ``base_paths`` (default: ``base_path``);
        a forwarding cache sees paths like ``/root:/host:port/store/f.root``.
        """
        return (
            "[Global]\n"
            f"audience = {self.audience}\n\n"
            "[Issuer casa-test]\n"
            f"issuer = {self.issuer}\n"
            f"base_path = {', '.join(base_paths or [self.base_path])}\n"
        )

    def __repr__(self) -> str:
        return f"LocalIssuer({self.issuer!r}, audience={self.audience!r})"
