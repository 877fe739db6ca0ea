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
COUNTS = ("tf_indptr", "tf_rows", "tf_counts", "doc_len")  # TermCounts' arrays, one .npy file each


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
        terms = [""] * counts.shape[1]
        for t, i in vocab.items():
            terms[i] = t
        return cls(terms, counts.indptr.astype(np.int64), counts.indices.astype(np.int32),
                   counts.data.astype(np.int32), lens.astype(np.int32))

    @property
    def passages(self) -> int:
        return len(self.doc_len)

    def save(self, out_dir: Path) -> None:
        """Write the counts into ``out_dir`` (each file through a temporary name)."""
        from ragline import atomic

        atomic.write_json(out_dir / TERMS_FILE, self.terms)
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
        """Tokenise texts (successive chunks) as :meth:`BM25Index.build` does and count their terms."""
        tok = _tokenizer(stemmer)
        flat, lens = bm25_build.tokenize_flat(texts, tok)
        vocab = tok.get_vocab_dict()
        return cls.of_counts(bm25_build.count_terms(flat, lens, vocab), lens, vocab)


def _lean_index(retriever: bm25s.BM25, counts: sp.csc_matrix, lens: np.ndarray, vocab: dict[str, int],
                corpus_stats: BM25Stats | None) -> None:
    """Fill ``retriever`` as its ``index`` would (scores, vocabulary), from term counts: the idf and the average
    length of the passages themselves, or of a whole corpus (``corpus_stats``: a shard)."""
    from bm25s.scoring import _build_idf_array, _select_idf_scorer

    idf_fn = _select_idf_scorer(retriever.idf_method)
    if corpus_stats is None:
        df = np.diff(counts.indptr).tolist()
        idf = _build_idf_array(dict(enumerate(df)), len(lens), idf_fn, retriever.dtype)
        avg, weak = (lens.mean() if len(lens) else np.float64("nan")), False  # numpy float64, as bm25s takes it
    else:
        token_of = {i: t for t, i in vocab.items()}
        corpus_df = {i: corpus_stats.df.get(token_of.get(i, ""), 0) for i in range(counts.shape[1])}
        idf = _build_idf_array(corpus_df, corpus_stats.passages, idf_fn, retriever.dtype)
        avg, weak = corpus_stats.tokens / max(corpus_stats.passages, 1), True  # a Python float, as ours passes it
    retriever.nonoccurrence_array = None  # Lucene, Robertson and ATIRE have none
    retriever.scores = bm25_build.score_matrix(counts, lens, idf, avg, retriever.method, retriever.k1, retriever.b,
                                               weak, retriever.dtype)
    retriever.vocab_dict = vocab
    retriever.unique_token_ids_set = set(vocab.values())


class BM25Index:
    """A BM25 index over the passages (bm25s, stemmed, English stop words): build, load, search."""

    def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer, params: dict) -> None:
        self.retriever, self.tokenizer, self.params = retriever, tokenizer, params

    @classmethod
    def build(cls, texts: Iterable[list[str]], out_dir: Path, *, k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", stemmer: str = "english", corpus_stats: BM25Stats | None = None) -> BM25Index:
        """Index texts (given as successive chunks) and save to ``out_dir``. With ``corpus_stats`` (of a
        corpus these texts are a shard of), scores are those of an index over that whole corpus."""
        tok = _tokenizer(stemmer)
        flat, lens = bm25_build.tokenize_flat(texts, tok)  # chunks keep the tokenizer's working set small
        vocab = tok.get_vocab_dict()
        counts = bm25_build.count_terms(flat, lens, vocab)  # (passages, terms)
        if corpus_stats is not None and method not in bm25_build.LEAN_METHODS:
            raise RaglineError(f"BM25 method {method!r} cannot use whole-corpus statistics",
                               "use the lucene, robertson or atire method for a sharded index")
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        if method in bm25_build.LEAN_METHODS:  # the matrix from the counts: bm25s's values, a fraction of its memory
            _lean_index(retriever, counts, lens, vocab, corpus_stats)
        else:
            ends = np.cumsum(lens).tolist()
            ids = [flat[end - n : end].tolist() for n, end in zip(lens.tolist(), ends, strict=True)]
            retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
        del flat
        out_dir.mkdir(parents=True, exist_ok=True)
        retriever.save(str(out_dir), show_progress=False)
        tok.save_vocab(str(out_dir))
        TermCounts.of_counts(counts, lens, vocab).save(out_dir)  # for updates in place (bm25_live.py)
        params = {"k1": k1, "b": b, "method": method, "stemmer": stemmer, "stopwords": "en", "documents": len(lens)}
        if corpus_stats is not None:
            params["corpus_passages"] = corpus_stats.passages
        (out_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2))
        return cls(retriever, tok, params)

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
