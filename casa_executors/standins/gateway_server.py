"""Server-side classes of the local dask-gateway stand-in, loaded by dask-gateway-server's config file.

- :class:`PasswordAuthenticator`: HTTP Basic auth against a password per user
  (dask-gateway's ``SimpleAuthenticator`` has one password for everybody, so
  anyone who knows it can be anyone).
- :class:`SlurmSharedAccountBackend`: dask-gateway's ``SlurmBackend`` with every
  user's jobs submitted from the gateway's own Unix account, so that it runs
  without ``sudo`` and without a Unix account per gateway user. Users are kept
  apart by the gateway (a cluster is listed, connected to and stopped only by
  its owner; its scheduler takes only TLS clients with its own certificate),
  not by Unix permissions. ``squeue``/``scancel`` get ``SLURM_CONF`` (stock
  ``SlurmBackend`` runs them with an empty environment, which finds no
  cluster and leaves jobs running); staging directories are per user below
  ``staging_root`` instead of below each user's home.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os

from dask_gateway_server.auth import Authenticator, User, unauthorized
from dask_gateway_server.backends.jobqueue.slurm import SlurmBackend
from traitlets import Dict, Unicode


class PasswordAuthenticator(Authenticator):
    """HTTP Basic authentication against ``passwords`` (user -> password)."""

    passwords = Dict(help="user name -> password", config=True)

    async def authenticate(self, request):
        kind, _, key = request.headers.get("Authorization", "").partition(" ")
        if kind != "Basic":
            raise unauthorized("Basic")
        try:
            user, _, password = base64.b64decode(key).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise unauthorized("Basic") from None
        expected = self.passwords.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            raise unauthorized("Basic")
        return User(user)


class SlurmSharedAccountBackend(SlurmBackend):
    """``SlurmBackend`` submitting as the gateway's own account (see the module doc)."""

    slurm_conf = Unicode(help="SLURM_CONF for sbatch, squeue and scancel", config=True)
    staging_root = Unicode(help="per-user staging directories go below this", config=True)

    default_host = "127.0.0.1"  # schedulers and workers of this one-node cluster listen on loopback only

    def _slurm_env(self) -> dict[str, str]:
        return {"SLURM_CONF": self.slurm_conf, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    def get_staging_directory(self, cluster):
        return os.path.join(self.staging_root, cluster.username, cluster.name)

    def get_submit_cmd_env_stdin(self, cluster, worker=None):
        cmd, env, script = super().get_submit_cmd_env_stdin(cluster, worker)
        return cmd, {**env, "SLURM_CONF": self.slurm_conf}, script

    def get_stop_cmd_env(self, job_id):
        cmd, env = super().get_stop_cmd_env(job_id)
        return cmd, {**env, **self._slurm_env()}

    def get_status_cmd_env(self, job_ids):
        cmd, env = super().get_status_cmd_env(job_ids)
        return cmd, {**env, **self._slurm_env()}

    async def do_as_user(self, user, action, **kwargs):
        """The stock launcher, run as this account (stock: ``sudo -nHu <user>``)."""
        os.makedirs(os.path.join(self.staging_root, user), mode=0o700, exist_ok=True)
        kwargs["action"] = action
        proc = await asyncio.create_subprocess_exec(
            self.dask_gateway_jobqueue_launcher,
            env={**self._slurm_env(), "HOME": os.path.join(self.staging_root, user)},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: os.umask(0o077),  # the cluster's TLS key lands in staging: owner-only
        )
        stdout, stderr = await proc.communicate(json.dumps(kwargs).encode("utf8"))
        if proc.returncode != 0:
            raise Exception(f"dask-gateway-jobqueue-launcher failed ({proc.returncode}): "
                            f"{stderr.decode('utf8', 'replace')}")
        result = json.loads(stdout.decode("utf8", "replace"))
        if not result["ok"]:
            raise Exception(result["error"])
        return result["returncode"], result["stdout"], result["stderr"]
