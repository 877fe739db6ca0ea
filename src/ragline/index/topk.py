"""Top-k selection with one tie-breaking rule for every index: by score, best first, then by row.

Used by the exact dense scan, BM25, IVF-PQ re-ranking and the merge of several top-k lists (shards). FAISS
orders ties the same way, so results agree across single, sharded and re-ranked searches.

Merging is exact: each part returns its own top k (scores, global rows); a passage in the global top k is
in the top k of its own part, so the best k of the union are the single index's answer.
"""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` best of ``scores`` (1-D), best first; equal scores by ``rows`` (default: the
    positions themselves), lowest first. Ties at the k-th place are resolved by row too, never arbitrarily."""
    rows = np.arange(len(scores)) if rows is None else np.asarray(rows)
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th largest score
        cand = np.flatnonzero(scores >= kth)  # every passage that can be in the top k, ties included
    else:
        cand = np.arange(len(scores))
    return cand[np.lexsort((rows[cand], -scores[cand]))][:k]


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge parts' (scores (B, k_i), global rows (B, k_i)) into (scores (B, k), rows (B, k)); rows -1
    (fewer hits than asked) are dropped and stay -1 in the output."""
    scores = np.concatenate([s for s, _ in parts], axis=1).astype(np.float32)  # (B, sum k_i)
    rows = np.concatenate([r for _, r in parts], axis=1).astype(np.int64)
    out_s = np.zeros((rows.shape[0], k), dtype=np.float32)
    out_r = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for b in range(rows.shape[0]):
        have = np.flatnonzero(rows[b] >= 0)
        keep = have[top_k(scores[b, have], k, rows[b, have])]
        out_s[b, : len(keep)], out_r[b, : len(keep)] = scores[b, keep], rows[b, keep]
    return out_s, out_r
