"""BM25 over the same passages with bm25s, English stop words and Snowball stemming.

Search scores each query with bm25s' sparse-matrix ``get_scores`` (numpy) and selects the top k with
``argpartition``. bm25s' own ``retrieve`` JIT-compiles with numba on its first call in every process (4.5 s
for one query, 3.5 s more for a batch, measured here), which a command-line search cannot afford; scored this
way a query takes about 0.05 ms on the bundled corpus and nothing is compiled.

Only passages sharing a term with the query are hits: a query that keeps no known term after tokenisation
returns no hits (rows -1), rather than k arbitrary passages with score 0.
"""

from __future__ import annotations

import json
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
    def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer, params: dict) -> None:
        self.retriever, self.tokenizer, self.params = retriever, tokenizer, params

    @classmethod
    def build(cls, texts: Iterable[list[str]], out_dir: Path, *, k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", stemmer: str = "english") -> BM25Index:
        """Index texts (given as successive chunks) and save to ``out_dir``."""
        tok = _tokenizer(stemmer)
        ids: list[list[int]] = []
        for chunk in texts:  # chunks keep the tokenizer's working set small
            ids.extend(tok.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False))
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
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
        tok = _tokenizer(params["stemmer"])
        tok.load_vocab(str(path))
        return cls(retriever, tok, params)

    @property
    def ntotal(self) -> int:
        return int(self.params["documents"])

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k); rows are -1 past the passages that share a term with the query."""
        ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        empty = self.tokenizer.get_vocab_dict().get("", -1)  # bm25s maps unknown words to the empty token
        scores = np.zeros((len(queries), k), dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for b, q in enumerate(ids):
            terms = [t for t in q if t != empty]
            if not terms:
                continue
            s = self.retriever.get_scores(terms)  # (n,)
            top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))]  # by score, then row
            top = top[s[top] > 0]  # passages sharing no term are not hits
            rows[b, : len(top)], scores[b, : len(top)] = top, s[top]
        return scores, rows
