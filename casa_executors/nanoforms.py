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

The schema (NanoAODSchema) turns that form into NanoEvents' for every chunk too: within a run, a tree's
is built once (:class:`KeptSchema`).
"""

from __future__ import annotations

import copy
import inspect
import marshal
import threading
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from typing import Any

FORMS_KEPT = 64  # trees' forms per process (a few hundred kB each for 86 branches)

_lock = threading.Lock()
_forms: OrderedDict[tuple, Any] = OrderedDict()  # a form, marshalled (_frozen) where it can be
_typenames: OrderedDict[tuple, dict] = OrderedDict()


def _tree_key(tree: Any) -> tuple:
    """What identifies a tree's metadata across runs: its file's UUID (a rewritten file has another), path
    and place in the file. Raises if ``tree`` is not a TTree of a file."""
    return (str(tree.file.uuid), tree.object_path, tree.cursor.index)


def _keep(kept: OrderedDict[tuple, Any], key: tuple, value: Any) -> None:
    with _lock:
        kept[key] = value
        while len(kept) > FORMS_KEPT:
            kept.popitem(last=False)


def _get(kept: OrderedDict[tuple, Any], key: tuple) -> Any:
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


def _frozen(form: dict) -> bytes | dict:
    """``form`` marshalled, if it comes back the same: unmarshalling makes a copy in half the time
    :func:`_copy` takes (a JSON-like form is all marshal's types)."""
    try:
        frozen = marshal.dumps(form)
        if marshal.loads(frozen) == form:
            return frozen
    except ValueError:  # something marshal cannot write
        pass
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
        kept = _frozen(kept)
        _keep(_forms, key, kept)
    return marshal.loads(kept) if isinstance(kept, bytes) else _copy(kept)


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


# -- the schema's form, once per tree and run ---------------------------------------------------------------

SCALAR = (str, int, float, bool, type(None))


class KeptSchema:
    """Stands for a coffea schema class in ``NanoEventsFactory._from_mapping`` (which calls
    ``schemaclass(base_form)`` once per chunk): the first chunk of a tree builds the schema, the next
    get a copy whose form differs only in the chunk's own metadata.

    Only coffea's own ``BaseSchema`` and ``NanoAODSchema`` (:func:`keeps`), whose form depends on the
    tree and on nothing of the chunk but its metadata, which they keep as given and add constants to
    (NanoAODSchema its version); a build that does anything else with it is not kept. The schemas are
    kept in ``kept``, one run's (a user may change a schema class's attributes between runs)."""

    __slots__ = ("schemaclass", "kept", "tree")

    def __init__(self, schemaclass: type, kept: MutableMapping[tuple, Any], tree: tuple) -> None:
        self.schemaclass, self.kept, self.tree = schemaclass, kept, tree

    def __call__(self, base_form: dict) -> Any:
        metadata = base_form.get("parameters", {}).get("metadata")
        if not isinstance(metadata, dict):
            return self.schemaclass(base_form)
        key = (self.schemaclass, *self.tree, tuple(base_form.get("fields", ())))
        kept = self.kept.get(key)
        if kept is None:
            before = dict(metadata)
            schema = self.schemaclass(base_form)
            self.kept[key] = _keepable(schema, metadata, before) or (None, None)
            while len(self.kept) > FORMS_KEPT:
                self.kept.pop(next(iter(self.kept)))
            return schema
        schema, added = kept
        if schema is None:  # its build did not look as expected: coffea's, every time
            return self.schemaclass(base_form)
        metadata.update(added)  # what the schema adds to each chunk's metadata, in place as it does
        form = schema._form
        out = copy.copy(schema)
        out._form = {**form, "parameters": {**form["parameters"], "metadata": metadata}}
        return out


def keeps(schemaclass: Any) -> bool:
    """Whether :class:`KeptSchema` may stand for ``schemaclass`` (coffea's own two, exactly)."""
    from coffea.nanoevents.schemas import BaseSchema, NanoAODSchema

    return schemaclass is NanoAODSchema or schemaclass is BaseSchema


def _keepable(schema: Any, metadata: dict, before: dict) -> tuple[Any, dict] | None:
    """``(schema, what it added to the metadata)`` if its form is ``_form``, holds the chunk's metadata
    dict itself, and it only added constants to it; else None."""
    from coffea.nanoevents.schemas import BaseSchema

    form = getattr(schema, "_form", None)
    if (inspect.getattr_static(type(schema), "form", None) is not inspect.getattr_static(BaseSchema, "form")
            or not isinstance(form, dict) or schema.form is not form
            or not isinstance(form.get("parameters"), dict) or form["parameters"].get("metadata") is not metadata
            or any(k not in metadata or metadata[k] is not v for k, v in before.items())):
        return None
    added = {k: v for k, v in metadata.items() if k not in before}
    if not all(isinstance(v, SCALAR) for v in added.values()):
        return None
    return schema, added
