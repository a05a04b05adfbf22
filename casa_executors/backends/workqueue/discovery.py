"""Finding Work Queue's Python module: ``ndcctools.work_queue`` (conda) or ``work_queue`` (Debian).

Debian's ``python3-workqueue`` installs ``work_queue.py`` and its ``_work_queue``
extension into the system's dist-packages, which a virtual environment does not
see. Putting that directory on ``sys.path`` would let everything else in it
shadow the environment's own packages, so the two files are loaded alone.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from types import ModuleType

DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-workqueue


def import_work_queue() -> ModuleType:
    """``ndcctools.work_queue`` (conda), else ``work_queue``: importable, or loaded alone from Debian's
    dist-packages, so that nothing else there shadows this environment's packages."""
    try:
        from ndcctools import work_queue

        return work_queue
    except ImportError:
        pass
    if "work_queue" in sys.modules:
        return sys.modules["work_queue"]
    if importlib.util.find_spec("work_queue") is not None:
        import work_queue

        return work_queue
    return _load_alone(DIST_PACKAGES)


def _load_alone(directory: str) -> ModuleType:
    py = os.path.join(directory, "work_queue.py")
    ext = next((p for s in importlib.machinery.EXTENSION_SUFFIXES
                if os.path.isfile(p := os.path.join(directory, "_work_queue" + s))), None)
    if ext is None or not os.path.isfile(py):
        raise ImportError("no Work Queue Python module: neither ndcctools.work_queue nor "
                          f"{py} with its _work_queue extension (Debian package python3-workqueue)")
    loaded: list[str] = []
    try:
        for name, path in (("_work_queue", ext), ("work_queue", py)):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            loaded.append(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # it imports distutils
                spec.loader.exec_module(module)
    except BaseException:
        for name in loaded:
            sys.modules.pop(name, None)
        raise
    return sys.modules["work_queue"]
