"""Building and tuning dense FAISS indexes (searched by :class:`ragline.index.dense.DenseIndex`).

Index types (``--index-type``):
  flat    exact inner product over float32 vectors (exact MIPS)
  fp16    the same scan over float16 copies of the vectors: half the memory and half the bytes a query reads
          (a million 384-dimension passages: about 26 ms a query against flat's 50, one core, docs/scale.md);
          scores differ from flat's by the float16 rounding of the stored vectors, none when they were float16
  hnsw    HNSW graph over float32 vectors (the paper's choice); efSearch tuned on build
  ivfpq   inverted lists + 4-bit product quantisation scanned with SIMD lookups (FAISS's fast scan; 32x
          smaller in memory than float32); nprobe tuned on build, and
          the best candidates (a depth tuned with nprobe) re-scored exactly from the stored embeddings (read
          on demand)
  sq8     8-bit scalar quantisation, exhaustive scan (4x smaller)
  ivfsq8  inverted lists + 8-bit scalar quantisation; nprobe tuned on build

``auto`` (the default, :func:`choose_type`) picks flat, fp16 or ivfpq by the number of passages and the memory.

Approximate types measure recall@10 against exact search on build and pick the smallest search parameter
(efSearch / nprobe) reaching the target on two query sets, reporting the lower recall: stored passage
vectors (each query's own passage left out) and pseudo-questions, the same vectors plus isotropic noise of
norm 1.7 (relative to the mean vector norm), whose similarity to their nearest passage (~0.5 with MiniLM) is
a little below that of real questions (~0.6 on FanOutQA). Neither set is safe alone: on the bundled corpus
passage vectors overstate HNSW recall for real questions (0.995 vs 0.94 at efSearch 16) while the noisy
ones tracked it within 0.01-0.03 on the low side; on tightly clustered data the noisy ones overstate IVF-PQ
recall for in-cluster queries.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np

from ragline.errors import RaglineError
from ragline.index.dense import RERANK, RERANK_FACTORS, SEARCH_PARAM, TUNE_K, DenseIndex
from ragline.vocab import AUTO_EXACT_MAX, AUTO_INDEX_TYPE, AUTO_MEMORY_SHARE, INDEX_TYPES

_HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
TUNE_NOISE = 1.7


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_type(n: int, dim: int, memory: int | None = None) -> tuple[str, str]:
    """``--index-type auto``: (type, why) for ``n`` vectors of ``dim`` dimensions on a machine with ``memory``
    bytes (default: this one's). Exact float32 search while a query's scan stays short; the exact scan over
    float16 vectors while they fit in AUTO_MEMORY_SHARE of the memory; IVF-PQ (compressed, re-ranked exactly)
    beyond (the thresholds: :mod:`ragline.vocab`)."""
    memory = memory_bytes() if memory is None else memory
    if n <= AUTO_EXACT_MAX:
        return "flat", f"{n:,} passages: exact search (at most {AUTO_EXACT_MAX:,} passages)"
    need = n * dim * 2
    if need <= AUTO_MEMORY_SHARE * memory:
        return "fp16", (f"{n:,} passages: exact search over float16 vectors ({need / 2**30:.1f} GiB, within "
                        f"{AUTO_MEMORY_SHARE:.0%} of the {memory / 2**30:.0f} GiB of memory)")
    return "ivfpq", (f"{n:,} passages: float16 vectors would take {need / 2**30:.1f} GiB, more than "
                     f"{AUTO_MEMORY_SHARE:.0%} of the {memory / 2**30:.0f} GiB of memory: IVF-PQ")


def resolve_type(kind: str, n: int, dim: int) -> tuple[str, str | None]:
    """(type, why): ``kind`` itself, or for ``auto`` the type :func:`choose_type` picks and why."""
    return choose_type(n, dim) if kind == AUTO_INDEX_TYPE else (kind, None)


def factory_string(kind: str, n: int, dim: int, hnsw_m: int = 32) -> str:
    """The FAISS factory string for ``kind`` sized for ``n`` vectors of ``dim`` dimensions."""
    if kind not in INDEX_TYPES:
        raise RaglineError(f"unknown index type {kind!r}", f"use one of {', '.join(INDEX_TYPES)}")
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
    if kind == "flat":
        return "Flat"
    if kind == "fp16":
        return "SQfp16"
    if kind == "hnsw":
        return f"HNSW{hnsw_m},Flat"
    if kind == "sq8":
        return "SQ8"
    if kind == "ivfsq8":
        return f"IVF{nlist},SQ8"
    # ivfpq: 4 dims (else 3, 2, 1) per 4-bit sub-quantiser, scanned by FAISS's SIMD lookups ("fs", fast scan):
    # the bytes of PQ{dim/8}x8 at a third of its scan time (1M passages, every list: 8.8 ms against 25, one
    # thread) and the better recall (0.964 against 0.951 re-ranked, docs/scale.md)
    per = next(p for p in (4, 3, 2, 1) if dim % p == 0)  # dims per sub-quantiser
    return f"IVF{nlist},PQ{dim // per}x4fs"


@dataclass
class BuildReport:
    """How a dense index was built: FAISS factory, time, tuned search parameter and measured recall."""

    kind: str
    factory: str
    seconds: float
    search_param: str | None = None
    search_value: int | None = None
    rerank: int = 0
    recall_at_10: float | None = None  # vs exact, measured on build with the chosen settings


def build(embeddings: np.ndarray, kind: str, *, hnsw_m: int = 32, ef_construction: int = 80,
          target_recall: float = 0.95, add_batch: int = 65536, seed: int = 0,
          fill_flat: bool = True) -> tuple[DenseIndex, BuildReport]:
    """Build a ``kind`` index over ``embeddings`` (n, d) float32 (may be a memmap, read in slices).
    ``fill_flat=False``: a flat index is left empty, for a build that only saves it (:meth:`DenseIndex.save`
    writes a flat index's header only; its vectors are the embeddings saved beside it)."""
    n, dim = embeddings.shape
    fs = factory_string(kind, n, dim, hnsw_m)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, fs, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index.hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        ivf = faiss.try_extract_index_ivf(index)
        # IVF: ~64 points per list (and 256 codes x 64 for PQ); SQ8 only learns value ranges, fp16 nothing
        n_train = min(n, max(64 * ivf.nlist, 256 * 64 if kind == "ivfpq" else 0) if ivf else 65536)
        sample = np.sort(rng.choice(n, size=n_train, replace=False))
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    if fill_flat or kind != "flat":
        reserve_codes(index, n)
        for lo in range(0, n, add_batch):
            index.add(np.ascontiguousarray(embeddings[lo : lo + add_batch], dtype=np.float32))
    dense = DenseIndex(index, kind, SEARCH_PARAM.get(kind), None, RERANK.get(kind, 0), embeddings)
    report = BuildReport(kind, fs, 0.0, dense.search_param, rerank=dense.rerank)
    if kind != "flat":  # fp16 too: its recall against the float32 scan, measured
        report.recall_at_10, report.search_value = _tune(dense, embeddings, target_recall)
        dense.search_value, report.rerank = report.search_value, dense.rerank
    report.seconds = time.perf_counter() - t0
    return dense, report


def reserve_codes(index: faiss.Index, n: int) -> None:
    """Allocate room for ``n`` codes at once in an index that stores one code per vector in one array (flat,
    fp16, SQ8, and HNSW's float32 storage); other types are left as they are.

    Filled in batches, that array (a std::vector) doubles its capacity whenever it is full, and each doubling
    copies the old buffer into the new one with both held: at ten million 384-d float32 vectors (15.4 GB) the
    last doubling would hold 12.9 GB twice, more than a 24 GiB machine has. Resizing to ``n`` codes and back
    to none keeps the capacity (a std::vector never shrinks on resize), so the batches fill it in place and the
    build's peak is the index's own size."""
    flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if isinstance(flat, faiss.IndexFlatCodes) and flat.ntotal == 0:
        flat.codes.resize(n * flat.code_size)  # one allocation of the final size
        flat.codes.resize(0)  # empty again, the capacity kept


def tuning_queries(embeddings: np.ndarray, n_queries: int = 500, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two query sets for tuning, from ``n_queries`` random stored vectors: the vectors themselves (their
    rows are returned, to be excluded from the results) and pseudo-questions, the same vectors plus
    isotropic noise of norm TUNE_NOISE x their norm."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(embeddings), size=min(n_queries, len(embeddings)), replace=False))
    x = np.asarray(embeddings[rows], dtype=np.float32)
    scale = float(np.mean(np.linalg.norm(x, axis=1)))
    g = rng.standard_normal(x.shape).astype(np.float32)
    g *= TUNE_NOISE * scale / np.linalg.norm(g, axis=1, keepdims=True)
    q = x + g
    noisy = np.ascontiguousarray(q * (scale / np.linalg.norm(q, axis=1, keepdims=True)), dtype=np.float32)
    return rows, noisy


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Rows of the exact top-k inner products, (Q, k), streaming ``embeddings`` (may be a memmap) in
    chunks so that a corpus larger than memory never has to be loaded whole."""
    best_s = np.zeros((len(queries), 0), dtype=np.float32)  # (Q, <=k) running top-k
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, len(embeddings), chunk):
        block = np.asarray(embeddings[lo : lo + chunk], dtype=np.float32)  # (c, d)
        s = queries @ block.T  # (Q, c)
        if s.shape[1] > k:  # the block's own top k first: the merge then handles (Q, 2k), not (Q, k + c)
            local = np.argpartition(-s, k - 1, axis=1)[:, :k]  # (Q, k) block rows, unordered
            s = np.take_along_axis(s, local, 1)
        else:
            local = np.broadcast_to(np.arange(s.shape[1]), s.shape)
        s, r = np.concatenate([best_s, s], axis=1), np.concatenate([best_r, local + lo], axis=1)  # (Q, <=2k)
        keep = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]  # (Q, k), unordered
        best_s, best_r = np.take_along_axis(s, keep, 1), np.take_along_axis(r, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_r, order, 1)


def recall_against_exact(index: DenseIndex, queries: np.ndarray, truth: np.ndarray, k: int = TUNE_K,
                         exclude: np.ndarray | None = None) -> float:
    """Mean |top-k(index) ∩ top-k(exact)| / k over ``queries``, ``truth`` being exact_top_k(.., k + 1);
    ``exclude`` (one row per query, e.g. the query's own passage) is removed from both lists first."""
    return recall_of(index.search(queries, truth.shape[1])[1], truth, k, exclude)


def recall_of(got: np.ndarray, truth: np.ndarray, k: int, exclude: np.ndarray | None = None) -> float:
    """:func:`recall_against_exact` of result rows ``got`` (Q, >= k + 1)."""
    pairs = zip(_top_kept(truth, k, exclude), _top_kept(got, k, exclude), strict=True)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in pairs]))


def _top_kept(ids: np.ndarray, k: int, exclude: np.ndarray | None = None) -> list[list[int]]:
    """Each row of ``ids`` (Q, m) without its ``exclude`` row and missing (-1) entries, cut to its first k."""
    skip = exclude.tolist() if exclude is not None else [-1] * len(ids)
    return [[i for i in row if i != s and i >= 0][:k] for row, s in zip(ids.tolist(), skip, strict=True)]


def _tune(dense: DenseIndex, embeddings: np.ndarray, target: float) -> tuple[float, int | None]:
    """Smallest efSearch/nprobe whose recall@10 against exact search reaches ``target`` on both tuning
    query sets (the lower of the two is reported): (recall, value).

    A re-ranked index (IVF-PQ) also tunes how many candidates it re-ranks exactly (``dense.rerank`` x TUNE_K,
    RERANK_FACTORS): product-quantised scores can rank a query's true neighbours far down (at 10M passages,
    recall@10 0.45 probing every list with 40 candidates re-ranked, 0.91 with 2,560 at nprobe 2,048; at 3M
    with fast-scan codes, probing every list, 0.936 with 2,560, 0.970 with 5,120, 0.989 with 10,240). The
    (nprobe, depth) pairs are tried cheapest first by :func:`_cost`. Where no setting reaches the target, the
    one with the best recall is kept."""
    rows, noisy = tuning_queries(embeddings)
    stored = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    k = min(TUNE_K, len(embeddings) - 1)
    if k < 1:
        return 1.0, None
    truth_noisy, truth_stored = exact_top_k(embeddings, noisy, k + 1), exact_top_k(embeddings, stored, k + 1)
    sets = ((noisy, truth_noisy, None), (stored, truth_stored, rows))
    if dense.search_param is None:
        values: list[int | None] = [None]
    elif dense.search_param == "efSearch":
        values = list(_HNSW_EF)
    else:
        nlist = faiss.extract_index_ivf(dense.index).nlist
        values = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
    factors = [f for f in RERANK_FACTORS if f >= dense.rerank] if dense.rerank else [0]
    grid = sorted(((v, f) for v in values for f in factors), key=lambda vf: _cost(dense, *vf))
    measured: dict[int | None, dict[int, float]] = {}
    best = (-1.0, grid[0])
    for v, f in grid:
        if v not in measured:
            dense.search_value = v
            measured[v] = dict(_recalls(dense, factors, sets, k))
        recall = measured[v][f]
        if recall > best[0]:
            best = (recall, (v, f))
        if recall >= target:
            break
    else:
        recall, (v, f) = best
    dense.search_value, dense.rerank = v, f
    return recall, v


def _cost(dense: DenseIndex, value: int | None, factor: int) -> float:
    """A query's rough cost at search ``value`` and re-ranking ``factor``, to order the tuning's tries: for IVF,
    the bytes of codes scanned (nprobe x n / nlist lists' codes) plus those of the re-ranked rows (factor x
    TUNE_K float32 vectors); otherwise the search value itself."""
    if dense.search_param != "nprobe" or value is None:
        return float(value or 0)
    ivf = faiss.extract_index_ivf(dense.index)
    return value * dense.ntotal / ivf.nlist * ivf.code_size + factor * TUNE_K * dense.dim * 4


def _recalls(dense: DenseIndex, factors: list[int], sets, k: int) -> list[tuple[int, float]]:
    """(factor, recall@k on the worse query set) for each re-ranking factor (0: none) at the current search
    value; ``sets`` holds (queries, exact_top_k truth, rows to exclude or None). The candidates come from one
    search at the deepest factor; each factor's depth is a prefix of them, as a search at that factor asks
    for. Re-ranked exactly, a prefix's top k holds every true top-k neighbour it contains (no other candidate
    scores above one), so its recall is the share of the true top k among the prefix (:func:`found_at_depth`):
    no stored vector is read (at 10M passages, reading a query's 20,480 candidates' rows took 140 ms)."""
    if factors == [0]:
        return [(0, min(recall_against_exact(dense, q, truth, k, exclude=ex) for q, truth, ex in sets))]
    worst = dict.fromkeys(factors, 1.0)
    for q, truth, ex in sets:
        dense.rerank = max(factors)
        deep = dense.index.search(q, dense.depth(truth.shape[1]), params=dense._params(truth.shape[1]))[1]  # (Q, D)
        found = found_at_depth(deep, truth, k, ex)  # (Q, k)
        for f in factors:
            dense.rerank = f
            worst[f] = min(worst[f], float(np.mean(np.sum(found < dense.depth(truth.shape[1]), axis=1) / k)))
    return list(worst.items())


def found_at_depth(cand: np.ndarray, truth: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Where each query's true top-k neighbours (``truth`` (Q, >= k + 1) less the ``exclude`` row, as in
    :func:`recall_of`) stand among its candidates ``cand`` (Q, D): (Q, k) positions, D where one is absent
    (or the truth has fewer than k)."""
    out = np.full((len(cand), k), cand.shape[1], dtype=np.int64)  # (Q, k)
    for b, (row, want) in enumerate(zip(cand, _top_kept(truth, k, exclude), strict=True)):
        pos = np.flatnonzero(np.isin(row, want))  # positions of the candidates that are true neighbours
        out[b, : len(pos)] = pos[:k]
    return out
