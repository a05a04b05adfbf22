"""NanoEvents' base form of a file's tree, built once per worker process instead of once per chunk.

coffea builds a chunk's NanoEvents from a form it derives from every branch of the tree
(``UprootSourceMapping._extract_base_form``: each branch's interpretation, to JSON and back),
for every chunk, although it depends only on the tree. On the 86-branch ADL files that was a
third of an ADL Q1 chunk's time in a profile (chunks of 100k events). Workers keep each
file's TTree between chunks (``source.OpenFiles``); this keeps the form it gives, keyed by
the file's UUID, the tree's path and the options, and hands each chunk its own copy (coffea
adds to it). coffea has no hook for it: the classmethod is wrapped once per process, the
wrapper calls the original on anything it does not know (a tree without a file UUID).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

FORMS_KEPT = 64  # trees' forms per process (a few hundred kB each for 86 branches)

_lock = threading.Lock()
_forms: OrderedDict[tuple, dict] = OrderedDict()
_installed = False
_original: Any = None  # coffea's own function, wrapped


def _copy(form: Any) -> Any:
    """A copy of a JSON-like form deep enough that coffea's additions stay in its own (strings are shared)."""
    if isinstance(form, dict):
        return {k: _copy(v) for k, v in form.items()}
    if isinstance(form, list):
        return [_copy(v) for v in form]
    return form


def install() -> None:
    """Wrap coffea's ``UprootSourceMapping._extract_base_form`` with the per-process memo (once)."""
    global _installed, _original
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from coffea.nanoevents.mapping.uproot import UprootSourceMapping

        original = _original = UprootSourceMapping.__dict__["_extract_base_form"].__func__

        def _extract_base_form(cls, tree, iteritems_options={}):  # noqa: B006 (coffea's signature)
            try:
                key = (cls, str(tree.file.uuid), tree.object_path, tree.cursor.index,
                       repr(sorted(iteritems_options.items())))
            except Exception:  # not a TTree of a file: nothing to key it by
                return original(cls, tree, iteritems_options)
            with _lock:
                form = _forms.get(key)
                if form is not None:
                    _forms.move_to_end(key)
            if form is None:
                form = original(cls, tree, iteritems_options)
                with _lock:
                    _forms[key] = form
                    while len(_forms) > FORMS_KEPT:
                        _forms.popitem(last=False)
            return _copy(form)

        UprootSourceMapping._extract_base_form = classmethod(_extract_base_form)
        _installed = True
