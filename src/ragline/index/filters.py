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


def allowed_rows(index, conditions: Sequence[Condition]) -> np.ndarray | None:
    """(rows,) bool, read-only: the passages of ``index`` that pass every condition; None for no condition.
    The masks of recent filters are kept with the opened index (a new generation is a new object)."""
    if not conditions:
        return None
    key = tuple(sorted(set(conditions), key=lambda c: (c.field, c.op, c.value)))
    cache = index.__dict__.setdefault("_filter_masks", {})
    if key in cache:
        return cache[key]
    n = len(index)
    ok = np.ones(n, dtype=bool)
    by_field: dict[str, list[Condition]] = {}
    for c in conditions:
        by_field.setdefault(c.field, []).append(c)
    for field, conds in by_field.items():
        values = _column(index, field)
        eq = [c for c in conds if c.op != NE]
        ne = [c for c in conds if c.op == NE]
        ok &= np.fromiter(((not eq or any(c.test(v) for c in eq)) and all(c.test(v) for c in ne) for v in values),
                          dtype=bool, count=n)
    ok.flags.writeable = False  # shared by the searches that reuse it
    with _LOCK:  # requests filter from several threads
        while len(cache) >= MASKS_KEPT:
            cache.pop(next(iter(cache)))  # the oldest
        cache[key] = ok
    return ok


def _column(index, field: str) -> list[str | None]:
    """The text of ``field`` for every row of ``index`` (None where a passage has no such metadata)."""
    if field in COLUMNS:
        return index.store.values(field)
    cache = index.__dict__.setdefault("_filter_meta", {})
    if "rows" not in cache:
        cache["rows"] = [json.loads(m) if m else {} for m in index.store.values("meta")]
    if field not in cache:
        cache[field] = [as_text(m[field]) if field in m else None for m in cache["rows"]]
    return cache[field]
