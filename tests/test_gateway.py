"""dask-gateway: a real dask-gateway-server (local backend) with password users alice and bob.

The executor creates alice's cluster, scales it, runs an ADL query over TLS through the
gateway's proxy and shuts it down; bob can neither see nor use it. Errors: a wrong password, an
unreachable gateway. (Workers as Slurm jobs through the gateway: tests/test_gateway_slurm.py.)
"""

from __future__ import annotations

import os
import socket
import stat
import time

import psutil
import pytest
from analysis import FACILITY_QUERY, assert_adl_identical, run, same
from facility import wait_until

import casa_executors as ce
from casa_executors.errors import BackendUnavailable, ExecutorOptionError


def gateway_client(gw, user, password=None):
    from dask_gateway import Gateway

    return Gateway(gw.address, auth=gw.auth(user, password))


def close(*gateways) -> None:
    from casa_executors.backends.dask.gateway import close_gateway

    for g in gateways:
        close_gateway(g)


def listening(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}


def test_stand_in_listens_on_loopback_and_keeps_passwords_private(gateway):
    assert gateway.health()["status"] == "pass"
    server = psutil.Process(gateway.pid)
    for p in [server, *server.children()]:
        assert listening(p.pid) <= {"127.0.0.1"}, p.name()
    config = gateway.dir / "config.py"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(gateway.dir.stat().st_mode) == 0o700


def test_alice_creates_scales_runs_and_shuts_down_bob_cannot_see_it(gateway, sample_files):
    from casa_executors.backends.dask import DaskBackend

    backend = DaskBackend(gateway=gateway.address, auth=("alice", "alice-pw"), workers=2, worker_timeout=60)
    backend.hold()
    try:
        backend._client.wait_for_workers(2, timeout=60)
        name = backend.cluster_name
        alice, bob = gateway_client(gateway, "alice"), gateway_client(gateway, "bob")
        try:
            assert [c.name for c in alice.list_clusters()] == [name]
            assert bob.list_clusters() == []  # bob does not see it...
            with pytest.raises(BackendUnavailable, match=r"does not let user 'bob' use cluster .*403"):
                run(ce.dask(gateway=gateway.address, auth=("bob", "bob-pw"), cluster=name, status=False),
                    sample_files)  # ...nor use it
            with pytest.raises(Exception, match="403"):
                bob.stop_cluster(name)  # ...nor stop it
        finally:
            close(alice, bob)

        # over TLS, through the gateway's proxy, with the cluster's own certificate
        assert backend._client.scheduler.address.startswith("gateway://127.0.0.1:")
        assert all(a.startswith("tls://") for a in backend._client.scheduler_info()["workers"])
        assert_adl_identical(backend, sample_files, queries=FACILITY_QUERY)
    finally:
        backend.release()
    alice = gateway_client(gateway, "alice")
    try:
        assert wait_until(lambda: not alice.list_clusters(), 30), "the cluster we created is shut down"
    finally:
        close(alice)
    assert wait_until(lambda: not gateway.leftovers(), 20), gateway.leftovers()


def test_an_existing_cluster_is_used_and_left_running(gateway, sample_files, reference):
    alice = gateway_client(gateway, "alice")
    cluster = alice.new_cluster()
    try:
        ex = ce.dask(gateway=gateway.address, auth=gateway.auth("alice"), cluster=cluster.name, workers=1,
                     worker_timeout=60, status=False)
        assert same(run(ex, sample_files), reference)
        assert [c.name for c in alice.list_clusters()] == [cluster.name]  # still there: it is alice's
        client = cluster.get_client(set_as_default=False)
        try:  # the worker the run asked for is given back
            assert wait_until(lambda: not client.scheduler_info()["workers"], 30)
        finally:
            client.close()
    finally:
        cluster.shutdown()
        close(cluster.gateway, alice)


def test_wrong_password_and_unreachable_gateway_are_named(gateway, sample_files):
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"refused the credentials of user 'alice' \(401 Unauthorized\)"):
        run(ce.dask(gateway=gateway.address, auth=("alice", "not-her-password"), status=False), sample_files)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused, and no other process
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"  # can listen there while we hold it
        with pytest.raises(BackendUnavailable, match=f"cannot reach the gateway at {nowhere}"):
            run(ce.dask(gateway=nowhere, auth=("alice", "x"), status=False), sample_files)
    assert time.monotonic() - t0 < 30
    assert "not-her-password" not in repr(ce.dask(gateway=gateway.address, auth=("alice", "not-her-password")))


def test_gateway_options_are_checked(gateway):
    with pytest.raises(ExecutorOptionError, match="give one of client=, address=, cluster=, gateway="):
        ce.dask(gateway=gateway.address, address="tcp://127.0.0.1:1")
    with pytest.raises(ExecutorOptionError, match="auth="):
        ce.dask(auth=("alice", "pw"))
    with pytest.raises(ExecutorOptionError, match="auth must be"):
        ce.dask(gateway=gateway.address, auth=42)
    with pytest.raises(ExecutorOptionError, match="gateway must be"):
        ce.dask(gateway="gateway.example:8000")
    with pytest.raises(ExecutorOptionError, match="cluster_options"):
        ce.dask(cluster_options={"worker_memory": 2})
    assert os.environ.get("DASK_GATEWAY__ADDRESS") is None  # nothing leaked into the environment
