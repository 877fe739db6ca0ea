"""The index protocol: what retrievers, evaluators, trainers and the server may use of an index.

Single indexes (:class:`ragline.index.directory.IndexDir`) and sharded ones (``ragline.scale.sharded``)
implement it; nothing above ``index/`` reaches past it (no Arrow table, no FAISS object). Rows are global
passage numbers: row r of the store, of the embeddings and of every search result is the same passage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ragline import vocab
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError


@runtime_checkable
class Store(Protocol):
    """Passages by row."""

    def __len__(self) -> int: ...

    def get(self, rows) -> list[Passage]:
        """Passages at the given rows (1-D), in that order."""

    def row_of(self, pid: str) -> int | None:
        """The row of passage ``pid``, or None."""

    def values(self, column: str) -> list[str]:
        """One column (``pid``, ``doc_id``, ``title`` or ``text``) for every row, in row order (rows deleted in
        place included: their pid is taken by the live row if the document was updated)."""


@runtime_checkable
class Searcher(Protocol):
    """One kind of search (dense MIPS over q(x), or BM25 over the question text)."""

    @property
    def ntotal(self) -> int: ...

    def search(self, queries, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), best first, ties by row; rows are -1 past the hits found. ``allowed``
        ((rows,) bool, from :mod:`ragline.index.filters`) limits the search to those rows, exactly: the best k
        of them, not a filtered best k."""


@runtime_checkable
class Embeddings(Protocol):
    """d(z) by row: ``embeddings[rows]`` is float32 (*rows.shape, dim); read by RAG for p_eta(z|x)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def __getitem__(self, rows) -> np.ndarray: ...


@runtime_checkable
class Index(Protocol):
    """An opened index: its directory, manifest, passages and the searches it can serve."""

    path: Path
    manifest: dict[str, Any]
    store: Store
    embeddings: Embeddings | None
    dense: Searcher | None
    bm25: Searcher | None
    modes: tuple[str, ...]

    @property
    def fingerprint(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def live_passages(self) -> int: ...

    def __len__(self) -> int: ...


class ManifestFacts:
    """An index's identity as its manifest and directory give it, shared by the index formats."""

    path: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def live_passages(self) -> int:
        """Passages a search can return (rows less deleted ones)."""
        return len(self)  # type: ignore[arg-type]


def search_modes(dense: object | None, bm25: object | None) -> tuple[str, ...]:
    """The retrieval modes an index with these parts can serve."""
    have = {vocab.DENSE: dense is not None, vocab.BM25: bm25 is not None,
            vocab.HYBRID: dense is not None and bm25 is not None}
    return tuple(m for m in vocab.MODES if have[m])


def all_embeddings(index: Index) -> np.ndarray:
    """Every passage's d(z), float32 (n, dim), in row order."""
    if index.embeddings is None:
        raise RaglineError(f"index {index.name} has no passage embeddings", "use an index with a dense part")
    return np.asarray(index.embeddings[np.arange(len(index))], dtype=np.float32)
