"""BM25 over the same passages with bm25s (numba backend), English stop words and Snowball stemming.

Queries that keep no known term after tokenisation return no hits (rows -1), rather than k arbitrary
passages with score 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from bm25s.tokenization import Tokenizer

PARAMS_FILE = "ragline_bm25.json"


def _tokenizer(language: str) -> Tokenizer:
    stemmer = Stemmer.Stemmer(language) if language else None
    return Tokenizer(lower=True, stopwords="en", stemmer=stemmer.stemWord if stemmer else None)


class BM25Index:
    def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer, params: dict, threads: int = 0) -> None:
        self.retriever, self.tokenizer, self.params = retriever, tokenizer, params
        self.threads = threads or os.cpu_count() or 1  # for batches; a single query runs on one thread

    @classmethod
    def build(cls, texts: Iterable[list[str]], out_dir: Path, *, k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", stemmer: str = "english") -> BM25Index:
        """Index texts (given as successive chunks) and save to ``out_dir``."""
        tok = _tokenizer(stemmer)
        ids: list[list[int]] = []
        for chunk in texts:  # chunks keep the tokenizer's working set small
            ids.extend(tok.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False))
        retriever = bm25s.BM25(k1=k1, b=b, method=method, backend="numba")
        retriever.index(bm25s.tokenization.Tokenized(ids=ids, vocab=tok.get_vocab_dict()), show_progress=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        retriever.save(str(out_dir), show_progress=False)
        tok.save_vocab(str(out_dir))
        params = {"k1": k1, "b": b, "method": method, "stemmer": stemmer, "stopwords": "en", "documents": len(ids)}
        (out_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2))
        return cls(retriever, tok, params)

    @classmethod
    def load(cls, path: Path) -> BM25Index:
        params = json.loads((path / PARAMS_FILE).read_text())
        retriever = bm25s.BM25.load(str(path), mmap=True, show_progress=False)
        retriever.backend = "numba"
        tok = _tokenizer(params["stemmer"])
        tok.load_vocab(str(path))
        return cls(retriever, tok, params)

    @property
    def ntotal(self) -> int:
        return int(self.params["documents"])

    def search(self, queries: list[str], k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k); rows are -1 past the passages that share a term with the query."""
        threads = threads or (1 if len(queries) == 1 else self.threads)
        ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        # bm25s maps unknown words to the empty token; keep only queries with a real term
        empty = self.tokenizer.get_vocab_dict().get("", -1)
        live = [i for i, q in enumerate(ids) if any(t != empty for t in q)]
        if live:
            res, sc = self.retriever.retrieve(
                bm25s.tokenization.Tokenized(ids=[[t for t in ids[i] if t != empty] for i in live],
                                             vocab=self.tokenizer.get_vocab_dict()),
                k=k, show_progress=False, n_threads=threads)
            for j, i in enumerate(live):
                hit = sc[j] > 0  # passages sharing no term score 0: not hits
                rows[i, : hit.sum()] = res[j][hit]
                scores[i, : hit.sum()] = sc[j][hit]
        return scores, rows
