"""Reading data through XCache: real test servers, token handling, routing."""

from .client_env import CLIENT_ENV, apply_client_env
from .router import AllCandidatesFailed, CacheRouter, try_candidates
from .tokens import Token, TokenError, TokenPermissionError, authz_query, discover_token, redact

__all__ = [
    "CLIENT_ENV",
    "AllCandidatesFailed",
    "CacheRouter",
    "Token",
    "TokenError",
    "TokenPermissionError",
    "apply_client_env",
    "authz_query",
    "discover_token",
    "redact",
    "try_candidates",
]
