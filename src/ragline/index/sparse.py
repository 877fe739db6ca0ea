"""BM25 over the same passages with bm25s, English stop words and Snowball stemming.

Search scores each query with bm25s' sparse-matrix ``get_scores`` (numpy) and selects the top k among the
passages that share a term with the query: at a million passages a typical question's terms reach a tenth
of them, and ranking those instead of every score took a BM25 query from 15 to 1.5 ms (p50, benchmarks/scale.py).
bm25s' own ``retrieve`` JIT-compiles with numba on its first call in every process (4.5 s for one query,
3.5 s more for a batch, measured here), which a command-line search cannot afford; scored this way a query
takes about 0.05 ms on the bundled corpus and nothing is compiled.

Only passages sharing a term with the query are hits: a query that keeps no known term after tokenisation
returns no hits (rows -1), rather than k arbitrary passages with score 0.

A shard of a larger corpus is built with the whole corpus's statistics (:class:`BM25Stats`: passage count,
mean length, document frequency of every term), so that its scores are those a single index over the whole
corpus would give and top-k lists of shards merge exactly (Lucene BM25)::

    score(q, d) = sum_{t in q} log(1 + (N - df_t + 0.5) / (df_t + 0.5))
                  * tf_{t,d} / (tf_{t,d} + k1 (1 - b + b |d| / avgdl))
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp
import Stemmer
from bm25s.tokenization import Tokenizer

from ragline.errors import RaglineError
from ragline.index import bm25_build
from ragline.index.topk import top_k

PARAMS_FILE = "ragline_bm25.json"
TERMS_FILE = "ragline_terms.json"  # TermCounts: the terms, in column order
COUNTS = bm25_build.COUNT_FILES  # TermCounts' arrays, one .npy file each


def _tokenizer(language: str) -> Tokenizer:
    stemmer = Stemmer.Stemmer(language) if language else None
    return Tokenizer(lower=True, stopwords="en", stemmer=stemmer.stemWord if stemmer else None)


@dataclass
class BM25Stats:
    """Corpus statistics BM25 scores depend on: passages, total length in tokens, passages per term."""
    passages: int = 0
    tokens: int = 0
    df: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"passages": self.passages, "tokens": self.tokens, "df": dict(self.df)}

    @classmethod
    def from_json(cls, data: dict) -> BM25Stats:
        return cls(int(data["passages"]), int(data["tokens"]), Counter({str(k): int(v) for k, v in data["df"].items()}))

    def __add__(self, other: BM25Stats) -> BM25Stats:
        return BM25Stats(self.passages + other.passages, self.tokens + other.tokens, self.df + other.df)

    @classmethod
    def of(cls, texts: Iterable[list[str]], stemmer: str = "english") -> BM25Stats:
        """The statistics of texts (given as successive chunks), tokenised as :meth:`BM25Index.build` does."""
        tok, out = _tokenizer(stemmer), cls()
        for chunk in texts:
            for words in tok.tokenize(chunk, update_vocab=True, return_as="string", show_progress=False):
                out.passages += 1
                out.tokens += len(words)
                out.df.update(set(words))
        return out


@dataclass
class TermCounts:
    """How often each term occurs in each passage of one part of an index, as a term-major (CSC) sparse matrix:
    the passages holding term ``terms[j]`` are ``rows[indptr[j]:indptr[j + 1]]``, ``counts`` times each; and
    every passage's length in tokens. BM25 scores computed from these at query time
    (:mod:`ragline.index.bm25_live`) follow the live corpus's statistics, which precomputed scores cannot."""

    terms: list[str]
    indptr: np.ndarray   # (n_terms + 1,) int64
    rows: np.ndarray     # (nnz,) int32, ascending within a term
    counts: np.ndarray   # (nnz,) int32
    doc_len: np.ndarray  # (n_passages,) int32

    @classmethod
    def of(cls, token_ids: list[list[int]], vocab: dict[str, int]) -> TermCounts:
        """The counts of passages tokenised to ``token_ids`` over ``vocab`` (token -> id)."""
        flat, lens = bm25_build.flatten(token_ids)
        return cls.of_counts(bm25_build.count_terms(flat, lens, vocab), lens, vocab)

    @classmethod
    def of_counts(cls, counts: sp.csc_matrix, lens: np.ndarray, vocab: dict[str, int]) -> TermCounts:
        """From :func:`ragline.index.bm25_build.count_terms`'s matrix and the passages' lengths in tokens."""
        return cls(_terms(vocab, counts.shape[1]), counts.indptr.astype(np.int64), counts.indices.astype(np.int32),
                   counts.data.astype(np.int32), lens.astype(np.int32))

    @property
    def passages(self) -> int:
        return len(self.doc_len)

    def live_df(self, alive: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """(document frequency of every term, (n_terms,) int64; passages; their tokens) over the passages
        ``alive`` ((passages,) bool) marks, or over all of them."""
        if alive is None:
            return np.diff(self.indptr), self.passages, int(np.sum(self.doc_len, dtype=np.int64))
        held = np.concatenate([[0], np.cumsum(alive[self.rows], dtype=np.int64)])  # live nonzeros so far
        return (held[self.indptr[1:]] - held[self.indptr[:-1]], int(alive.sum()),
                int(np.sum(self.doc_len[alive], dtype=np.int64)))

    def stats(self, alive: np.ndarray | None = None) -> BM25Stats:
        """The :class:`BM25Stats` of these passages (those ``alive`` marks, when given), as
        :meth:`BM25Stats.of` would count them over their texts, without tokenising again."""
        df, passages, tokens = self.live_df(alive)
        return BM25Stats(passages, tokens, Counter({self.terms[j]: int(df[j]) for j in np.flatnonzero(df).tolist()}))

    def save(self, out_dir: Path) -> None:
        """Write the counts into ``out_dir`` (each file through a temporary name)."""
        _write_terms(out_dir, self.terms)
        for name, arr in zip(COUNTS, (self.indptr, self.rows, self.counts, self.doc_len), strict=True):
            tmp = out_dir / f".{name}.tmp.npy"
            np.save(tmp, arr)
            tmp.replace(out_dir / f"{name}.npy")

    @staticmethod
    def saved_in(path: Path) -> bool:
        return (path / TERMS_FILE).is_file() and all((path / f"{n}.npy").is_file() for n in COUNTS)

    @classmethod
    def load(cls, path: Path) -> TermCounts:
        if not cls.saved_in(path):
            raise RaglineError(f"{path} holds no term counts", "run `ragline compact` or rebuild the index")
        arrays = [np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in COUNTS]
        return cls(json.loads((path / TERMS_FILE).read_text()), *arrays)

    @classmethod
    def build(cls, texts: Iterable[list[str]], stemmer: str = "english") -> TermCounts:
        """Tokenise texts (successive chunks) as :meth:`BM25Index.build` does and count their terms, in memory
        (a segment's passages; a whole corpus goes through :meth:`build_into`)."""
        tok = _tokenizer(stemmer)
        flat, lens = bm25_build.tokenize_flat(texts, tok)
        vocab = tok.get_vocab_dict()
        return cls.of_counts(bm25_build.count_terms(flat, lens, vocab), lens, vocab)

    @staticmethod
    def build_into(texts: Iterable[list[str]], out_dir: Path, stemmer: str = "english",
                   run_tokens: int = bm25_build.RUN_TOKENS, block_pairs: int = bm25_build.BLOCK_PAIRS) -> None:
        """:meth:`build`'s counts written into ``out_dir`` in bounded memory (runs merged on disk), each file
        moved into place when all are written, the terms last (:meth:`saved_in` is true only then)."""
        tok = _tokenizer(stemmer)
        scratch = out_dir / RUNS_DIR
        try:
            runs, lens = bm25_build.count_runs(texts, tok, scratch / "runs", run_tokens)
            terms = _terms(tok.get_vocab_dict())
            bm25_build.write_runs(runs, bm25_build.merged_indptr(runs, len(terms)), lens, scratch, None, block_pairs)
            for name in COUNTS:
                os.replace(scratch / f"{name}.npy", out_dir / f"{name}.npy")
            _write_terms(out_dir, terms)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


RUNS_DIR = ".runs"  # a build's scratch: the counted runs, removed when merged


def _terms(vocab: dict[str, int], size: int | None = None) -> list[str]:
    """The terms in column order, from a vocabulary (token -> id); ``size`` columns (default: the highest id's)."""
    terms = [""] * (max(vocab.values(), default=-1) + 1 if size is None else size)
    for t, i in vocab.items():
        terms[i] = t
    return terms


def _write_terms(out_dir: Path, terms: list[str]) -> None:
    from ragline import atomic

    atomic.write_json(out_dir / TERMS_FILE, terms)


def _scoring(retriever: bm25s.BM25, df: np.ndarray, lens: np.ndarray, vocab: dict[str, int],
             corpus_stats: BM25Stats | None) -> bm25_build.Scoring:
    """How pairs are scored as ``retriever``'s ``index`` would score them: the idf of each term's document
    frequency ``df`` (terms,) and the average length of the passages themselves, or of a whole corpus
    (``corpus_stats``: a shard)."""
    from bm25s.scoring import _build_idf_array, _select_idf_scorer

    idf_fn = _select_idf_scorer(retriever.idf_method)
    if corpus_stats is None:
        idf = _build_idf_array(dict(enumerate(df.tolist())), len(lens), idf_fn, retriever.dtype)
        avg, weak = (lens.mean() if len(lens) else np.float64("nan")), False  # numpy float64, as bm25s takes it
    else:
        token_of = {i: t for t, i in vocab.items()}
        corpus_df = {i: corpus_stats.df.get(token_of.get(i, ""), 0) for i in range(len(df))}
        idf = _build_idf_array(corpus_df, corpus_stats.passages, idf_fn, retriever.dtype)
        avg, weak = corpus_stats.tokens / max(corpus_stats.passages, 1), True  # a Python float, as ours passes it
    return bm25_build.Scoring(idf, avg, retriever.method, retriever.k1, retriever.b, weak, retriever.dtype)


def _build_lean(retriever: bm25s.BM25, tok: Tokenizer, texts: Iterable[list[str]], out_dir: Path,
                corpus_stats: BM25Stats | None, run_tokens: int, block_pairs: int) -> int:
    """Write ``retriever``'s index of ``texts`` (Lucene, Robertson or ATIRE) and the term counts into
    ``out_dir`` in bounded memory, as bm25s's ``index`` and ``save`` would write them; returns the passages."""
    scratch = out_dir / RUNS_DIR
    try:
        runs, lens = bm25_build.count_runs(texts, tok, scratch, run_tokens)
        vocab = tok.get_vocab_dict()
        terms = _terms(vocab)
        indptr = bm25_build.merged_indptr(runs, len(terms))  # (terms + 1,)
        scoring = _scoring(retriever, np.diff(indptr), lens, vocab, corpus_stats)
        bm25_build.write_runs(runs, indptr, lens, out_dir, scoring, block_pairs)
        _write_terms(out_dir, terms)
        # bm25s's vocabulary and parameter files, in its own format: saved with placeholder arrays into the
        # scratch folder (the score matrix is already in out_dir), then moved beside the matrix
        retriever.nonoccurrence_array = None  # Lucene, Robertson and ATIRE have none
        retriever.vocab_dict = vocab
        retriever.scores = {"data": np.zeros(0, retriever.dtype), "indices": np.zeros(0, np.int32),
                            "indptr": np.zeros(1, np.int32), "num_docs": len(lens)}
        retriever.save(str(scratch), show_progress=False)
        for name in ("vocab.index.json", "params.index.json"):
            os.replace(scratch / name, out_dir / name)
        return len(lens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class BM25Index:
    """A BM25 index over the passages (bm25s, stemmed, English stop words): build, load, search."""

    def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer, params: dict) -> None:
        self.retriever, self.tokenizer, self.params = retriever, tokenizer, params

    @classmethod
    def build(cls, texts: Iterable[list[str]], out_dir: Path, *, k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", stemmer: str = "english", corpus_stats: BM25Stats | None = None,
              run_tokens: int = bm25_build.RUN_TOKENS, block_pairs: int = bm25_build.BLOCK_PAIRS) -> BM25Index:
        """Index texts (given as successive chunks) and save to ``out_dir``. With ``corpus_stats`` (of a
        corpus these texts are a shard of), scores are those of an index over that whole corpus. Lucene,
        Robertson and ATIRE are built in bounded memory (:mod:`ragline.index.bm25_build`: runs of
        ``run_tokens`` tokens, merged in blocks of ``block_pairs`` pairs); BM25L and BM25+ by bm25s in memory."""
        if corpus_stats is not None and method not in bm25_build.LEAN_METHODS:
            raise RaglineError(f"BM25 method {method!r} cannot use whole-corpus statistics",
                               "use the lucene, robertson or atire method for a sharded index")
        tok = _tokenizer(stemmer)
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        out_dir.mkdir(parents=True, exist_ok=True)
        if method in bm25_build.LEAN_METHODS:
            n = _build_lean(retriever, tok, texts, out_dir, corpus_stats, run_tokens, block_pairs)
        else:
            flat, lens = bm25_build.tokenize_flat(texts, tok)
            vocab = tok.get_vocab_dict()
            counts = bm25_build.count_terms(flat, lens, vocab)  # (passages, terms)
            ends = np.cumsum(lens).tolist()
            ids = [flat[end - n : end].tolist() for n, end in zip(lens.tolist(), ends, strict=True)]
            del flat
            retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
            retriever.save(str(out_dir), show_progress=False)
            TermCounts.of_counts(counts, lens, vocab).save(out_dir)  # for updates in place (bm25_live.py)
            n = len(lens)
        tok.save_vocab(str(out_dir))
        params = {"k1": k1, "b": b, "method": method, "stemmer": stemmer, "stopwords": "en", "documents": n}
        if corpus_stats is not None:
            params["corpus_passages"] = corpus_stats.passages
        (out_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2))
        return cls.load(out_dir)

    @classmethod
    def load(cls, path: Path) -> BM25Index:
        params = json.loads((path / PARAMS_FILE).read_text())
        retriever = bm25s.BM25.load(str(path), mmap=True, show_progress=False)
        tok = _tokenizer(params["stemmer"])
        tok.load_vocab(str(path))
        return cls(retriever, tok, params)

    @property
    def ntotal(self) -> int:
        return int(self.params["documents"])

    def search(self, queries: list[str], k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k); rows are -1 past the passages that share a term with the query (and are
        ``allowed``, (n,) bool, when given)."""
        ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        empty = self.tokenizer.get_vocab_dict().get("", -1)  # bm25s maps unknown words to the empty token
        scores = np.zeros((len(queries), k), dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for b, q in enumerate(ids):
            terms = [t for t in q if t != empty]
            if not terms:
                continue
            s = self.retriever.get_scores(terms)  # (n,)
            if allowed is not None:
                s = np.where(allowed, s, 0).astype(s.dtype)
            hits = np.flatnonzero(s > 0)  # passages sharing no term are not hits; the rest ranked alone
            top = hits[top_k(s[hits], k, rows=hits)]  # a tenth of a million-passage corpus, typically
            rows[b, : len(top)], scores[b, : len(top)] = top, s[top]
        return scores, rows
