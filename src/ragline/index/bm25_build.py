"""BM25's index built in memory proportional to the corpus's tokens as int32, not as Python lists.

bm25s builds its score matrix from a Python list of token-id lists (about 25 bytes a token on CPython: 1.5
GiB for the 60M tokens of a million passages) and a Python loop per passage, then converts three more
arrays of that size into the matrix (measured at 1M passages: 3.4 GiB at peak, 80 s). Here the token ids
are kept as one flat int32 array with each passage's length; the term counts come from one sparse
conversion; and the Lucene / Robertson / ATIRE score of every (term, passage) pair,

    idf_t * tf / (tf + k1 (1 - b + b |d| / avgdl))                     (Lucene, Robertson)
    idf_t * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))            (ATIRE)

is computed from the counts in vectorised slices, in the floating-point types bm25s computes it in, so the
matrix equals bm25s's own value for value (tests/test_bm25_build.py). BM25L and BM25+ keep bm25s's path.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np
import scipy.sparse as sp

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


def score_matrix(counts: sp.csc_matrix, doc_len: np.ndarray, idf: np.ndarray, avg_doc_len: float, method: str,
                 k1: float, b: float, weak_average: bool, dtype: str = "float32") -> dict:
    """bm25s's score matrix (``data``, ``indices``, ``indptr``, ``num_docs``) from term ``counts``
    (:func:`count_terms`), passage lengths (passages,), ``idf`` (terms,) and the average length.

    bm25s computes a passage's term-frequency part with its length a Python int and the average either a
    numpy float64 (its own index: float64 arithmetic) or, for a shard scored with a whole corpus's statistics,
    a Python float (``weak_average``: NumPy then keeps float32); each case is reproduced here."""
    if method not in LEAN_METHODS:
        raise ValueError(f"method {method!r} is built by bm25s itself")
    nnz = counts.nnz
    data = np.empty(nnz, dtype=dtype)
    term = np.repeat(np.arange(counts.shape[1], dtype=np.int32), np.diff(counts.indptr))  # (nnz,) each pair's term
    idf = np.asarray(idf, dtype=dtype)
    for lo in range(0, nnz, SLICE):
        hi = min(lo + SLICE, nnz)
        tf = counts.data[lo:hi].astype(np.float32)
        norm = k1 * ((1 - b) + b * doc_len[counts.indices[lo:hi]].astype(np.float64) / avg_doc_len)  # float64
        if weak_average:  # a Python float per passage: cast to float32 before meeting the float32 counts
            norm = norm.astype(np.float32)
        tfc = tf / (norm + tf) if method != "atire" else (tf * np.float32(k1 + 1)) / (tf + norm)
        data[lo:hi] = idf[term[lo:hi]] * tfc
    return {"data": data, "indices": counts.indices.astype(np.int32, copy=False),
            "indptr": counts.indptr.astype(np.int32 if nnz < 2**31 - 1 else np.int64, copy=False),
            "num_docs": counts.shape[0]}
