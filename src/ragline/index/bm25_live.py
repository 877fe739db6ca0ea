"""BM25 over an index that changes in place: the base and its delta segments, less deleted passages, scored
at query time with the statistics of the live corpus, so that the scores equal those of an index built from
scratch over the live passages (:mod:`ragline.index.sparse` with bm25s, Lucene's variant)::

    score(q, d) = sum_{t in q} idf_t * tf_{t,d} / (tf_{t,d} + k1 (1 - b + b |d| / avgdl))
    idf_t       = log(1 + (N - df_t + 0.5) / (df_t + 0.5))

where N, avgdl and df_t count live passages only. A term repeated in the question counts once per repeat, as
bm25s sums it. Each part's top k (deleted passages never among them) merge exactly by score, then row
(:func:`ragline.index.topk.merge_top_k`).
"""

from __future__ import annotations

import math

import numpy as np

from ragline.errors import RaglineError
from ragline.index.sparse import TermCounts, _tokenizer
from ragline.index.topk import merge_top_k, top_k

METHODS = ("lucene", "robertson")  # the bm25s variants with this idf and term-frequency part


class _Part:
    """One segment's counts, its first global row and which of its passages are live."""

    def __init__(self, counts: TermCounts, offset: int, alive: np.ndarray | None) -> None:
        self.counts, self.offset, self.alive = counts, offset, alive
        self.term_id = {t: j for j, t in enumerate(counts.terms)}
        self.norm = np.zeros(0, dtype=np.float32)  # set by LiveBM25 once avgdl is known
        self.df, self.live, self.tokens = counts.live_df(alive)  # df: (n_terms,) live passages holding each term

    def df_of(self, term: str) -> int:
        j = self.term_id.get(term)
        return 0 if j is None else int(self.df[j])


class LiveBM25:
    """BM25 search over parts (term counts, first global row, live mask or None) with live statistics;
    implements :class:`ragline.index.protocol.Searcher`."""

    def __init__(self, parts: list[tuple[TermCounts, int, np.ndarray | None]], params: dict) -> None:
        method = params.get("method", "lucene")
        if method not in METHODS:
            raise RaglineError(f"an index with BM25 method {method!r} cannot be updated in place",
                               f"rebuild it with one of {', '.join(METHODS)} (the default is lucene)")
        self.params = params
        self.k1, self.b = float(params["k1"]), float(params["b"])
        self.parts = [_Part(c, o, a) for c, o, a in parts]
        self.live = sum(p.live for p in self.parts)
        self.tokens = sum(p.tokens for p in self.parts)
        self.avgdl = self.tokens / max(self.live, 1)
        self._stemmer = params.get("stemmer", "english")
        for p in self.parts:
            p.norm = self._norm(p, self.avgdl)

    def _norm(self, part: _Part, avgdl: float) -> np.ndarray:
        """k1 (1 - b + b |d| / avgdl) of every passage of ``part``, (n_part,)."""
        return (self.k1 * ((1 - self.b) + self.b * part.counts.doc_len / avgdl)).astype(np.float32)

    def _terms(self, queries: list[str]) -> list[list[str]]:
        return _tokenizer(self._stemmer).tokenize(queries, update_vocab=True, return_as="string", show_progress=False)

    def stats(self, queries: list[str]) -> tuple[int, int, list[dict[str, int]]]:
        """This index's share of the statistics a search over several (shards) needs: live passages, their
        tokens, and each question's terms' live document frequencies."""
        return self.live, self.tokens, [{t: sum(p.df_of(t) for p in self.parts) for t in set(q)}
                                        for q in self._terms(queries)]

    @property
    def ntotal(self) -> int:
        return sum(p.counts.passages for p in self.parts)

    @staticmethod
    def idf(df: int, live: int) -> float:
        return math.log(1 + (live - df + 0.5) / (df + 0.5)) if df else 0.0

    def search(self, queries: list[str], k: int, allowed: np.ndarray | None = None,
               corpus: tuple[int, int, list[dict[str, int]]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (B, k); rows -1 past the live passages sharing a term with the query (and
        ``allowed``, (rows,) bool, when given). ``corpus``, the summed :meth:`stats` of every shard, scores
        this shard as part of that whole corpus."""
        live, tokens = (self.live, self.tokens) if corpus is None else corpus[:2]
        avgdl = tokens / max(live, 1)
        norms = None if corpus is None else [self._norm(p, avgdl) for p in self.parts]
        out_s = np.zeros((len(queries), k), dtype=np.float32)
        out_r = np.full((len(queries), k), -1, dtype=np.int64)
        for b, q in enumerate(self._terms(queries)):
            df = {t: sum(p.df_of(t) for p in self.parts) for t in set(q)} if corpus is None else corpus[2][b]
            idf = {t: np.float32(self.idf(df.get(t, 0), live)) for t in set(q)}
            parts = [self._part_top_k(p, q, idf, k, None if allowed is None else
                                      allowed[p.offset:p.offset + p.counts.passages],
                                      p.norm if norms is None else norms[i]) for i, p in enumerate(self.parts)]
            out_s[b], out_r[b] = (x[0] for x in merge_top_k(parts, k))
        return out_s, out_r

    def _part_top_k(self, part: _Part, query: list[str], idf: dict[str, np.float32], k: int,
                    allowed: np.ndarray | None, norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = part.counts
        s = np.zeros(c.passages, dtype=np.float32)  # (n_part,)
        for t in query:
            j = part.term_id.get(t)
            if j is None or not idf[t]:
                continue
            rows = c.rows[c.indptr[j]:c.indptr[j + 1]]
            tf = c.counts[c.indptr[j]:c.indptr[j + 1]].astype(np.float32)
            s[rows] += idf[t] * (tf / (norm[rows] + tf))
        hits = np.flatnonzero(s > 0)  # passages sharing no term are not hits; the rest ranked alone, as
        if part.alive is not None:  # sparse.BM25Index ranks them (a tenth of ten million passages, typically)
            hits = hits[part.alive[hits]]
        if allowed is not None:
            hits = hits[allowed[hits]]
        top = hits[top_k(s[hits], k, rows=hits)]
        scores = np.zeros((1, k), dtype=np.float32)
        rows = np.full((1, k), -1, dtype=np.int64)
        scores[0, :len(top)], rows[0, :len(top)] = s[top], top + part.offset
        return scores, rows
