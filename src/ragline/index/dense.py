"""Dense maximum-inner-product search with FAISS.

Index types (``--index-type``):
  flat    exact inner product over float32 vectors (the default; exact MIPS)
  hnsw    HNSW graph over float32 vectors (the paper's choice); efSearch tuned on build
  ivfpq   inverted lists + product quantisation (about 32x smaller); nprobe tuned on build
  sq8     8-bit scalar quantisation, exhaustive scan (4x smaller)
  ivfsq8  inverted lists + 8-bit scalar quantisation; nprobe tuned on build

The approximate types measure recall@10 against exact search on build, using stored passage vectors as
queries (each query's own passage removed from both result lists), and pick the smallest search parameter
(efSearch / nprobe) that reaches the target recall.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ragline.errors import RaglineError

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "sq8", "ivfsq8")
_SEARCH_PARAM = {"hnsw": "efSearch", "ivfpq": "nprobe", "ivfsq8": "nprobe"}
_HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)

# Small batches are otherwise scanned query by query instead of as one matrix product (PERFORMANCE.md).
faiss.cvar.distance_compute_blas_threshold = 20


def factory_string(kind: str, n: int, dim: int, hnsw_m: int = 32) -> str:
    """The FAISS factory string for ``kind`` sized for ``n`` vectors of ``dim`` dimensions."""
    if kind not in INDEX_TYPES:
        raise RaglineError(f"unknown index type {kind!r}", f"use one of {', '.join(INDEX_TYPES)}")
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind == "sq8":
        return "SQ8"
    if kind == "ivfsq8":
        return f"IVF{nlist},SQ8"
    # ivfpq: 8 dims per sub-quantiser where it divides; fewer code bits when there is little to train on
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0)
    nbits = max(4, min(8, int(math.log2(max(n, 16) / 39)) if n >= 16 * 39 else 4))
    return f"IVF{nlist},PQ{m}x{nbits}"


@dataclass
class BuildReport:
    kind: str
    factory: str
    seconds: float
    search_param: str | None = None
    search_value: int | None = None
    recall_at_10: float | None = None  # vs exact, measured on build


def build(embeddings: np.ndarray, kind: str, *, hnsw_m: int = 32, ef_construction: int = 80,
          target_recall: float = 0.95, add_batch: int = 65536, seed: int = 0) -> tuple[faiss.Index, BuildReport]:
    """Build a ``kind`` index over ``embeddings`` (n, d) float32 (may be a memmap, read in slices)."""
    n, dim = embeddings.shape
    fs = factory_string(kind, n, dim, hnsw_m)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, fs, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        ivf = faiss.try_extract_index_ivf(index)
        # IVF: ~64 points per list (and 256 codes x 64 for PQ); SQ8 only learns value ranges
        n_train = min(n, max(64 * ivf.nlist, 256 * 64 if kind == "ivfpq" else 0) if ivf else 65536)
        sample = np.sort(rng.choice(n, size=n_train, replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for lo in range(0, n, add_batch):
        index.add(np.ascontiguousarray(embeddings[lo : lo + add_batch], dtype=np.float32))
    report = BuildReport(kind, fs, 0.0)
    if kind != "flat":
        report.recall_at_10, report.search_param, report.search_value = _tune(index, embeddings, kind, target_recall)
    report.seconds = time.perf_counter() - t0
    return index, report


def _tune(index: faiss.Index, embeddings: np.ndarray, kind: str, target: float,
          n_queries: int = 500, k: int = 10, seed: int = 1) -> tuple[float, str | None, int | None]:
    """Smallest efSearch/nprobe whose recall@k against exact search reaches ``target``; (recall, name, value)."""
    n, _ = embeddings.shape
    k = min(k, n - 1)
    if k < 1:
        return 1.0, _SEARCH_PARAM.get(kind), None
    rng = np.random.default_rng(seed)
    qrows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = np.ascontiguousarray(embeddings[qrows], dtype=np.float32)
    exact = faiss.IndexFlatIP(embeddings.shape[1])
    for lo in range(0, n, 65536):
        exact.add(np.ascontiguousarray(embeddings[lo : lo + 65536], dtype=np.float32))
    truth = _drop_self(exact.search(queries, k + 1)[1], qrows, k)
    param = _SEARCH_PARAM.get(kind)
    if param is None:
        values = [None]
    elif param == "efSearch":
        values = [v for v in _HNSW_EF if v >= k] or [k]
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        values = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    recall = 0.0
    for v in values:
        if v is not None:
            faiss.ParameterSpace().set_index_parameter(index, param, v)
        got = _drop_self(index.search(queries, k + 1)[1], qrows, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got, strict=True)]))
        if recall >= target:
            return recall, param, v
    return recall, param, values[-1]


def _drop_self(ids: np.ndarray, qrows: np.ndarray, k: int) -> list[list[int]]:
    return [[int(i) for i in row if i != q and i >= 0][:k] for row, q in zip(ids, qrows, strict=True)]


class DenseIndex:
    """A loaded FAISS index. ``search`` takes (B, d) queries and returns (scores, rows), each (B, k)."""

    def __init__(self, index: faiss.Index, kind: str, search_param: str | None = None,
                 search_value: int | None = None, threads: int = 0) -> None:
        self.index, self.kind = index, kind
        self.threads = threads or faiss.omp_get_max_threads()
        if search_param and search_value:
            self.set_search_param(search_param, search_value)

    @classmethod
    def load(cls, path: Path, kind: str, search_param: str | None = None, search_value: int | None = None) -> DenseIndex:
        return cls(faiss.read_index(str(path)), kind, search_param, search_value)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    def set_search_param(self, name: str, value: int) -> None:
        faiss.ParameterSpace().set_index_parameter(self.index, name, int(value))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (B, d)
        # A single query runs faster on one OpenMP thread (PERFORMANCE.md); batches use them all.
        faiss.omp_set_num_threads(1 if len(queries) == 1 else self.threads)
        scores, rows = self.index.search(queries, k)  # (B, k) each; rows -1 where fewer than k found
        return scores, rows
