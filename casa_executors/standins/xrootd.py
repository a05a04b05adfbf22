"""Real xrootd origin and XCache servers on 127.0.0.1 for tests and casa_benchmarks.

Each instance gets its own temp dir (config, adminpath, pidpath, logs),
is ready when its log says ``xrootd NAME@host:PORT initialization completed``
and is stopped by PID (SIGTERM, then SIGKILL). xrootd 5.5 cannot bind to one
address, so when we may (root) servers run in a private network namespace and
a relay publishes them on 127.0.0.1:PORT; the same PORT is used inside, so
``root://127.0.0.1:PORT`` names the same server for host clients and for a
cache in that namespace.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from casa_executors import procs

from .netns import NetNS, netns_available
from .ports import free_port

if TYPE_CHECKING:
    from .issuer import LocalIssuer

XROOTD_USER = "xrootd"
LOOPBACK = "127.0.0.1"
READY_RE = re.compile(r"------ xrootd \S+ initialization (completed|failed)")
CINFO_RE = re.compile(
    r"file_size (?P<size>\d+) kB.*?n_blocks (?P<blocks>\d+), "
    r"n_downloaded (?P<down>\d+), state (?P<state>\w+)"
)
RELAY = Path(__file__).with_name("relay.py")
# Ports inside our namespaces' ephemeral range never collide with host ports.
NETNS_EPHEMERAL = "61000 64999"
PLUGINS = ("libXrdPss-5.so", "libXrdPfc-5.so", "libXrdAccSciTokens-5.so")


class ServerError(RuntimeError):
    """A server failed to start; the message carries its log tail."""


def xrootd_available() -> bool:
    """xrootd, its client tools and the PSS/PFC/SciTokens plugins are installed."""
    if not (shutil.which("xrootd") and shutil.which("xrdcp")):
        return False
    libdirs = [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib")]
    return all(any((d / lib).exists() for d in libdirs) for lib in PLUGINS)


def _stop_proc(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Stop the process by PID (SIGTERM, SIGKILL after ``grace`` seconds) and close its pipes."""
    if proc is None:
        return
    procs.terminate([proc], grace=grace)
    for f in (proc.stdout, proc.stderr):
        if f:
            f.close()


def _as_root() -> bool:
    return os.geteuid() == 0


def _give_to_xrootd(*paths: Path) -> None:
    if _as_root():
        pw = pwd.getpwnam(XROOTD_USER)
        for p in paths:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def _check_traversable(path: Path, what: str) -> None:
    """As root, xrootd runs as user xrootd: every parent must be o+x."""
    if not _as_root():
        return
    uid = pwd.getpwnam(XROOTD_USER).pw_uid
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            raise ServerError(
                f"{what} {path} is not reachable by user {XROOTD_USER}: {p} has mode "
                f"{stat.filemode(st.st_mode)} (needs o+x); use a directory such as "
                f"tempfile.mkdtemp() + chmod 0755"
            )


_LIVE: set[XRootDServer] = set()  # not yet closed; closed at interpreter exit


@atexit.register
def _close_all() -> None:
    for srv in list(_LIVE):
        srv.close()


def reap_stale(tmpdir: str | None = None) -> None:
    """Stop servers whose owning Python process died (SIGKILL skips cleanup)."""
    base = Path(tmpdir or tempfile.gettempdir())
    for owner in [*base.glob("casa-origin-*/owner.pid"), *base.glob("casa-xcache-*/owner.pid")]:
        workdir = owner.parent
        try:
            if procs.alive(int(owner.read_text())):
                continue
            pids = map(int, (workdir / "pids").read_text().split())
            procs.kill(pid for pid in pids if str(workdir) in procs.cmdline(pid))  # still ours: work dir in argv
        except (OSError, ValueError):
            pass
        shutil.rmtree(workdir, ignore_errors=True)


class XRootDServer:
    """Base class: one xrootd process (+ relay) with its own directories."""

    kind = "xrootd"
    SERVER_ENV: dict[str, str] = {}

    def __init__(
        self,
        *,
        netns: NetNS | None = None,
        isolate: bool | None = None,
        token_issuer: LocalIssuer | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.token_issuer = token_issuer
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._relay: subprocess.Popen | None = None
        self._owns_netns = False
        if netns is None and (isolate or (isolate is None and netns_available())):
            netns, self._owns_netns = NetNS(self.kind), True
        elif netns is None:
            warnings.warn(
                "xrootd 5.5 listens on all interfaces and no network namespace is "
                "available (needs root): the server is reachable from outside",
                stacklevel=3,
            )
        self.netns = netns
        reap_stale()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"casa-{self.kind}-"))
        self.workdir.chmod(0o755)
        (self.workdir / "owner.pid").write_text(str(os.getpid()))
        _LIVE.add(self)
        for sub in ("adm", "run", "log", "xdg"):
            (self.workdir / sub).mkdir(mode=0o700 if sub == "xdg" else 0o755)
        _give_to_xrootd(*(self.workdir / s for s in ("adm", "run", "log", "xdg")))

    # -- configuration ---------------------------------------------------------
    def _config_lines(self) -> list[str]:
        raise NotImplementedError

    def _auth_lines(self) -> list[str]:
        if self.token_issuer is None:
            return []
        cfg = self.workdir / "scitokens.cfg"
        cfg.write_text(self.token_issuer.scitokens_config(self._token_base_paths()))
        db = self.token_issuer.seed_keycache(self.workdir / "xdg")
        _give_to_xrootd(db.parent, db)
        return ["ofs.authorize 1", f"ofs.authlib libXrdAccSciTokens.so config={cfg}"]

    def _token_base_paths(self) -> list[str]:
        assert self.token_issuer is not None
        return [self.token_issuer.base_path]

    def _write_config(self) -> Path:
        lines = [
            f"xrd.port {self.port}",
            f"all.adminpath {self.workdir / 'adm'}",
            f"all.pidpath {self.workdir / 'run'}",
            *self._config_lines(),
            *self._auth_lines(),
        ]
        path = self.workdir / "xrootd.cfg"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        return path

    # -- public API ------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.kind}{self.port}"

    @property
    def endpoint(self) -> str:
        return f"root://{LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        """``root://127.0.0.1:PORT//store/f.root`` for ``/store/f.root``."""
        return f"{self.endpoint}//{path.lstrip('/')}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "log" / self.name / "xrootd.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self._proc, self._relay) if p and p.poll() is None]

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for f in (self.log_path, self.workdir / "stdout.log"):
            if f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {f} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no log written)"

    def start(self) -> XRootDServer:
        """Start (or restart, on the same port) the server; wait until ready."""
        if self.running:
            return self
        try:
            if self.netns is not None:
                self._start_relay()
            elif self.port is None:
                self.port = free_port()
            self._spawn()
            self._after_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop relay and server by PID; the port is kept for :meth:`start`."""
        _stop_proc(self._relay, grace=2.0)
        self._before_stop()
        _stop_proc(self._proc)
        self._relay = self._proc = None

    # hooks for subclasses (slowlink.SlowOrigin)
    def _server_prefix(self) -> list[str]:
        """argv prefix that runs xrootd in its namespace."""
        return self.netns.prefix() if self.netns is not None else []

    def _after_ready(self) -> None:
        pass

    def _before_stop(self) -> None:
        pass

    def close(self) -> None:
        """Stop and remove the work dir (and the namespace we created)."""
        self.stop()
        _LIVE.discard(self)
        if self._owns_netns and self.netns is not None and not self.netns.deleted:
            self.netns.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> XRootDServer:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run; the error carries the log tail
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint}, running={self.running})"

    # -- internals -------------------------------------------------------------
    def _start_relay(self) -> None:
        assert self.netns is not None
        if self._owns_netns and self.port is None:
            subprocess.run(
                [
                    *self.netns.prefix(),
                    "sh",
                    "-c",
                    f"echo '{NETNS_EPHEMERAL}' > /proc/sys/net/ipv4/ip_local_port_range",
                ],
                check=True,
                timeout=10,
            )
        argv = [
            sys.executable,
            str(RELAY),
            "--listen",
            f"{LOOPBACK}:{self.port or 0}",
            "--target",
            f"{LOOPBACK}:0",
            "--netns",
            self.netns.path,
        ]
        log = self.workdir / "relay.log"
        with open(log, "ab") as err:  # a file: a full pipe would block the relay
            self._relay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        line = self._relay.stdout.readline() if self._relay.stdout else ""
        if not line.startswith("PORT "):
            raise ServerError(f"relay for {self.kind} failed to start: {line}{log.read_text()}")
        self.port = int(line.split()[1])

    def _env(self) -> dict[str, str]:
        # Client XRD_* settings of the caller must not change the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("XRD")}
        env["XDG_CACHE_HOME"] = str(self.workdir / "xdg")
        env.update(self.SERVER_ENV)
        return env

    def _spawn(self) -> None:
        cfg = self._write_config()
        argv = ["xrootd", "-c", str(cfg), "-l", str(self.workdir / "log" / "xrootd.log"), "-n", self.name]
        if _as_root():
            argv += ["-R", XROOTD_USER]
        argv = [*self._server_prefix(), *argv]
        for attempt in (1, 2):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.workdir / "stdout.log", "ab") as out:
                self._proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                    env=self._env(),
                )
            self._record_pids()
            code = self._wait_ready(offset)
            if code is None:
                return
            # xrootd 5.5 has been seen to die by SIGSEGV before its first log line; once is retried
            if attempt == 1 and code < 0:
                warnings.warn(f"{self.kind} on port {self.port} died at start-up (signal {-code}); starting again",
                              stacklevel=2)
                continue
            self._fail(f"exited with code {code}")

    def _record_pids(self) -> None:
        # For reap_stale(); the relay's argv holds the namespace name, not the work dir.
        (self.workdir / "pids").write_text(" ".join(map(str, self.pids)))

    def _wait_ready(self, offset: int) -> int | None:
        """None once the log says ready; the exit code if the server died first."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.log_path.exists():
                with open(self.log_path, errors="replace") as f:
                    f.seek(offset)
                    m = READY_RE.search(f.read())
                if m and m.group(1) == "completed":
                    return None
                if m:
                    self._fail("failed to initialise")
            if self._proc.poll() is not None:
                return self._proc.returncode
            time.sleep(0.05)
        self._fail(f"not ready after {self.start_timeout:.0f} s")

    def _fail(self, why: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"{self.kind} on port {self.port} {why}\n{tail}")


class XRootDOrigin(XRootDServer):
    """A plain data server exporting ``export_dir/store`` as ``/store`` (read-only).

    ``writable=("/scratch",)`` also exports ``export_dir/scratch`` read-write (made
    here, owned by the server's user): an output store or checkpoint for tests.
    """

    kind = "origin"

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        token_issuer: LocalIssuer | None = None,
        exports: tuple[str, ...] = ("/store",),
        writable: tuple[str, ...] = (),
        **kw: object,
    ) -> None:
        self.export_dir = Path(export_dir).resolve()
        _check_traversable(self.export_dir, "export_dir")
        self.exports = exports
        self.writable = writable
        for path in writable:
            folder = self.export_dir / path.lstrip("/")
            folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            _give_to_xrootd(folder)
        super().__init__(token_issuer=token_issuer, **kw)  # type: ignore[arg-type]

    def _config_lines(self) -> list[str]:
        return [f"oss.localroot {self.export_dir}", *(f"all.export {e} r/o" for e in self.exports),
                *(f"all.export {w}" for w in self.writable)]


class XCache(XRootDServer):
    """XCache (``libXrdPss`` + ``libXrdPfc``) in front of ``origin``.

    Fixed-origin form: ``root://cache//store/x.root``; with ``forwarding=True``:
    ``root://cache//root://origin//store/x.root``. Cached data appear as
    ``cache_dir/store/x.root`` plus ``x.root.cinfo``.
    """

    kind = "xcache"
    # Without these the cache hangs ~120 s on a dead origin. ``ConnectTimeout``
    # is XrdCl's ConnectionWindow, ``ReconnectWait`` its StreamErrorWindow.
    PSS_OPTS = {"ConnectTimeout": 5, "RequestTimeout": 20, "ReconnectWait": 5}
    # ``pss.setopt ConnectionRetry 1`` has no effect in 5.5 (an open on a dead
    # origin still takes 4 x ConnectTimeout) and TimeoutResolution is no setopt:
    # the cache's XrdCl reads them from its environment (then: ~10 ms).
    SERVER_ENV = {"XRD_CONNECTIONRETRY": "1", "XRD_TIMEOUTRESOLUTION": "1"}

    def __init__(
        self,
        origin: XRootDServer,
        cache_dir: str | os.PathLike[str] | None = None,
        forwarding: bool = False,
        token_issuer: LocalIssuer | None = None,
        ram: str = "1g",
        blocksize: str = "1m",
        prefetch: int = 0,
        **kw: object,
    ) -> None:
        if origin.port is None:
            raise ServerError("start the origin before creating its XCache")
        self.origin, self.forwarding = origin, forwarding
        # pfc.prefetch: blocks XCache reads ahead of a file's reads, in order. Off here: columnar reads are sparse
        # (a query reads a few branches), and read-ahead in file order fetches the others' blocks too; two
        # clients on the slow link moved 153-160 MB with XCache's default, 61 MB without (docs/reading.md)
        self.ram, self.blocksize, self.prefetch = ram, blocksize, prefetch
        if token_issuer is None:
            token_issuer = origin.token_issuer
        kw.setdefault("isolate", origin.netns is not None)
        super().__init__(netns=origin.netns, token_issuer=token_issuer, **kw)  # type: ignore[arg-type]
        if cache_dir is None:
            self.cache_dir = self.workdir / "cache"
            self.cache_dir.mkdir()
        else:
            self.cache_dir = Path(cache_dir).resolve()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            _check_traversable(self.cache_dir, "cache_dir")
        _give_to_xrootd(self.cache_dir)

    def url(self, path: str) -> str:
        """Cache URL of an origin path, in this cache's form."""
        if self.forwarding:
            return f"{self.endpoint}//{self.origin.url(path)}"
        return super().url(path)

    def cached_path(self, path: str) -> Path:
        """Where the cache keeps ``/store/x.root`` (the key is the path only)."""
        return self.cache_dir / path.lstrip("/")

    def cache_info(self, path: str) -> dict[str, int | str] | None:
        """``xrdpfc_print`` summary of a cached file, None if not cached."""
        cinfo = self.cached_path(path).with_name(self.cached_path(path).name + ".cinfo")
        if not cinfo.exists():
            return None
        out = subprocess.run(["xrdpfc_print", str(cinfo)], capture_output=True, text=True, timeout=30).stdout
        m = CINFO_RE.search(out)
        if m is None:
            raise ServerError(f"cannot parse xrdpfc_print output for {cinfo}:\n{out}")
        return {
            "file_size_kb": int(m["size"]),
            "n_blocks": int(m["blocks"]),
            "n_downloaded": int(m["down"]),
            "state": m["state"],
        }

    def _token_base_paths(self) -> list[str]:
        base = super()._token_base_paths()
        if self.forwarding:  # the authz plugin sees /root:/HOST:PORT/store/...
            hp = f"{LOOPBACK}:{self.origin.port}"
            base += [f"/{scheme}:/{hp}{p}" for scheme in ("root", "xroot") for p in base]
        return base

    def _config_lines(self) -> list[str]:
        lines = [
            "ofs.osslib libXrdPss.so",
            "pss.cachelib libXrdPfc.so",
            f"oss.localroot {self.cache_dir}",
            f"pfc.ram {self.ram}",
            f"pfc.blocksize {self.blocksize}",
            f"pfc.prefetch {self.prefetch}",
            *(f"pss.setopt {k} {v}" for k, v in self.PSS_OPTS.items()),
        ]
        if self.forwarding:
            lines += [
                "pss.origin =",
                "all.export /root:/",
                "all.export /xroot:/",
                f"pss.permit {LOOPBACK}",
                "all.export /store",
            ]
        else:
            assert self.origin.port is not None
            lines += [f"pss.origin {LOOPBACK}:{self.origin.port}", "all.export /store"]
        return lines
