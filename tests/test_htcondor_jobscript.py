"""HTCondor: no pool exists here (Debian has no package; PyPI's htcondor holds only bindings), so what is
tested is the submit description dask-jobqueue's HTCondorCluster generates for the coffea-casa layout.

The Slurm variant of the same helper (secrets embedded in the job script) runs for real in
tests/test_slurm_dask.py.
"""

from __future__ import annotations

import os
import re
import shlex
import stat

import pytest

from casa_executors.backends.dask.security import make_secrets_dir

pytest.importorskip("dask_jobqueue")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """coffea-casa's secrets: ca.pem, hostcert.pem, usercert.pem, and a bearer token file (mode 600)."""
    d = make_secrets_dir(tmp_path_factory.mktemp("cmsaf-secrets"))
    token = d / "xcache_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.sig")
    return d, token


def submit_description(cluster) -> tuple[dict[str, str], str]:
    """The submit file's ``key = value`` lines, and the shell command the job runs."""
    text = cluster.job_script()
    header = dict(re.findall(r"^([\w.]+) = (.*)$", text, re.M))
    arguments = re.search(r'^Arguments = "(.*)"$', text, re.M).group(1)
    # HTCondor's "new" argument quoting: "" stands for " (and '' for ', which the command does not contain)
    assert "''" not in arguments
    argv = shlex.split(arguments.replace('""', '"'))
    assert argv[0] == "-c"
    return header, argv[1]


@pytest.fixture
def htcondor_cluster(layout):
    from dask_jobqueue import HTCondorCluster
    from dask_jobqueue.htcondor import HTCondorJob

    from casa_executors.backends.dask.jobqueue import shipping_secrets
    from casa_executors.backends.dask.security import cluster_security

    secrets, token = layout
    cluster = HTCondorCluster(
        cores=1, memory="2GB", disk="1GB", security=cluster_security(secrets),
        job_cls=shipping_secrets(HTCondorJob, token_file=token),
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
    )
    yield cluster
    cluster.close()


def test_tls_files_and_token_travel_with_the_job(htcondor_cluster, layout):
    secrets, token = layout
    header, command = submit_description(htcondor_cluster)
    shipped = [secrets / "ca.pem", secrets / "usercert.pem", token]
    assert header["should_transfer_files"] == "YES"
    transferred = [s.strip() for s in header["transfer_input_files"].split(",")]
    assert transferred == [str(p.resolve()) for p in shipped]
    assert header["encrypt_input_files"] == header["transfer_input_files"]
    assert str(secrets / "hostcert.pem") not in htcondor_cluster.job_script()  # the scheduler's key stays here

    # the worker reads the transferred copies in its scratch directory, by name, after making them private
    argv = shlex.split(command.split("; ")[-1])

    def after(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert after("--tls-ca-file") == "ca.pem" and after("--tls-cert") == "usercert.pem"
    assert "--tls-key" not in argv  # usercert.pem holds the key; no "--tls-key None"
    assert after("--protocol") == "tls://"
    assert command.startswith("umask 077; chmod 600 ca.pem usercert.pem xcache_token; ")
    assert 'export BEARER_TOKEN_FILE="$_CONDOR_SCRATCH_DIR/xcache_token"' in command

    # the secret itself is never in the submit description, and its file stays private here
    assert token.read_text() not in htcondor_cluster.job_script()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_without_a_token_file_only_tls_travels(layout):
    from dask_jobqueue import HTCondorCluster
    from dask_jobqueue.htcondor import HTCondorJob

    from casa_executors.backends.dask.jobqueue import shipping_secrets
    from casa_executors.backends.dask.security import cluster_security

    secrets, _ = layout
    cluster = HTCondorCluster(cores=1, memory="2GB", disk="1GB", security=cluster_security(secrets),
                              job_cls=shipping_secrets(HTCondorJob),
                              scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    try:
        header, command = submit_description(cluster)
    finally:
        cluster.close()
    assert header["transfer_input_files"].count(",") == 1 and "BEARER_TOKEN_FILE" not in command


def test_bad_token_file_is_named(tmp_path):
    from dask_jobqueue.htcondor import HTCondorJob

    from casa_executors.backends.dask.jobqueue import shipping_secrets
    from casa_executors.errors import ExecutorOptionError

    with pytest.raises(ExecutorOptionError, match="missing-token"):
        shipping_secrets(HTCondorJob, token_file=tmp_path / "missing-token")
