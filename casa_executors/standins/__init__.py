"""Local stand-ins of an analysis facility's services, for tests, benchmarks and demos.

Nothing here runs in production: these start real servers (XRootD origin and
XCache, a token issuer, a slow network link) on 127.0.0.1 so that the runtime
(``casa_executors.xcache``, the backends) can be exercised against the real
thing, in the spirit of ``distributed.utils_test``.

- ``xrootd``: an XRootD origin and an XCache, each in its own network namespace when root
- ``issuer``: a local WLCG token issuer whose keys the servers trust offline
- ``slowlink``: an origin behind a rate limit and a round-trip delay
- ``netns``, ``relay``: the namespaces and the loopback relay the servers sit behind
- ``ports``: free ports on 127.0.0.1 for all of them
- ``slurm``: a one-node Slurm (munged, slurmctld, slurmd) whose jobs run on this machine
- ``gateway``: a dask-gateway-server with password users, local or Slurm backend (``gateway_server``: its plugins)
"""
