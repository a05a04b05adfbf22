"""NanoEvents' base form of a file's tree, built once per worker process instead of once per chunk.

coffea builds a chunk's NanoEvents from a form it derives from every branch of the tree
(``UprootSourceMapping._extract_base_form``: each branch's interpretation, to JSON and back),
for every chunk, although it depends only on the tree. On the 86-branch ADL files that was a
third of an ADL Q1 chunk's time in a profile (chunks of 100k events). Workers keep each
file's TTree between chunks (``source.OpenFiles``); this keeps the form it gives, keyed by
the file's UUID, the tree's path and the options, and hands each chunk its own copy (coffea
adds to it). coffea has no hook for it: :mod:`casa_executors.internals` wraps the classmethod
while our tasks run (and checks it first); the wrapper calls :func:`form`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

FORMS_KEPT = 64  # trees' forms per process (a few hundred kB each for 86 branches)

_lock = threading.Lock()
_forms: OrderedDict[tuple, dict] = OrderedDict()


def _copy(form: Any) -> Any:
    """A copy of a JSON-like form deep enough that coffea's additions stay in its own (strings are shared)."""
    if isinstance(form, dict):
        return {k: _copy(v) for k, v in form.items()}
    if isinstance(form, list):
        return [_copy(v) for v in form]
    return form


def form(cls: type, tree: Any, iteritems_options: dict, build: Callable[[type, Any, dict], Any]) -> Any:
    """The base form ``build(cls, tree, iteritems_options)`` gives (coffea's own function), kept per tree;
    a copy of its own for each call."""
    try:
        key = (cls, str(tree.file.uuid), tree.object_path, tree.cursor.index,
               repr(sorted(iteritems_options.items())))
    except Exception:  # not a TTree of a file: nothing to key it by
        return build(cls, tree, iteritems_options)
    with _lock:
        kept = _forms.get(key)
        if kept is not None:
            _forms.move_to_end(key)
    if kept is None:
        kept = build(cls, tree, iteritems_options)
        if not isinstance(kept, dict):  # not the JSON form expected: coffea's, as it is, every time
            return kept
        with _lock:
            _forms[key] = kept
            while len(_forms) > FORMS_KEPT:
                _forms.popitem(last=False)
    return _copy(kept)
