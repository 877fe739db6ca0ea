"""A sharded index served by Ray actors; implements :class:`ragline.index.protocol.Index`.

Layout (written by :mod:`ragline.scale.build`)::

    NAME/manifest.json        format "ragline-sharded-index": corpus, encoder, dense and BM25 settings, and
                              the shards with their first global row ("offset") and passage count
    NAME/shards/shard-0000/   a complete single index over rows [offset, offset + passages)
    ...

Global row = shard offset + the shard's own row, so rows, passage ids and scores are those of one index
over the whole corpus. Each shard is opened by one :class:`ShardServer` actor. A query fans out to every
shard and the per-shard top k are merged exactly (:mod:`ragline.scale.merge`); BM25 shards are built with
the whole corpus's statistics, so their scores merge exactly too, and hybrid retrieval fuses the merged dense
and BM25 rankings as it does for one index.

Changed in place (``ragline add``, ``update``, ``delete``, ``compact`` on a sharded index:
:mod:`ragline.scale.update`), the manifest holds each shard's own generation manifest (``manifest``: its
segments and tombstones) and the directory it is in (``dir``), so that the sharded manifest alone switches every
shard at once; BM25 is then scored in two rounds, the shards' live statistics summed first, so that scores stay
those of one index over the live corpus. A compaction rebuilds every shard's BM25 with the live corpus's
statistics, which returns BM25 to one round of precomputed scores until the next change.

Faults: actors restart when their process dies (``max_restarts``) and Ray retries the call in flight
(``max_task_retries``). A shard that is missing on disk, or whose actor cannot come back, is an error naming
the shard; a query never answers from a smaller corpus.

The format registers with :mod:`ragline.index.registry` through the ``ragline.index_formats`` entry point
(:data:`INDEX_FORMAT`), so every command that opens an index opens a sharded one too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.bm25_live import LiveBM25
from ragline.index.filters import Condition, row_mask, store_fields
from ragline.index.protocol import ManifestFacts, search_modes
from ragline.index.registry import IndexFormat
from ragline.index.segments import open_single
from ragline.index.sparse import TermCounts
from ragline.index.topk import merge_top_k
from ragline.scale.cluster import connect

FORMAT = "ragline-sharded-index"
FORMAT_VERSION = 1
LIVING_VERSION = 2  # changed in place: shards opened from the manifests inside, BM25 with live statistics
BM25_GENERATION = "bm25_generation"  # the generation whose shards' BM25 holds the whole corpus's statistics
SHARDS = "shards"
RESTARTS = 4  # actor restarts (and retries of the call in flight) before a shard counts as lost


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def shard_dir(path: Path, entry: dict[str, Any]) -> Path:
    """The directory of one shard (a compaction moves a shard to a new one)."""
    return Path(path) / SHARDS / entry.get("dir", entry["name"])


def bm25_is_live(manifest: dict[str, Any]) -> bool:
    """Whether BM25 is scored with live statistics summed over the shards (two rounds a query): the index was
    changed in place after its shards' BM25 parts were built with the whole corpus's statistics, by the build
    or by the last compaction (``BM25_GENERATION``, the generation that wrote them)."""
    return int(manifest.get("generation", 0)) != int(manifest.get(BM25_GENERATION, 0))


def read_sharded_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / mf.MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise RaglineError(f"cannot read the manifest of sharded index {path} ({e})",
                           "rebuild it with `ragline index --ray`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION, LIVING_VERSION):
        raise RaglineError(f"{path} is not a sharded ragline index of format version {FORMAT_VERSION}",
                           "rebuild it with this version's `ragline index --ray`")
    for s in manifest["shards"]:
        if not mf.is_index_dir(shard_dir(path, s)):
            raise RaglineError(f"shard {s['name']} of index {path.name} is missing ({shard_dir(path, s)})",
                               "restore the shard's directory, or rebuild with the same `ragline index --ray` "
                               "command and --force (finished shards are rebuilt too)")
    return manifest


class ShardServer:
    """One shard's index in a Ray actor: search, and passages and embeddings by row, in global rows."""

    def __init__(self, path: str, offset: int, fingerprint: str, manifest: dict[str, Any] | None = None,
                 living: bool = False) -> None:
        self.index = open_single(Path(path), manifest)
        if self.index.fingerprint != fingerprint:
            raise RaglineError(f"shard {path} has fingerprint {self.index.fingerprint}, the manifest says "
                               f"{fingerprint}", "rebuild the sharded index")
        self.offset = offset
        self.live: LiveBM25 | None = None  # BM25 scored with the whole live corpus's statistics
        if living and self.index.bm25 is not None:
            self.live = self.index.bm25 if isinstance(self.index.bm25, LiveBM25) else LiveBM25(
                [(TermCounts.load(Path(path) / mf.BM25), 0, None)], self.index.bm25.params)

    def pid(self) -> int:
        return os.getpid()

    def dense(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self._global(*self.index.dense.search(queries, min(k, len(self.index)), allowed))

    def bm25(self, queries: list[str], k: int, allowed: np.ndarray | None = None,
             corpus: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.index))
        if self.live is not None:
            return self._global(*self.live.search(queries, k, allowed, corpus))
        return self._global(*self.index.bm25.search(queries, k, allowed))

    def bm25_stats(self, queries: list[str]) -> tuple[int, int, list[dict[str, int]]]:
        return self.live.stats(queries)

    def _global(self, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scores, np.where(rows >= 0, rows + self.offset, -1)

    def passages(self, rows: np.ndarray) -> list[Passage]:
        return self.index.store.get(np.asarray(rows) - self.offset)

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.index.embeddings[np.asarray(rows) - self.offset], dtype=np.float32)

    def values(self, column: str) -> list[str]:
        return self.index.store.values(column)

    def find(self, pid: str) -> int:
        row = self.index.store.row_of(pid)
        return -1 if row is None else row + self.offset

    def fields(self) -> frozenset[str]:
        """The fields a filter may name on this shard (index/filters.py)."""
        return store_fields(self.index.store)

    def mask(self, conditions: list[Condition]) -> np.ndarray:
        """(shard rows,) bool: this shard's passages that pass every condition, worked out here."""
        return row_mask(self.index.store, conditions)


class ShardedIndex(ManifestFacts):
    """A sharded index opened on Ray: the :class:`~ragline.index.protocol.Index` of the whole corpus."""

    def __init__(self, path: Path, manifest: dict[str, Any], actors: list) -> None:
        self.path, self.manifest, self.actors = path, manifest, actors
        self.offsets = np.array([s["offset"] for s in manifest["shards"]], dtype=np.int64)
        self.store = ShardedStore(self)
        self.dense = ShardedSearch(self, "dense") if manifest.get("dense") else None
        self.bm25 = ShardedSearch(self, "bm25") if manifest.get("bm25") else None
        self.embeddings = ShardedEmbeddings(self) if manifest.get("dense") else None
        self.modes = search_modes(self.dense, self.bm25)

    @classmethod
    def open(cls, path: str | Path, address: str | None = None) -> ShardedIndex:
        path = Path(path).expanduser().resolve()
        manifest = read_sharded_manifest(path)
        ray = connect(address)
        server = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, num_cpus=0)(ShardServer)
        actors = [server.remote(str(shard_dir(path, s)), s["offset"], s["fingerprint"], s.get("manifest"),
                                bm25_is_live(manifest)) for s in manifest["shards"]]
        index = cls(path, manifest, actors)
        index.call("pid", [()] * len(actors))  # every shard opened, or a clear error now
        return index

    def __len__(self) -> int:
        return sum(int(s["passages"]) for s in self.manifest["shards"])

    @property
    def live_passages(self) -> int:
        return mf.live_passages(self.manifest)

    def call(self, method: str, args: list[tuple], shards: list[int] | None = None) -> list:
        """Call ``method`` on the given shards (all by default) with one argument tuple each; every answer or
        an error naming the shard that failed."""
        import ray

        shards = list(range(len(self.actors))) if shards is None else shards
        refs = [getattr(self.actors[i], method).remote(*a) for i, a in zip(shards, args, strict=True)]
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            bad = next((i for i, r in zip(shards, refs, strict=True) if _failed(r)), shards[0])
            raise RaglineError(f"shard {self.manifest['shards'][bad]['name']} of index {self.name} is unavailable "
                               f"after {RESTARTS} restarts ({type(e).__name__})",
                               "check the shard's files and the Ray cluster (`ray status`), then reopen the index"
                               ) from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), RaglineError) else None
            if cause is not None:
                raise cause from None
            raise

    def filter_fields(self) -> frozenset[str]:
        """The fields filters may name: every shard's (index/filters.py reads this once per opened index)."""
        return frozenset().union(*self.call("fields", [()] * len(self.actors)))

    def filter_mask(self, conditions: list[Condition]) -> np.ndarray:
        """(rows,) bool: each shard filters its own passages; only the masks come back, not the columns."""
        return np.concatenate(self.call("mask", [(conditions,)] * len(self.actors)))

    def fetch(self, method: str, rows: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Call ``method`` with its rows on each shard holding some of ``rows`` (1-D, global); (positions in
        ``rows``, that shard's answer) pairs."""
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        groups = [np.flatnonzero(shard == i) for i in np.unique(shard).tolist()]
        got = self.call(method, [(rows[pos],) for pos in groups], np.unique(shard).tolist())
        return list(zip(groups, got, strict=True))


def _failed(ref) -> bool:
    import ray

    try:
        ray.get(ref)
        return False
    except Exception:  # noqa: BLE001 - any failure marks the shard
        return True


class ShardedSearch:
    """``search`` of one kind (dense or BM25) over every shard, merged exactly."""

    def __init__(self, index: ShardedIndex, kind: str) -> None:
        self.index, self.kind = index, kind

    @property
    def ntotal(self) -> int:
        return len(self.index)

    def search(self, queries, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (B, k), as one index over the whole corpus would give; ``allowed``
        (global rows, bool) limits every shard's search to its slice of it."""
        shards = self.index.manifest["shards"]
        extra: tuple = ()
        if self.kind == "bm25" and bm25_is_live(self.index.manifest):  # first round: the live corpus's statistics
            stats = self.index.call("bm25_stats", [(queries,)] * len(shards))
            extra = ((sum(s[0] for s in stats), sum(s[1] for s in stats),
                      [dict(sum((Counter(s[2][b]) for s in stats), Counter())) for b in range(len(queries))]),)
        parts = self.index.call(self.kind, [(queries, k, None if allowed is None else
                                             allowed[s["offset"]:s["offset"] + s["passages"]], *extra)
                                            for s in shards])
        return merge_top_k(parts, k)


class ShardedStore:
    """Passages by global row, fetched from the shards that hold them."""

    def __init__(self, index: ShardedIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, rows) -> list[Passage]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"passage rows out of range 0..{len(self) - 1}")
        out: list[Passage | None] = [None] * len(rows)
        for pos, passages in self.index.fetch("passages", rows):
            for i, p in zip(pos.tolist(), passages, strict=True):
                out[i] = p
        return out  # type: ignore[return-value]

    def row_of(self, pid: str) -> int | None:
        found = [r for r in self.index.call("find", [(pid,)] * len(self.index.actors)) if r >= 0]
        return found[0] if found else None

    def values(self, column: str) -> list[str]:
        """One column for every row: the shards' columns in shard (= row) order."""
        return [v for part in self.index.call("values", [(column,)] * len(self.index.actors)) for v in part]


class ShardedEmbeddings:
    """d(z) by global row (``embeddings[rows]``), fetched from the shards: what RAG needs for p_eta(z|x)."""

    def __init__(self, index: ShardedIndex) -> None:
        self.index = index

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.index), int(self.index.manifest["encoder"]["dim"])

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self.shape[1]), dtype=np.float32)  # (n, dim)
        for pos, vecs in self.index.fetch("embeddings", flat):
            out[pos] = vecs
        return out.reshape(*rows.shape, -1)


INDEX_FORMAT = IndexFormat(FORMAT, read_sharded_manifest, ShardedIndex.open)
