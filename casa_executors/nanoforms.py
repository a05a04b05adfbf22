"""NanoEvents' base form of a file's tree, and its branches' type names, built once per worker process
instead of once per chunk.

coffea builds a chunk's NanoEvents from a form it derives from every branch of the tree
(``UprootSourceMapping._extract_base_form``: each branch's interpretation, to JSON and back),
for every chunk, although it depends only on the tree. On the 86-branch ADL files that was a
third of an ADL Q1 chunk's time in a profile (chunks of 100k events). Workers keep each
file's TTree between chunks (``source.OpenFiles``); this keeps the form it gives, keyed by
the file's UUID, the tree's path and the options, and hands each chunk its own copy (coffea
adds to it). coffea has no hook for it: :mod:`casa_executors.internals` wraps the classmethod
while our tasks run (and checks it first); the wrapper calls :func:`form`.

coffea also asks the tree for every branch's type name (``HasBranches.typenames()``) once per
chunk, to put them in that form: kept the same way (:func:`typenames`), for calls without options.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

FORMS_KEPT = 64  # trees' forms per process (a few hundred kB each for 86 branches)

_lock = threading.Lock()
_forms: OrderedDict[tuple, dict] = OrderedDict()
_typenames: OrderedDict[tuple, dict] = OrderedDict()


def _tree_key(tree: Any) -> tuple:
    """What identifies a tree's metadata across runs: its file's UUID (a rewritten file has another), path
    and place in the file. Raises if ``tree`` is not a TTree of a file."""
    return (str(tree.file.uuid), tree.object_path, tree.cursor.index)


def _keep(kept: OrderedDict[tuple, dict], key: tuple, value: dict) -> None:
    with _lock:
        kept[key] = value
        while len(kept) > FORMS_KEPT:
            kept.popitem(last=False)


def _get(kept: OrderedDict[tuple, dict], key: tuple) -> dict | None:
    with _lock:
        value = kept.get(key)
        if value is not None:
            kept.move_to_end(key)
    return value


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
        key = (cls, *_tree_key(tree), repr(sorted(iteritems_options.items())))
    except Exception:  # not a TTree of a file: nothing to key it by
        return build(cls, tree, iteritems_options)
    kept = _get(_forms, key)
    if kept is None:
        kept = build(cls, tree, iteritems_options)
        if not isinstance(kept, dict):  # not the JSON form expected: coffea's, as it is, every time
            return kept
        _keep(_forms, key, kept)
    return _copy(kept)


def typenames(tree: Any, build: Callable[[Any], Any]) -> Any:
    """``build(tree)`` (uproot's ``typenames()`` without options: every branch's name and type name),
    kept per tree; a copy of its own for each call (a dict of strings)."""
    try:
        key = (type(tree), *_tree_key(tree))
    except Exception:  # not a TTree of a file
        return build(tree)
    kept = _get(_typenames, key)
    if kept is None:
        kept = build(tree)
        if not (isinstance(kept, dict) and all(isinstance(v, str) for v in kept.values())):
            return kept  # not what uproot gives today: uproot's, as it is, every time
        _keep(_typenames, key, kept)
    return dict(kept)
