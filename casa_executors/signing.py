"""Authentication of what the output store and checkpoints hold.

Outputs are pickles, and unpickling runs code: a store or checkpoint folder that
other users of a facility can write would let them run code in the analyst's
workers and notebook. So every file :class:`~casa_executors.store.Store` writes
carries an HMAC-SHA256 tag over its key (``nodes/1/0``, ``manifest.json``) and
its payload, and a file is unpickled only once its tag checks out. The key in
the tag binds a file to its place: a genuine node copied over another is
refused too.

Keys are 32 random bytes (:mod:`secrets`):

* a run's store (``store=``, the temporary folder of local workers): made in
  the submitting process when the run starts, and handed to the workers inside
  the pickled ``Store`` that travels with every task (the channel that carries
  the processor's code). It is never written to the store.
* a checkpoint: it must outlive the process, so a resumed run can read what an
  earlier one wrote. It lives in a file of mode 0600 in a folder of mode 0700
  under the user's cache directory (``$XDG_CACHE_HOME/casa_executors/keys``,
  ``~/.cache/casa_executors/keys`` by default), named by a hash of the
  checkpoint's location and run key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from casa_executors.errors import UntrustedData

log = logging.getLogger(__name__)

KEY_BYTES = 32
TAG_BYTES = hashlib.sha256().digest_size
DOMAIN = b"casa_executors store file\0"  # a tag made here means nothing to another use of the same key


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a signing key is {KEY_BYTES} bytes, got {type(key).__name__} of {len(key or b'')}")
    return key


def tag(key: bytes, name: str, payload: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of the file's ``name`` (its key in the store) and its ``payload``."""
    if "\0" in name:
        raise ValueError(f"a store key cannot hold a NUL byte: {name!r}")
    mac = hmac.new(key, DOMAIN + name.encode() + b"\0", hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def valid(key: bytes, name: str, payload: bytes | memoryview, expected: bytes) -> bool:
    return hmac.compare_digest(tag(key, name, payload), expected)


# -- checkpoint keys, kept where only the user reads them -------------------------------------------


def keys_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("casa_executors")) / "keys"


def checkpoint_key_path(location: str, run_key: str) -> Path:
    """The key file of the checkpoint at ``location`` (a canonical URL) for the run ``run_key``."""
    name = hashlib.blake2b(f"{location}\n{run_key}".encode(), digest_size=16).hexdigest()
    return keys_dir() / name


def _private_dir(folder: Path) -> None:
    """Make ``folder`` (mode 0700), or check that an existing one is ours and tighten it."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        raise UntrustedData(f"{folder}: the folder of checkpoint keys is not a folder of this user's; "
                            "keys kept there could be read or replaced by others")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)


def write_key(path: Path, key: bytes) -> None:
    """Write ``key`` to ``path`` (mode 0600, atomically: a reader sees the old key or the new one)."""
    check_key(key)
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_key(path: Path) -> bytes | None:
    """The key in ``path``; None when there is none. A key others could read or write is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a symbolic link put there (O_NOFOLLOW)
        raise UntrustedData(f"{path}: cannot open the checkpoint key safely ({exc})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise UntrustedData(f"{path}: the checkpoint key belongs to another user (uid {st.st_uid})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UntrustedData(f"{path}: the checkpoint key is open to others (mode {stat.S_IMODE(st.st_mode):04o}, "
                                "not 0600): whoever read it can forge checkpoint files. Delete it and start the "
                                "checkpoint over (checkpoint_restart=True)")
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise UntrustedData(f"{path}: a checkpoint key is {KEY_BYTES} bytes, this file holds {len(key)}")
    return key


def forget_key(path: Path) -> None:
    """Remove a key file whose checkpoint was deleted."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the checkpoint key %s: %s", path, exc)
