"""Dense maximum-inner-product search over a FAISS index (built by :mod:`ragline.index.dense_build`).

Search paths, chosen by measurement on this CPU (benchmarks/retrieval.py): a single query on the flat
index is a BLAS matrix-vector product over FAISS's own vector array (bandwidth-bound, about 2x FAISS's
single-query scan), one at a time: concurrent scans only compete for memory bandwidth; batches go to FAISS
with its BLAS threshold lowered so that they become one matrix product. Single queries use one thread
(FAISS's OpenMP, numpy's BLAS), which is faster than two for them once a question encoder shares the cores.
Compressed indexes (IVF-PQ) re-score their best ``RERANK x k`` candidates exactly from the stored vectors.

A flat index's vectors are the stored embeddings themselves (``embeddings.npy``, float32), so a flat index is
saved without them, its header only, and filled from them when it is loaded (:func:`fill_flat`): the vectors
are on disk once (at ten million 384-d passages 15.4 GB was stored twice, in both files). A flat index saved
whole (before this) loads as it is. HNSW keeps its own copy: FAISS reads its graph only with its storage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from ragline.index.npy_rows import NpyRows
from ragline.index.topk import merge_top_k, top_k

SEARCH_PARAM = {"hnsw": "efSearch", "ivfpq": "nprobe", "ivfsq8": "nprobe"}
RERANK = {"ivfpq": 4}  # candidates per result re-scored exactly from the stored vectors (at least; tuned on build)
RERANK_FACTORS = (4, 16, 64, 256, 512, 1024, 2048)  # re-ranking depths (x TUNE_K candidates) a build tries
TUNE_K = 10  # approximate indexes are tuned for recall@10 (dense_build); efSearch scales with k from there

faiss.cvar.distance_compute_blas_threshold = 20


class DenseIndex:
    """A loaded FAISS index. ``search`` takes (B, d) queries and returns (scores, rows), each (B, k).

    ``vectors`` (the stored float32 embeddings, may be a memmap) enables exact re-ranking for compressed
    indexes; ``search_value`` is efSearch (for k = 10; scaled up for larger k) or nprobe.
    """

    def __init__(self, index: faiss.Index, kind: str, search_param: str | None = None,
                 search_value: int | None = None, rerank: int = 0, vectors: np.ndarray | None = None,
                 threads: int = 0) -> None:
        self.index, self.kind = index, kind
        self.search_param, self.search_value = search_param, search_value
        self.rerank = rerank if vectors is not None else 0
        self.vectors = vectors
        self.threads = threads or faiss.omp_get_max_threads()
        self._xb: np.ndarray | None = None
        self._gemv_lock = threading.Lock()

    @classmethod
    def load(cls, path, kind: str, search_param: str | None = None, search_value: int | None = None,
             rerank: int = 0, vectors: np.ndarray | None = None) -> DenseIndex:
        """The index saved at ``path``; a flat one saved without its vectors is filled from ``vectors`` (n, d)
        float32, the stored embeddings (a memory map of ``embeddings.npy`` is read with file calls)."""
        index = faiss.read_index(str(path))
        if kind == "flat" and index.ntotal == 0 and vectors is not None and len(vectors):
            fill_flat(index, vectors)
        return cls(index, kind, search_param, search_value, rerank, vectors)

    def save(self, path) -> None:
        """Write the index to ``path``; a flat index without its vectors (its header only): they are the
        stored embeddings, saved beside it, which :meth:`load` fills it from."""
        index = faiss.IndexFlat(self.dim, self.index.metric_type) if self.kind == "flat" else self.index
        faiss.write_index(index, str(path))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def _params(self, k: int, selector: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        if not self.search_value:
            return faiss.SearchParameters(sel=selector) if selector is not None else None
        if self.search_param == "efSearch":  # tuned for k = 10: keep the same breadth per result
            ef = max(self.search_value, self.search_value * k // TUNE_K, k)
            return faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
        return faiss.SearchParametersIVF(nprobe=self.search_value, sel=selector)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k). ``allowed`` (n,) bool, if given, limits the search to those rows: the
        best k among them (FAISS's ID selector: exact for flat and re-ranked indexes, as approximate as the
        index for the others), never fewer than k while k of them exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (B, d)
        if self.kind == "flat" and len(queries) == 1:
            return self._gemv_top_k(queries[0], k, allowed)
        faiss.omp_set_num_threads(1 if len(queries) == 1 else self.threads)
        bitmap = None if allowed is None else np.packbits(allowed, bitorder="little")  # alive through the search
        selector = None if bitmap is None else faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        scores, rows = self.index.search(queries, self.depth(k), params=self._params(k, selector))  # (B, depth)
        if self.rerank:
            scores, rows = self._rerank(queries, rows, k)
        scores[rows < 0] = 0.0
        return scores, rows  # (B, k); rows -1 where fewer than k were found

    def depth(self, k: int) -> int:
        """How many candidates a search for ``k`` asks FAISS for: ``k``, or with re-ranking the tuned
        ``rerank x TUNE_K`` (what recall@10 needed on build) and at least ``RERANK x k``: a hybrid query's 100
        candidates then cost what the tuning measured, not 100 times the per-result depth."""
        if not self.rerank:
            return k
        return min(self.ntotal, max(k * RERANK["ivfpq"], self.rerank * TUNE_K))

    def _gemv_top_k(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self._xb is None:  # zero-copy view of FAISS's vector array, (n, d)
            self._xb = faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)
        with self._gemv_lock, _numpy_blas_threads(1):  # bandwidth-bound: concurrent scans only slow each other
            s = self._xb @ q  # (n,)
        if allowed is None:
            top = top_k(s, k)
            return s[top][None, :].astype(np.float32), top[None, :].astype(np.int64)
        kept = np.flatnonzero(allowed)
        top = kept[top_k(s[kept], k, kept)]
        scores = np.zeros((1, k), dtype=np.float32)
        rows = np.full((1, k), -1, dtype=np.int64)
        scores[0, :len(top)], rows[0, :len(top)] = s[top], top
        return scores, rows

    def _rerank(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact q·d(z) for each query's candidates (read from the stored vectors), best k kept."""
        return merge_top_k([(self.candidate_scores(queries, cand), cand)], k)

    def candidate_scores(self, queries: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact q·d(z) of each query's candidate rows ``cand`` (B, depth), read from the stored vectors in row
        order: (B, depth), -inf where a candidate is missing (row -1)."""
        out = np.full(cand.shape, -np.inf, dtype=np.float32)  # (B, depth)
        with _numpy_blas_threads(1 if len(queries) == 1 else 0):  # a lone query's gemv: as _gemv_top_k
            for b, (q, c) in enumerate(zip(queries, cand, strict=True)):
                have = np.flatnonzero(c >= 0)
                pos = have[np.argsort(c[have], kind="stable")]  # sorted reads from a memmap
                out[b, pos] = np.asarray(self.vectors[c[pos]], dtype=np.float32) @ q  # (found,)
        return out


def fill_flat(index: faiss.IndexFlat, vectors: np.ndarray, chunk_rows: int = 65536) -> None:
    """Fill the empty flat ``index`` with ``vectors`` (n, d) float32: its array allocated once at its final size
    and read into in place, ``chunk_rows`` at a time (straight from the file with read calls when ``vectors`` is
    a memory map of a ``.npy`` file or :class:`NpyRows`: no second copy, and no mapped pages left counted in
    the process's memory)."""
    n, d = vectors.shape
    if index.ntotal or d != index.d:
        raise ValueError(f"cannot fill a flat index of {index.ntotal} vectors of dimension {index.d} with "
                         f"({n}, {d}) vectors")
    index.codes.resize(n * index.code_size)  # one allocation of the final size
    dst = faiss.rev_swig_ptr(index.codes.data(), n * index.code_size).view(np.float32).reshape(n, d)  # (n, d)
    if isinstance(vectors, np.memmap) and vectors.filename:
        whole = NpyRows(vectors.filename)
        if whole.shape == (n, d):
            vectors = whole  # the whole file mapped: read it with read calls instead
    direct = isinstance(vectors, NpyRows) and vectors.dtype == np.float32
    for lo in range(0, n, chunk_rows):
        if direct:
            vectors.read_into(lo, dst[lo : lo + chunk_rows])
        else:
            dst[lo : lo + chunk_rows] = vectors[lo : lo + chunk_rows]
    index.ntotal = n


@contextmanager
def _numpy_blas_threads(n: int) -> Iterator[None]:
    """numpy's BLAS limited to ``n`` threads (0: left as it is). The single-query scan runs right after the
    question encoder, whose torch OpenMP threads keep spinning for a while; numpy's own BLAS threads then
    fight them for the cores: 50 ms instead of 1 ms per query on 2 cores (measured with benchmarks/scale.py).
    One thread scans the bundled index in about 1.3 ms and leaves the cores to torch's spinning threads."""
    if not n:  # as they are
        yield
        return
    libs = _numpy_blas()
    with _BLAS_LOCK:  # one setter at a time: interleaved ones would restore each other's setting
        before = [lib.num_threads for lib in libs]
        for lib in libs:
            lib.set_num_threads(n)
        try:
            yield
        finally:
            for lib, k in zip(libs, before, strict=True):
                lib.set_num_threads(k)


_NUMPY_BLAS: list | None = None
_BLAS_LOCK = threading.Lock()


def _numpy_blas() -> list:
    global _NUMPY_BLAS
    if _NUMPY_BLAS is None:
        from threadpoolctl import ThreadpoolController

        _NUMPY_BLAS = [lib for lib in ThreadpoolController().lib_controllers
                       if lib.user_api == "blas" and "numpy" in str(lib.filepath)]
    return _NUMPY_BLAS
