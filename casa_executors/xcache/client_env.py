"""XRootD client settings so a dead server costs seconds, not minutes.

XrdCl reads these once, when the client library is first used in a process,
so call :func:`apply_client_env` before the first XRootD open (and in workers).
Timeouts are only checked every ``XRD_TIMEOUTRESOLUTION`` seconds (default 15).
"""

from __future__ import annotations

import os

CLIENT_ENV: dict[str, str] = {
    "XRD_TIMEOUTRESOLUTION": "1",  # check timeouts every second
    "XRD_CONNECTIONRETRY": "1",  # one connect attempt per open (default 5)
    "XRD_CONNECTIONWINDOW": "5",  # seconds allowed for that attempt (default 120)
    "XRD_REQUESTTIMEOUT": "60",  # a request, incl. redirects (default 1800)
    "XRD_STREAMTIMEOUT": "30",  # an idle stream with requests pending (default 60)
    # After a stream error XrdCl fails every request to that endpoint at once for
    # this long (default 1800 s: a restarted cache is shunned for 30 min).
    "XRD_STREAMERRORWINDOW": "5",
    "XRD_REDIRECTLIMIT": "8",
}


def apply_client_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``setdefault`` each setting into ``os.environ``; returns what was set."""
    applied = {}
    for key, value in (env or CLIENT_ENV).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied
