"""Exact merge of per-shard top-k lists.

Each shard returns its own top k (scores, global rows). The union of those lists contains the global top k,
because a passage in the global top k is in the top k of its own shard; sorting the union by score (then by
row, as a single index breaks ties) and keeping k gives exactly the single index's answer for exact search.
"""

from __future__ import annotations

import numpy as np


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge shards' (scores (B, k_i), global rows (B, k_i)) into (scores (B, k), rows (B, k)); rows -1
    (fewer hits than asked) sort last and stay -1 in the output."""
    scores = np.concatenate([s for s, _ in parts], axis=1).astype(np.float32)  # (B, sum k_i)
    rows = np.concatenate([r for _, r in parts], axis=1).astype(np.int64)
    missing = rows < 0
    key_score = np.where(missing, np.inf, -scores)  # ascending sort: best first, missing last
    key_row = np.where(missing, np.iinfo(np.int64).max, rows)
    out_s = np.zeros((rows.shape[0], k), dtype=np.float32)
    out_r = np.full((rows.shape[0], k), -1, dtype=np.int64)
    for b in range(rows.shape[0]):
        order = np.lexsort((key_row[b], key_score[b]))[:k]
        keep = order[~missing[b, order]]
        out_s[b, : len(keep)], out_r[b, : len(keep)] = scores[b, keep], rows[b, keep]
    return out_s, out_r
