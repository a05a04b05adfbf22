"""Certificates in the coffea-casa layout, and the dask ``Security`` built from them.

A secrets directory holds three PEM files:

* ``ca.pem``: the certificate of the cluster's CA (no key);
* ``hostcert.pem``: the scheduler's certificate and key;
* ``usercert.pem``: the certificate and key of the workers and the client.

:func:`make_secrets_dir` creates such a directory with a fresh local CA (for
local use and tests; it needs the ``cryptography`` package).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from casa_executors.errors import ExecutorOptionError

if TYPE_CHECKING:
    from distributed import Security

CA, HOST, USER = "ca.pem", "hostcert.pem", "usercert.pem"
ROLES = {CA: "the CA certificate", HOST: "the scheduler's certificate and key", USER: "the user's certificate and key"}


def secrets_files(secrets_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The three files of ``secrets_dir``; a clear error names any that is missing."""
    root = Path(secrets_dir).expanduser()
    if not root.is_dir():
        raise ExecutorOptionError(f"secrets_dir {str(root)!r} is not a directory")
    files = {}
    for name, role in ROLES.items():
        path = root / name
        if not path.is_file():
            raise ExecutorOptionError(
                f"secrets_dir {str(root)!r} has no {name} ({role}); expected {', '.join(ROLES)} "
                "(casa_executors.backends.dask.make_secrets_dir makes a local set)"
            )
        files[name] = str(path.resolve())
    return files


def client_security(secrets_dir: str | os.PathLike[str]) -> Security:
    """TLS for a client (or worker) of a coffea-casa scheduler."""
    from distributed import Security

    f = secrets_files(secrets_dir)
    return Security(tls_ca_file=f[CA], tls_client_cert=f[USER], require_encryption=True)


def cluster_security(secrets_dir: str | os.PathLike[str]) -> Security:
    """TLS for every role: scheduler (host cert), workers and client (user cert)."""
    from distributed import Security

    f = secrets_files(secrets_dir)
    return Security(
        tls_ca_file=f[CA],
        tls_scheduler_cert=f[HOST],
        tls_worker_cert=f[USER],
        tls_client_cert=f[USER],
        require_encryption=True,
    )


def make_secrets_dir(
    path: str | os.PathLike[str], hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 30
) -> Path:
    """Create ``path`` with a new CA, a scheduler and a user certificate; return it.

    Private keys are written with mode 0600; the CA's key is not kept.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "casa_executors"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("casa_executors local CA")
    ca_cert = (builder(ca_name, ca_name, ca_key)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))

    def leaf(cn: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(name(cn), ca_name, key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(aki, critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                # workers and the scheduler both accept and open connections
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    (root / CA).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for file, cn in ((HOST, "dask-scheduler"), (USER, "casa-user")):
        target = root / file
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(leaf(cn))
        os.chmod(target, 0o600)
    return root
