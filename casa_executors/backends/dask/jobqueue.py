"""dask-jobqueue workers that do not share the submitter's filesystem: the job carries their secrets.

A dask-jobqueue cluster with ``security=`` starts its workers with
``--tls-ca-file/--tls-cert/--tls-key <path>``: paths on the submitter's
machine, which a batch node may not have. :func:`shipping_secrets` wraps a
job class so that each job brings the files along:

- HTCondor (coffea-casa's layout): the files go in ``transfer_input_files``
  (and ``encrypt_input_files``); the worker finds them by name in the job's
  scratch directory, made private before it starts.
- Slurm, PBS, SGE, LSF...: the files' contents are embedded in the job script
  (which the batch system keeps readable by the job's owner and root only); the
  script writes them with ``umask 077`` into a fresh private directory, points
  the worker at them and removes them when the job ends.

``token_file=`` ships a bearer token file the same way and sets
``BEARER_TOKEN_FILE`` for the worker (the executor itself ships its token with
each task; this is for code on the workers that discovers tokens itself).
Nothing is printed; the worker runs with ``umask 077``, so what it writes is
its own.

    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob
    cluster = SLURMCluster(..., security=cluster_security(secrets_dir), job_cls=shipping_secrets(SLURMJob))
"""

from __future__ import annotations

import base64
import os
import shlex
from pathlib import Path
from typing import Any

from casa_executors.errors import ExecutorOptionError

SECRETS_VAR = "CASA_JOB_SECRETS"  # the job's private directory of shipped files
TOKEN_NAME = "bearer_token"


def _worker_files(security: Any) -> dict[str, str]:
    """Absolute path -> the name the job gives it, for every TLS file a worker needs."""
    files: dict[str, str] = {}
    if security is None:
        return files
    for key, value in security.get_tls_config_for_role("worker").items():
        if key == "ciphers" or not value:
            continue
        if "\n" in value:
            raise ExecutorOptionError(
                "shipping_secrets: the Security holds certificates in memory; give it files "
                "(casa_executors.backends.dask.security.cluster_security(secrets_dir))"
            )
        path = str(Path(value).resolve())
        if path not in files:
            base = Path(path).name
            taken = set(files.values())
            files[path] = base if base not in taken else f"{len(files)}-{base}"
    return files


def shipping_secrets(job_cls: type, token_file: str | os.PathLike[str] | None = None) -> type:
    """A subclass of the dask-jobqueue ``job_cls`` whose jobs carry the worker's TLS files (and a token file)."""
    from dask_jobqueue.htcondor import HTCondorJob

    token = str(Path(token_file).resolve()) if token_file is not None else None
    if token is not None and not Path(token).is_file():
        raise ExecutorOptionError(f"shipping_secrets: token_file {token} does not exist")
    transfer = issubclass(job_cls, HTCondorJob)

    class Shipping(job_cls):
        def __init__(self, *args: Any, security: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, security=security, **kwargs)
            files = _worker_files(security)
            if token is not None:
                files[token] = Path(token).name if transfer else TOKEN_NAME
            if transfer and len(set(files.values())) < len(files):
                raise ExecutorOptionError(f"shipping_secrets: HTCondor transfers files by name; these share one: "
                                          f"{sorted(files)}")
            # a certificate file that holds its key leaves the worker role's key unset: dask-jobqueue
            # would still pass "--tls-key None", a file that does not exist
            for flag in ("--tls-key", "--tls-cert"):
                self._command_template = self._command_template.replace(f" {flag} None", "")
            if files:
                (self._transfer if transfer else self._embed)(files)

        def _point_at(self, files: dict[str, str], where: str) -> None:
            for path, name in files.items():
                self._command_template = self._command_template.replace(path, f'"{where}/{name}"')

        def _embed(self, files: dict[str, str]) -> None:
            d = f"${SECRETS_VAR}"
            lines = [
                "umask 077",
                f'{SECRETS_VAR}=$(mktemp -d "${{TMPDIR:-/tmp}}/casa-job.XXXXXXXX") || exit 1',
                f"trap 'rm -rf \"{d}\"' EXIT",
            ]
            for path, name in files.items():
                data = base64.b64encode(Path(path).read_bytes()).decode()
                lines.append(f"echo {data} | base64 -d > \"{d}/{name}\"")
            if token is not None:
                lines.append(f'export BEARER_TOKEN_FILE="{d}/{TOKEN_NAME}"')
            self._point_at(files, d)
            self._job_script_prologue = lines + list(self._job_script_prologue or [])
            # in the background, so that a cancelled job removes the files at once, not after the worker
            # has stopped (Slurm's SIGKILL may come first), and again once it has
            self._command_template = "\n".join([
                f"{self._command_template} &",
                "child=$!",
                f"trap 'rm -rf \"{d}\"; kill -TERM $child 2>/dev/null; wait $child; rm -rf \"{d}\"; exit 143' "
                "TERM INT",
                'wait "$child"',
            ])

        def _transfer(self, files: dict[str, str]) -> None:
            # HTCondor puts transferred files in the job's scratch directory (its working directory)
            names = ", ".join(files)
            self.job_header_dict.update({
                "should_transfer_files": "YES",
                "when_to_transfer_output": "ON_EXIT_OR_EVICT",
                "transfer_input_files": names,
                "encrypt_input_files": names,
            })
            for path, name in files.items():
                self._command_template = self._command_template.replace(path, shlex.quote(name))
            private = "umask 077; chmod 600 " + " ".join(shlex.quote(n) for n in files.values())
            if token is not None:
                private += f'; export BEARER_TOKEN_FILE="$_CONDOR_SCRATCH_DIR/{files[token]}"'
            self._command_template = f"{private}; {self._command_template}"

    Shipping.__name__ = Shipping.__qualname__ = f"Shipping{job_cls.__name__}"
    return Shipping
