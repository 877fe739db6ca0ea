"""Metadata filters: which passages a search may return (``--filter`` on search, ask, eval; ``filter`` over
HTTP).

A condition is ``field=value``, ``field!=value``, or the prefix form ``field=value*`` (for paths:
``source=reports/2024/*``). Fields are a passage's ``pid``, ``doc_id`` and ``title`` and every key of its
metadata: ``source``, ``page``, ``section`` for documents read from files, and a JSONL record's own
``metadata`` keys. Values compare as text (``page=3`` matches page 3; ``true``/``false``/``null`` for JSON's).
Conditions on different fields must all hold; several ``=`` conditions on one field are alternatives
(``--filter source=a.pdf --filter source=b.pdf``); every ``!=`` must hold (a passage without the field passes
``!=`` and fails ``=``).

The result is a boolean mask over the index's rows, which every search honours inside the search (FAISS's ID
selector, BM25 scores of excluded passages set to none), so top-k is exact among the passages that pass and never
a post-filter that returns fewer than k while more pass.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragline.errors import RaglineError

COLUMNS = ("pid", "doc_id", "title")  # fields read from the store's own columns; others from the metadata
EQ, NE, PREFIX = "=", "!=", "prefix"
_LOCK = threading.Lock()
MASKS_KEPT = 32  # filters' row masks kept per opened index (an index changed in place is a new object)
FIELDS_LISTED = 50  # field names a refusal lists at most
SYNTAX = "write field=value, field!=value or field=prefix* (e.g. --filter source=reports/* --filter year=2024)"


@dataclass(frozen=True)
class Condition:
    """One ``--filter``: a field, an operator (=, != or prefix) and a value."""

    field: str
    op: str
    value: str

    @classmethod
    def parse(cls, spec: str) -> Condition:
        if not isinstance(spec, str) or "=" not in spec:
            raise RaglineError(f"filter {spec!r} has no '='", SYNTAX)
        at = spec.index("=")
        neg = at > 0 and spec[at - 1] == "!"
        field, value = spec[:at - 1 if neg else at].strip(), spec[at + 1:]
        if not field:
            raise RaglineError(f"filter {spec!r} names no field", SYNTAX)
        if not neg and value.endswith("*"):
            return cls(field, PREFIX, value[:-1])
        return cls(field, NE if neg else EQ, value)

    def test(self, value: str | None) -> bool:
        if self.op == NE:
            return value != self.value
        if value is None:
            return False
        return value == self.value if self.op == EQ else value.startswith(self.value)


def parse_filters(specs: Sequence[str] | None) -> tuple[Condition, ...]:
    """The conditions of ``--filter`` options (checked; an empty tuple for none)."""
    return tuple(Condition.parse(s) for s in specs or ())


def as_text(value: object) -> str | None:
    """A metadata value as filters compare it: strings as they are, numbers and booleans as JSON writes them."""
    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value)


class UnknownField(RaglineError):
    """A filter on a field no passage of the index has (HTTP 422)."""

    status = 422


def allowed_rows(index, conditions: Sequence[Condition]) -> np.ndarray | None:
    """(rows,) bool, read-only: the passages of ``index`` that pass every condition; None for no condition.
    A field no passage has is refused (:class:`UnknownField`, naming the fields there are), so a client cannot
    make the server build anything per field name it invents. The masks of recent filters are kept with the
    opened index (a new generation is a new object); nothing else is kept but the index's field names. An
    index format that filters inside its own parts (sharded: each shard over its own passages) says so with a
    ``filter_mask(conditions)`` method."""
    if not conditions:
        return None
    key = tuple(sorted(set(conditions), key=lambda c: (c.field, c.op, c.value)))
    cache = index.__dict__.setdefault("_filter_masks", {})
    if key in cache:
        return cache[key]
    known = index_fields(index)
    unknown = sorted({c.field for c in conditions} - known)
    if unknown:
        names = sorted(known)
        listed = ", ".join(names[:FIELDS_LISTED]) + (f" and {len(names) - FIELDS_LISTED} more"
                                                     if len(names) > FIELDS_LISTED else "")
        raise UnknownField(f"index {index.name} has no passage with a field {unknown[0][:100]!r}",
                           f"filter on one of its fields: {listed}")
    own = getattr(index, "filter_mask", None)
    ok = own(list(key)) if own is not None else row_mask(index.store, key)
    ok.flags.writeable = False  # shared by the searches that reuse it
    with _LOCK:  # requests filter from several threads
        while len(cache) >= MASKS_KEPT:
            cache.pop(next(iter(cache)))  # the oldest
        cache[key] = ok
    return ok


def index_fields(index) -> frozenset[str]:
    """The fields filters may name on ``index``: the store's columns and every metadata key some passage has
    (read once per opened index; a format with ``filter_fields()`` gives its own)."""
    with _LOCK:
        known = index.__dict__.get("_filter_fields")
    if known is None:
        own = getattr(index, "filter_fields", None)
        known = frozenset(own()) if own is not None else store_fields(index.store)
        with _LOCK:
            index.__dict__["_filter_fields"] = known
    return known


def store_fields(store) -> frozenset[str]:
    """The store's columns and the metadata keys of its passages."""
    keys: set[str] = set(COLUMNS)
    for m in store.values("meta"):
        if m:
            keys.update(json.loads(m))
    return frozenset(keys)


def row_mask(store, conditions: Sequence[Condition]) -> np.ndarray:
    """(rows,) bool: the store's passages that pass every condition, read from its columns (metadata from its
    JSON column, parsed only in rows whose text names the field); no per-field copy is kept."""
    n = len(store)
    ok = np.ones(n, dtype=bool)
    by_field: dict[str, list[Condition]] = {}
    for c in conditions:
        by_field.setdefault(c.field, []).append(c)
    meta = None
    for field, conds in by_field.items():
        if field in COLUMNS:
            values = store.values(field)
        else:
            meta = store.values("meta") if meta is None else meta
            values = _meta_values(meta, field)
        eq = [c for c in conds if c.op != NE]
        ne = [c for c in conds if c.op == NE]
        ok &= np.fromiter(((not eq or any(c.test(v) for c in eq)) and all(c.test(v) for c in ne) for v in values),
                          dtype=bool, count=n)
    return ok


def _meta_values(meta: Sequence[str], field: str):
    """The text of metadata ``field`` of each row (None where the passage has no such field), one at a time."""
    names = {json.dumps(field, ensure_ascii=False), json.dumps(field)}  # as the store writes keys: compact JSON
    for m in meta:
        if m and any(name in m for name in names):
            rec = json.loads(m)
            yield as_text(rec[field]) if field in rec else None
        else:
            yield None
