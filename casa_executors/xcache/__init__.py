"""Reading data through XCache in production: routing, tokens, client settings.

Local XRootD servers for tests and benchmarks live in ``casa_executors.standins``.
"""

from .client_env import CLIENT_ENV, apply_client_env
from .router import CacheRouter
from .tokens import Token, TokenError, TokenPermissionError, authz_query, discover_token, redact

__all__ = [
    "CLIENT_ENV",
    "CacheRouter",
    "Token",
    "TokenError",
    "TokenPermissionError",
    "apply_client_env",
    "authz_query",
    "discover_token",
    "redact",
]
