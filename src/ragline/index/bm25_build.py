"""BM25's index built in bounded memory, whatever the corpus's size.

bm25s builds its score matrix from a Python list of token-id lists (about 25 bytes a token on CPython: 1.5
GiB for the 60M tokens of a million passages) and a Python loop per passage, then converts three more
arrays of that size into the matrix (measured at 1M passages: 3.4 GiB at peak, 80 s). Counting the whole
corpus's int32 token ids at once instead still grew with the corpus (1.9 GiB at peak for 1M passages,
measured). Here the passages are counted in runs of RUN_TOKENS tokens (:func:`count_runs`: a flat int32 array of
token ids, one sparse conversion to (term, passage) counts, written to disk), the runs are merged term-major
in blocks of BLOCK_PAIRS pairs (:func:`merge_runs`), and the Lucene / Robertson / ATIRE score of every
(term, passage) pair,

    idf_t * tf / (tf + k1 (1 - b + b |d| / avgdl))                     (Lucene, Robertson)
    idf_t * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))            (ATIRE)

is computed block by block (:func:`score_pairs`), in the floating-point types bm25s computes it in, so the
matrix equals bm25s's own value for value (tests/test_bm25_build.py); every array is written to its file
block after block. A build's memory is then one run or one block, plus 8 bytes a passage (lengths) and the
vocabulary. BM25L and BM25+ keep bm25s's path, in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ragline.index.npy_rows import NpyRows, NpyWriter

LEAN_METHODS = ("lucene", "robertson", "atire")
SLICE = 1 << 22  # (term, passage) pairs scored at a time: four float64 arrays of 32 MiB


def tokenize_flat(texts: Iterable[list[str]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts (successive chunks, each tokenised with ``update_vocab``) as one flat int32
    array, (tokens,), and each passage's length, (passages,) int64."""
    flats, lens = [], []
    for chunk in texts:
        ids = tokenizer.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False)
        lens.append(np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids)))
        flats.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lens[-1].sum())))
    if not flats:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(flats), np.concatenate(lens)


def flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists as :func:`tokenize_flat` returns them: (flat ids, lengths)."""
    lens = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lens.sum())), lens


def count_terms(flat: np.ndarray, lens: np.ndarray, vocab: dict[str, int]) -> sp.csc_matrix:
    """How often each term of ``vocab`` (token -> id) occurs in each passage: (passages, terms) int32 counts,
    term-major (CSC), passages ascending within each term."""
    n_terms = max(vocab.values(), default=-1) + 1
    index_dtype = np.int32 if len(flat) < 2**31 - 1 else np.int64
    indptr = np.zeros(len(lens) + 1, dtype=index_dtype)
    np.cumsum(lens, out=indptr[1:])
    by_passage = sp.csr_matrix((np.ones(len(flat), dtype=np.int32), flat.astype(index_dtype, copy=False), indptr),
                               shape=(len(lens), n_terms))
    by_passage.sum_duplicates()  # one entry per (passage, term), its count
    out = by_passage.tocsc()
    out.sort_indices()
    return out


def score_pairs(tf_counts: np.ndarray, doc_len: np.ndarray, idf: np.ndarray, avg_doc_len: float, method: str,
                k1: float, b: float, weak_average: bool, dtype: str = "float32") -> np.ndarray:
    """The BM25 score of each (term, passage) pair, (pairs,) ``dtype``, from its count, its passage's length
    (pairs,) and its term's idf (pairs,), in the floating-point types bm25s computes it in.

    bm25s computes a passage's term-frequency part with its length a Python int and the average either a
    numpy float64 (its own index: float64 arithmetic) or, for a shard scored with a whole corpus's statistics,
    a Python float (``weak_average``: NumPy then keeps float32); each case is reproduced here."""
    if method not in LEAN_METHODS:
        raise ValueError(f"method {method!r} is built by bm25s itself")
    data = np.empty(len(tf_counts), dtype=dtype)
    for lo in range(0, len(tf_counts), SLICE):
        hi = min(lo + SLICE, len(tf_counts))
        tf = tf_counts[lo:hi].astype(np.float32)
        norm = k1 * ((1 - b) + b * doc_len[lo:hi].astype(np.float64) / avg_doc_len)  # float64
        if weak_average:  # a Python float per passage: cast to float32 before meeting the float32 counts
            norm = norm.astype(np.float32)
        tfc = tf / (norm + tf) if method != "atire" else (tf * np.float32(k1 + 1)) / (tf + norm)
        data[lo:hi] = idf[lo:hi] * tfc
    return data


# --- builds in bounded memory: counted in runs, merged in term blocks -----------------------------------------

RUN_TOKENS = 1 << 25   # tokens counted in memory at a time: ~0.5 GiB of working memory, ~550k passages of 100 words
BLOCK_PAIRS = 1 << 23  # (term, passage) pairs merged and scored at a time: ~0.3 GiB of working memory


@dataclass
class Run:
    """The term counts of consecutive passages, on disk: term ``t``'s pairs are ``indptr[t]:indptr[t + 1]`` of
    ``rows`` (global passage rows, ascending) and ``counts`` (both 1-d int32 ``.npy`` files)."""

    indptr: np.ndarray  # (terms seen by the end of this run + 1,) int64
    rows: Path
    counts: Path


def count_runs(texts: Iterable[list[str]], tokenizer, scratch: Path,
               run_tokens: int = RUN_TOKENS) -> tuple[list[Run], np.ndarray]:
    """Tokenise texts (successive chunks, one growing vocabulary) and count each run of about ``run_tokens``
    tokens into ``scratch``: (the runs, every passage's length (passages,) int64). Memory: one run's tokens,
    never the corpus's; the runs on disk take 8 bytes a (term, passage) pair."""
    scratch.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    lens_all: list[np.ndarray] = []
    flats: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    first = held = 0

    def flush() -> None:
        nonlocal flats, lens, first, held
        if not lens:
            return
        ln = np.concatenate(lens)
        counts = count_terms(np.concatenate(flats), ln, tokenizer.get_vocab_dict())  # (run passages, terms)
        r = Run(counts.indptr.astype(np.int64), scratch / f"run{len(runs)}.rows.npy",
                scratch / f"run{len(runs)}.counts.npy")
        np.save(r.rows, counts.indices.astype(np.int32) + np.int32(first))
        np.save(r.counts, counts.data.astype(np.int32, copy=False))
        runs.append(r)
        lens_all.append(ln)
        first += len(ln)
        flats, lens, held = [], [], 0

    for chunk in texts:
        flat, ln = tokenize_flat([chunk], tokenizer)
        flats.append(flat)
        lens.append(ln)
        held += len(flat)
        if held >= run_tokens:
            flush()
    flush()
    return runs, (np.concatenate(lens_all) if lens_all else np.zeros(0, np.int64))


def merged_indptr(runs: list[Run], n_terms: int) -> np.ndarray:
    """(n_terms + 1,) int64: where each term's pairs start once the runs are merged, term-major."""
    df = np.zeros(n_terms, dtype=np.int64)
    for r in runs:
        df[: len(r.indptr) - 1] += np.diff(r.indptr)
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    return indptr


def merge_runs(runs: list[Run], indptr: np.ndarray, block_pairs: int = BLOCK_PAIRS
               ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """The runs' pairs merged term-major in blocks of about ``block_pairs`` (a term with more is a block of
    its own): (first term, end term, rows, counts) with rows and counts (block pairs,) int32, each term's
    passages ascending (a run's passages all follow the previous run's). Each block reads its slice of every
    run with file calls (:class:`NpyRows`), so memory stays a block's."""
    n_terms = len(indptr) - 1
    parts = []
    for r in runs:  # each run's indptr over every term (terms it never saw hold no pairs)
        ip = np.concatenate([r.indptr, np.full(n_terms + 1 - len(r.indptr), r.indptr[-1], dtype=np.int64)])
        parts.append((ip, NpyRows(r.rows, ndim=1), NpyRows(r.counts, ndim=1)))
    t0 = 0
    while t0 < n_terms:
        t1 = int(np.searchsorted(indptr, indptr[t0] + block_pairs, side="right")) - 1
        t1 = min(n_terms, max(t0 + 1, t1))
        base = int(indptr[t0])
        rows = np.empty(int(indptr[t1]) - base, dtype=np.int32)
        counts = np.empty_like(rows)
        fill = indptr[t0:t1] - base  # (block terms,) where each term's next pair goes in the block
        for ip, rr, cr in parts:
            a, b = int(ip[t0]), int(ip[t1])
            if a == b:
                continue
            per_term = np.diff(ip[t0 : t1 + 1])  # (block terms,) this run's pairs of each term
            dest = np.repeat(fill - ip[t0:t1], per_term) + np.arange(a, b)  # (run's block pairs,)
            rows[dest], counts[dest] = rr[a:b], cr[a:b]
            fill = fill + per_term
        yield t0, t1, rows, counts
        t0 = t1


@dataclass
class Scoring:
    """What :func:`write_runs` needs to score pairs as bm25s does: idf per term, the average length and the
    variant's constants (``weak_average``: see :func:`score_pairs`)."""

    idf: np.ndarray  # (terms,) dtype
    avg_doc_len: float
    method: str
    k1: float
    b: float
    weak_average: bool
    dtype: str = "float32"


COUNT_FILES = ("tf_indptr", "tf_rows", "tf_counts", "doc_len")  # TermCounts' arrays, one .npy file each
SCORE_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")  # bm25s's names


def write_runs(runs: list[Run], indptr: np.ndarray, lens: np.ndarray, out_dir: Path,
               scoring: Scoring | None = None, block_pairs: int = BLOCK_PAIRS) -> None:
    """Merge the runs (whose merged term pointers are ``indptr``, :func:`merged_indptr`) into ``out_dir``: the
    term counts (COUNT_FILES) and, with ``scoring``, bm25s's score matrix (SCORE_FILES), each written block
    after block."""
    nnz = int(indptr[-1])
    np.save(out_dir / "tf_indptr.npy", indptr)
    np.save(out_dir / "doc_len.npy", lens.astype(np.int32))
    files = {"tf_rows": (out_dir / "tf_rows.npy", np.int32), "tf_counts": (out_dir / "tf_counts.npy", np.int32)}
    if scoring is not None:
        np.save(out_dir / SCORE_FILES[2], indptr.astype(np.int32 if nnz < 2**31 - 1 else np.int64))
        files["data"] = (out_dir / SCORE_FILES[0], np.dtype(scoring.dtype))
        files["indices"] = (out_dir / SCORE_FILES[1], np.int32)
        idf = np.asarray(scoring.idf, dtype=scoring.dtype)
    with ExitStack() as stack:
        w = {k: stack.enter_context(NpyWriter(path, nnz, None, dtype)) for k, (path, dtype) in files.items()}
        for t0, t1, rows, counts in merge_runs(runs, indptr, block_pairs):
            w["tf_rows"].write(rows)
            w["tf_counts"].write(counts)
            if scoring is not None:
                term = np.repeat(np.arange(t0, t1, dtype=np.int32), np.diff(indptr[t0 : t1 + 1]))  # (pairs,)
                w["data"].write(score_pairs(counts, lens[rows], idf[term], scoring.avg_doc_len, scoring.method,
                                            scoring.k1, scoring.b, scoring.weak_average, scoring.dtype))
                w["indices"].write(rows)
