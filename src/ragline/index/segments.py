"""An index changed in place (``ragline add``, ``update``, ``delete``): the base index, its delta segments and
a set of deleted rows, searched as one; implements :class:`ragline.index.protocol.Index`.

Layout, beside the base's own files (:mod:`ragline.index.manifest`)::

    segments/g000001/      passages.arrow, embeddings.npy, dense.faiss (exact, flat) and bm25/ (term counts)
                           of the passages one generation added
    tombstones/g000003.npy every row deleted up to that generation (sorted int64), or no file when none is

The manifest names the segments and the tombstone file of its generation, so a generation is exactly what its
manifest says, and the manifest, written last and atomically, is the switch from one generation to the next.
Global rows run through the base, then each segment in order; a deleted row keeps its number and is never
returned by a search. Dense scores are the segments' own q(x)·d(z), merged exactly by score then row; BM25 is
scored with the live corpus's statistics (:mod:`ragline.index.bm25_live`); hybrid fuses the two as for one
index. Results therefore equal those of an index built from scratch over the live passages in row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragline.corpus.passages import Passage
from ragline.corpus.store import PassageStore
from ragline.index import manifest as mf
from ragline.index.bm25_live import LiveBM25
from ragline.index.dense import DenseIndex
from ragline.index.directory import IndexDir, corrupt
from ragline.index.protocol import ManifestFacts, search_modes
from ragline.index.sparse import BM25Stats, TermCounts
from ragline.index.topk import merge_top_k


def _parts_of(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The part each global row is in: (*rows.shape,) indices into ``offsets`` (each part's first row)."""
    return np.searchsorted(offsets, rows, side="right") - 1


class SegmentedStore:
    """Passages by global row over the base and segment stores; ``row_of`` knows live passages only."""

    def __init__(self, stores: list[PassageStore], alive: np.ndarray | None) -> None:
        self.stores, self.alive = stores, alive
        self.offsets = np.cumsum([0] + [len(s) for s in stores[:-1]])
        self._total = sum(len(s) for s in stores)
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return self._total

    def get(self, rows) -> list[Passage]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"passage rows out of range 0..{len(self) - 1}")
        part = _parts_of(rows, self.offsets)
        out: list[Passage | None] = [None] * len(rows)
        for i, store in enumerate(self.stores):
            at = np.flatnonzero(part == i)
            if at.size:
                for j, p in zip(at.tolist(), store.get(rows[at] - self.offsets[i]), strict=True):
                    out[j] = p
        return out  # type: ignore[return-value]

    def row_of(self, pid: str) -> int | None:
        """The live row of passage ``pid`` (after an update, the new one), or None."""
        if self._rows is None:
            pids = self.values("pid")
            live = range(len(pids)) if self.alive is None else np.flatnonzero(self.alive).tolist()
            self._rows = {pids[r]: r for r in live}
        return self._rows.get(pid)

    def values(self, column: str) -> list[str]:
        """One column for every row, deleted rows included, in row order."""
        return [v for s in self.stores for v in s.values(column)]


class SegmentedEmbeddings:
    """d(z) by global row over the base and segment embeddings."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        self._shape = (sum(len(p) for p in parts), int(parts[0].shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self._shape[1]), dtype=np.float32)  # (m, dim)
        part = _parts_of(flat, self.offsets)
        for i, emb in enumerate(self.parts):
            at = np.flatnonzero(part == i)
            if at.size:
                out[at] = emb[flat[at] - self.offsets[i]]
        return out.reshape(*rows.shape, self._shape[1])


class SegmentedDense:
    """Dense search over the parts, deleted rows excluded inside each part's search, merged exactly."""

    def __init__(self, parts: list[DenseIndex], offsets: np.ndarray, alive: np.ndarray | None) -> None:
        self.parts, self.offsets, self.alive = parts, offsets, alive

    @property
    def ntotal(self) -> int:
        return sum(p.ntotal for p in self.parts)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (B, k), among the live rows (and ``allowed`` ones, (rows,) bool)."""
        found = []
        live = self.alive if allowed is None else allowed if self.alive is None else self.alive & allowed
        for part, lo in zip(self.parts, self.offsets.tolist(), strict=True):
            keep = None if live is None else live[lo:lo + part.ntotal]
            if keep is not None and not keep.any():
                continue
            s, r = part.search(queries, min(k, part.ntotal), keep)  # (B, <=k), part rows
            found.append((s, np.where(r >= 0, r + lo, -1)))
        if not found:
            return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        return merge_top_k(found, k)


@dataclass
class LiveIndex(ManifestFacts):
    """A base index with delta segments and deleted rows (see the module docstring)."""

    path: Path
    manifest: dict[str, Any]
    store: SegmentedStore
    alive: np.ndarray | None = None   # (rows,) bool, None when nothing is deleted
    embeddings: SegmentedEmbeddings | None = None
    dense: SegmentedDense | None = None
    bm25: LiveBM25 | None = None
    modes: tuple[str, ...] = field(default=())

    @classmethod
    def open(cls, path: str | Path, manifest: dict[str, Any], search: bool = True) -> LiveIndex:
        """``search=False`` leaves the search parts unread (as :meth:`IndexDir.open`), the live BM25 statistics
        uncounted."""
        path = Path(path)
        base = IndexDir.open(path, manifest, search)
        segs = [_open_segment(path, s, manifest, search) for s in manifest.get("segments") or []]
        stores = [base.store] + [s.store for s in segs]
        total = sum(len(s) for s in stores)
        alive = read_alive(path, manifest, total)
        store = SegmentedStore(stores, alive)
        out = cls(path, manifest, store, alive)
        if base.embeddings is not None:
            out.embeddings = SegmentedEmbeddings([base.embeddings] + [s.embeddings for s in segs])
        if base.dense is not None:
            out.dense = SegmentedDense([base.dense] + [s.dense for s in segs], store.offsets, alive)
        if base.bm25 is not None:
            if not TermCounts.saved_in(path / mf.BM25):
                raise corrupt(path, f"{mf.BM25}/ has no term counts")
            counts = [TermCounts.load(path / mf.BM25)] + [s.counts for s in segs]
            out.bm25 = LiveBM25(_bm25_parts(counts, store.offsets, alive), base.bm25.params)
        out.modes = search_modes(out.dense, out.bm25)
        return out

    def __len__(self) -> int:
        return len(self.store)

    @property
    def live_passages(self) -> int:
        return len(self) if self.alive is None else int(self.alive.sum())


@dataclass
class Segment:
    """One delta segment's opened parts."""

    store: PassageStore
    embeddings: np.ndarray | None = None
    dense: DenseIndex | None = None
    counts: TermCounts | None = None


def segment_dir(path: Path, name: str) -> Path:
    return Path(path) / mf.SEGMENTS / name


def _open_segment(path: Path, entry: dict, manifest: dict, search: bool = True) -> Segment:
    d = segment_dir(path, entry["name"])
    if not d.is_dir():
        raise corrupt(path, f"segment {entry['name']} is missing")
    seg = Segment(PassageStore(d / mf.PASSAGES))
    n = entry["passages"]
    if len(seg.store) != n:
        raise corrupt(path, f"segment {entry['name']} has {len(seg.store)} passages, the manifest says {n}")
    if manifest.get("dense"):
        seg.embeddings = np.load(d / mf.EMBEDDINGS, mmap_mode="r", allow_pickle=False)
        if seg.embeddings.shape != (n, manifest["encoder"]["dim"]):
            raise corrupt(path, f"segment {entry['name']}'s embeddings have shape {seg.embeddings.shape}")
        if search:
            seg.dense = DenseIndex.load(d / mf.DENSE, "flat", vectors=seg.embeddings)
            if seg.dense.ntotal != n:
                raise corrupt(path, f"segment {entry['name']}'s {mf.DENSE} holds {seg.dense.ntotal} vectors")
    if manifest.get("bm25") and search:
        seg.counts = TermCounts.load(d / mf.BM25)
        if seg.counts.passages != n:
            raise corrupt(path, f"segment {entry['name']}'s term counts cover {seg.counts.passages} passages")
    return seg


def read_alive(path: Path, manifest: dict, total: int) -> np.ndarray | None:
    """(total,) bool, False at the rows the manifest's tombstone file deletes; None when none are."""
    t = manifest.get("tombstones")
    if not t:
        return None
    try:
        dead = np.load(Path(path) / t["file"], allow_pickle=False)
    except (OSError, ValueError) as e:
        raise corrupt(path, f"cannot read {t['file']} ({e})") from None
    if len(dead) != t["rows"] or (len(dead) and (dead.min() < 0 or dead.max() >= total)):
        raise corrupt(path, f"{t['file']} does not hold the {t['rows']} deleted rows the manifest names")
    alive = np.ones(total, dtype=bool)
    alive[dead] = False
    return alive


def open_single(path: Path, manifest: dict[str, Any] | None = None, search: bool = True) -> IndexDir | LiveIndex:
    """Open a ``ragline-index`` directory, a plain index or one changed in place, as ``manifest`` (default: its
    own, read now; a shard's comes from its sharded index) describes it. ``search=False``: its store, vectors
    and tombstones only, for a change (``add``, ``delete``, ``compact``), which never searches it: at ten
    million passages the FAISS index and the live BM25 statistics are most of an open's time and memory."""
    path = Path(path).expanduser().resolve()
    manifest = manifest or mf.read_manifest(path)
    if mf.is_living(manifest):
        return LiveIndex.open(path, manifest, search)
    return IndexDir.open(path, manifest, search)


def live_bm25_stats(index: IndexDir | LiveIndex) -> BM25Stats:
    """The BM25 statistics of the live passages of ``index`` (opened with or without its search parts), from the
    term counts of its base and segments: what a rebuild over those passages counts (a sharded compact builds
    every shard with the sum of its shards'), without tokenising them again."""
    path, m = Path(index.path), index.manifest
    counts = [TermCounts.load(path / mf.BM25)] + [TermCounts.load(segment_dir(path, s["name"]) / mf.BM25)
                                                  for s in m.get("segments") or []]
    offsets = np.cumsum([0] + [c.passages for c in counts[:-1]])  # (parts,) first row of each
    parts = _bm25_parts(counts, offsets, getattr(index, "alive", None))
    return sum((c.stats(live) for c, _, live in parts), BM25Stats())


def _bm25_parts(counts: list[TermCounts], offsets, alive: np.ndarray | None
                ) -> list[tuple[TermCounts, int, np.ndarray | None]]:
    """(term counts, first row, live mask or None) of each part (base, segments) of an index, as
    :class:`LiveBM25` takes them."""
    return [(c, int(lo), None if alive is None else alive[lo:lo + c.passages])
            for c, lo in zip(counts, offsets, strict=True)]


def live_rows(index) -> np.ndarray:
    """The rows of ``index`` that are not deleted, ascending."""
    alive = getattr(index, "alive", None)
    return np.arange(len(index)) if alive is None else np.flatnonzero(alive)

