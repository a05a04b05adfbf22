"""Write flat NanoAOD-like TTrees with uproot, batch by batch.

Collections are given as ``(counts, {field: values})`` and become
``<Coll>_<field>`` branches with a ``n<Coll>`` counter. uproot always writes
counters as int32; NanoAOD's are uint32, so the counter leaves are switched to
uint32 before the first basket is written (falls back to int32 with a warning
if uproot's writer internals ever change).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import awkward as ak
import numpy as np
import uproot

Collection = tuple[np.ndarray, Mapping[str, np.ndarray]]
Batch = Mapping[str, "np.ndarray | Collection"]

# LZ4 decompresses several times faster than ZLIB for a modest size cost.
DEFAULT_COMPRESSION = uproot.LZ4(1)


def _collection_array(counts: np.ndarray, fields: Mapping[str, np.ndarray]) -> ak.Array:
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    n = int(offsets[-1])
    contents = [ak.contents.NumpyArray(np.ascontiguousarray(v)) for v in fields.values()]
    for name, v in fields.items():
        if len(v) != n:
            raise ValueError(f"field {name!r} has {len(v)} values, counts sum to {n}")
    record = ak.contents.RecordArray(contents, list(fields), length=n)
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), record))


def _unsigned_counters(tree: Any) -> bool:
    """Make the generated counter branches uint32 (rewritten on first extend)."""
    casc = getattr(tree, "_cascading", None)
    data = getattr(casc, "_branch_data", None)
    if data is None or not hasattr(casc, "_needs_relocation_before_extend"):
        return False
    for datum in data:
        if datum.get("kind") == "counter":
            datum["dtype"] = np.dtype(">u4")
            datum["fTitle"] = f"{datum['fName']}/i"
    casc._needs_relocation_before_extend = True
    return True


class TreeWriter:
    """Append batches of events to one TTree; use as a context manager."""

    def __init__(self, path: str, tree: str = "Events", compression: Any = DEFAULT_COMPRESSION) -> None:
        self._file = uproot.recreate(path, compression=compression)
        self._name = tree
        self._tree: Any = None
        self.entries = 0

    def extend(self, batch: Batch) -> None:
        data: dict[str, Any] = {}
        for name, value in batch.items():
            if isinstance(value, tuple):
                data[name] = _collection_array(*value)
            else:
                data[name] = np.ascontiguousarray(value)
        if self._tree is None:
            types = {k: (v.dtype if isinstance(v, np.ndarray) else v.type) for k, v in data.items()}
            self._tree = self._file.mktree(self._name, types)
            if not _unsigned_counters(self._tree):
                warnings.warn("uproot internals changed: counters written as int32", stacklevel=2)
        self._tree.extend(data)
        self.entries += len(next(iter(data.values())))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
