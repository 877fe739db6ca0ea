"""Questions -> top-k passages with scores, over an index directory, in dense, BM25 or hybrid mode.

The index in use can be swapped at run time (:meth:`Retriever.swap`, the paper's index hot-swapping):
the new index is opened and checked against the question encoder first, then replaces the old one in a
single reference assignment. A search already running keeps the index it started with, so no request
fails or mixes two indexes. A retriever also follows its index directory: when ``ragline add``, ``update``,
``delete`` or ``compact`` writes a new generation there, the next search opens it and swaps to it the same way
(:meth:`Retriever.refresh`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ragline import profile, vocab
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.index.filters import Condition, allowed_rows
from ragline.index.hybrid import rrf_fuse
from ragline.index.protocol import Index
from ragline.index.registry import open_index
from ragline.models.encoders import Encoder, load_encoder

log = logging.getLogger(__name__)
HYBRID_THREADS = 2  # threads searching hybrid queries' BM25 halves (a request finding none free searches its own)
RETRY_SECONDS = 1.0  # after a failed attempt to open a new generation, the old one serves this long first


def _stamp(index: Index) -> tuple[int, int] | None:
    """What identifies the manifest file now on disk in ``index``'s directory (a new generation replaces it)."""
    try:
        st = os.stat(index.path / mf.MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with its rank (from 1) and retrieval score."""

    rank: int
    row: int      # passage row in the index (FAISS id)
    pid: str      # stable passage id "<doc id>#<chunk>"
    doc_id: str
    title: str
    text: str
    score: float
    meta: dict = field(default_factory=dict, hash=False)  # source, page or section, the document's metadata


@dataclass(frozen=True)
class Retrieved:
    """Raw batch result: ``rows`` and ``scores`` are (B, k); rows are -1 where fewer than k were found.
    ``question_vectors`` (B, dim) are the q(x) the dense search used (None for BM25), and ``encoder`` the
    question encoder that made them: both from the same (index, encoder) snapshot as ``index``."""
    rows: np.ndarray
    scores: np.ndarray
    index: Index
    question_vectors: np.ndarray | None = None
    encoder: Encoder | None = None


class Retriever:
    """Questions -> top-k passages over one index (any format) with its paired question encoder."""

    def __init__(self, index: Index | str | Path, question_encoder: Encoder | None = None, *,
                 allow_encoder_mismatch: bool = False, bm25_weight: float = vocab.BM25_WEIGHT,
                 rrf_c: float = vocab.RRF_C, device: str | None = None, follow: bool = True) -> None:
        """``device`` places the index's own question encoder when none is given (models/device.py); ``follow``
        swaps to a new generation of the index directory when one is written (:meth:`refresh`)."""
        self.allow_encoder_mismatch = allow_encoder_mismatch
        self.bm25_weight, self.rrf_c = bm25_weight, rrf_c  # hybrid fusion (index/hybrid.py)
        index = open_index(index) if isinstance(index, str | Path) else index
        if question_encoder is None and index.dense is not None:
            question_encoder = _load_question_encoder(index, device)
        self.encoder = question_encoder
        self._check(index)
        self._index = index
        self._swap_lock = threading.Lock()
        self.follow = follow
        self._stamp, self._retry_at = _stamp(index), 0.0
        self._refresh_lock = threading.Lock()

    @property
    def index(self) -> Index:
        return self._index

    def _check(self, index: Index) -> None:
        if index.dense is not None and self.encoder is not None:
            _check_encoder(index, self.encoder, self.allow_encoder_mismatch)

    def swap(self, index: Index | str | Path, question_encoder: Encoder | None = None) -> Index:
        """Make ``index`` the one in use, with ``question_encoder`` if given (an index re-encoded by a newly
        trained passage encoder comes with its own question encoder); returns the previous index. Fails
        (keeping the old pair) if the index does not match the question encoder."""
        new = open_index(index) if isinstance(index, str | Path) else index
        enc = question_encoder or self.encoder
        if new.dense is not None and enc is not None:
            _check_encoder(new, enc, self.allow_encoder_mismatch)
        with self._swap_lock:
            old, self._index, self.encoder = self._index, new, enc
            self._stamp = _stamp(new)
        return old

    def refresh(self) -> bool:
        """Swap to the generation now on disk in the index's directory if it is not the one in use (one thread
        opens it; the others keep searching the old one meanwhile). True if a new generation was taken up. A
        generation that fails to open is logged and retried a second later; the old one keeps serving."""
        index = self._index
        stamp = _stamp(index)
        if stamp is None or stamp == self._stamp or time.monotonic() < self._retry_at:
            return False
        if not self._refresh_lock.acquire(blocking=False):
            return False
        try:
            if self._index is not index:  # swapped meanwhile
                return False
            try:
                new = open_index(index.path)
                self.swap(new)
                self._stamp = stamp  # what was on disk before the open: a newer one is taken up next time
            except (RaglineError, OSError, ValueError) as e:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                log.warning("index %s changed on disk but cannot be opened yet (%s); still serving the previous "
                            "generation", index.name, e)
                return False
            log.info("index %s: now serving generation %s", new.name, new.manifest.get("generation", 0))
            return True
        finally:
            self._refresh_lock.release()

    def doc_scores(self, question_vectors: torch.Tensor, rows: np.ndarray, index: Index) -> torch.Tensor:
        """Retrieval scores q(x)·d(z) for the passages ``rows`` (B, K), with d(z) read from ``index``'s stored
        embeddings, so the gradient reaches the question encoder: (B, d) -> (B, K)."""
        if index.embeddings is None:
            raise RaglineError(f"index {index.name} has no passage embeddings", "use an index with a dense part")
        d = torch.from_numpy(np.asarray(index.embeddings[rows.reshape(-1)], dtype=np.float32))
        d = d.view(*rows.shape, -1).to(question_vectors.device)  # (B, K, d)
        return torch.einsum("bd,bkd->bk", question_vectors.float(), d)

    def snapshot(self) -> tuple[Index, Encoder | None]:
        """The (index, question encoder) pair in use now; a swap never splits it."""
        with self._swap_lock:
            return self._index, self.encoder

    def retrieve(self, questions: list[str], k: int = vocab.DEFAULT_K, mode: str = vocab.DEFAULT_MODE,
                 question_vectors: np.ndarray | None = None, with_vectors: bool = False,
                 filters: Sequence[str | Condition] | None = None) -> Retrieved:
        """Top-k rows and scores for each question, as arrays, with the q(x) used. Dense scores are q(x)·d(z);
        BM25 scores are BM25; hybrid scores are reciprocal-rank-fusion scores. ``question_vectors`` (B, dim),
        if given, are used as q(x) instead of encoding the questions; ``with_vectors`` encodes them for BM25
        too (RAG's prior p(z|x) needs q(x) in every mode). ``filters`` (``field=value``, ``field!=value``,
        ``field=prefix*``: :mod:`ragline.index.filters`) limit the search to the passages that pass, exactly."""
        if self.follow:
            self.refresh()
        index, encoder = self.snapshot()  # one pair for the whole call, whatever swap happens meanwhile
        _validate(questions, k, mode, index)
        conditions = [c if isinstance(c, Condition) else Condition.parse(c) for c in filters or ()]
        allowed = allowed_rows(index, conditions)
        wanted = mode != vocab.BM25 or with_vectors
        # hybrid: BM25's ranking is searched on another thread while the question is encoded and searched densely
        # (each half mostly in native code that lets the other run: FAISS, numpy, torch)
        sparse = _BACKGROUND.submit(_search_with, index.bm25, questions, _hybrid_depth(k, index), allowed) \
            if mode == vocab.HYBRID else None
        try:
            if wanted and index.dense is not None and question_vectors is None and encoder is not None:
                with profile.stage(profile.ENCODE):
                    question_vectors = encoder.encode(questions)  # (B, dim)
            if mode != vocab.BM25 and question_vectors is None:
                raise RaglineError("this retriever has no question encoder", "open a dense index")
            with profile.stage(profile.SEARCH):
                scores, rows = self._search(index, questions, question_vectors, k, mode, allowed, sparse)
        finally:
            if sparse is not None:
                sparse.cancel()  # on an error: not yet started, never will; running, finishes unobserved
        return Retrieved(rows=rows.astype(np.int64), scores=scores.astype(np.float32), index=index,
                         question_vectors=question_vectors, encoder=encoder)

    def _search(self, index: Index, questions: list[str], question_vectors: np.ndarray | None, k: int, mode: str,
                allowed: np.ndarray | None = None, sparse: Future | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), of ``mode``; for hybrid, ``sparse`` (if given) is BM25's ranking to
        the hybrid depth being searched meanwhile."""
        if mode == vocab.DENSE:
            return _search_with(index.dense, question_vectors, k, allowed)
        if mode == vocab.BM25:
            return _search_with(index.bm25, questions, k, allowed)
        depth = _hybrid_depth(k, index)
        _, dense_rows = _search_with(index.dense, question_vectors, depth, allowed)
        if sparse is not None and not sparse.cancel():  # started (or done) meanwhile: its result
            _, bm25_rows = sparse.result()
        else:  # still queued behind other requests' (now cancelled): searched here
            _, bm25_rows = _search_with(index.bm25, questions, depth, allowed)
        return rrf_fuse([dense_rows, bm25_rows], k, c=self.rrf_c, weights=(1.0, self.bm25_weight))

    def search(self, questions: list[str], k: int = vocab.DEFAULT_SEARCH_K, mode: str = vocab.DEFAULT_MODE,
               filters: Sequence[str | Condition] | None = None) -> list[list[Hit]]:
        """Ranked hits (id, title, text, score, metadata) for each question, among the passages that pass
        ``filters``."""
        res = self.retrieve(questions, k, mode, filters=filters)
        valid = res.rows[res.rows >= 0]
        passages = dict(zip(valid.tolist(), res.index.store.get(valid), strict=True))
        out = []
        for b in range(len(questions)):
            hits = []
            for rank, (row, score) in enumerate(zip(res.rows[b].tolist(), res.scores[b].tolist(), strict=True), 1):
                if row < 0:
                    break
                p = passages[row]
                hits.append(Hit(rank, row, p.pid, p.doc_id, p.title, p.text, float(score), p.meta))
            out.append(hits)
        return out


def _search_with(searcher, queries, depth: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``searcher.search`` without a filter when there is none, as every Searcher is called (a format's own
    searcher may not take one)."""
    return searcher.search(queries, depth) if allowed is None else searcher.search(queries, depth, allowed)


def _hybrid_depth(k: int, index: Index) -> int:
    """Candidates each ranking gives a hybrid search of ``k`` before fusion."""
    return min(max(k, vocab.HYBRID_DEPTH), len(index))


_BACKGROUND = ThreadPoolExecutor(max_workers=HYBRID_THREADS, thread_name_prefix="ragline-bm25")


def open_retriever(index: Index | str | Path, query_encoder: str | None = None,
                   checkpoint_encoder: Encoder | None = None, *, allow_encoder_mismatch: bool = False,
                   bm25_weight: float = vocab.BM25_WEIGHT, rrf_c: float = vocab.RRF_C,
                   log: Callable[[str], None] = print, device: str | None = None, follow: bool = True) -> Retriever:
    """A retriever over ``index`` with the question encoder every command picks: ``query_encoder`` (a folder or
    bundled name) if given, else a RAG checkpoint's own (``checkpoint_encoder``), else the index's. ``follow``
    takes up new generations of the index as they are written (a server); a run that records which index it
    read (eval, training, synth) stays on the generation it opened.

    RAG fine-tunes its question encoder against a frozen passage encoder, so a checkpoint's question encoder
    is not the one the index was built with and carries no pairing; it is accepted when its output size fits,
    with a note unless it is the index's own question encoder."""
    index = open_index(index) if isinstance(index, str | Path) else index
    enc, allow = None, allow_encoder_mismatch
    question = (index.manifest.get("encoder") or {}).get("question") or {}
    if query_encoder:
        enc = load_encoder(query_encoder, max_seq_length=question.get("max_seq_length", 256), device=device)
    elif checkpoint_encoder is not None and index.dense is not None:
        enc = checkpoint_encoder
        if enc.fingerprint != question.get("fingerprint") and not allow:
            allow = True
            log(f"searching index {index.name} with the RAG checkpoint's own question encoder (fine-tuned against "
                "a frozen passage encoder, so ragline cannot check the pairing); pass --query-encoder to use another")
    return Retriever(index, enc, allow_encoder_mismatch=allow, bm25_weight=bm25_weight, rrf_c=rrf_c, device=device,
                     follow=follow)


def _load_question_encoder(index: Index, device: str | None = None) -> Encoder:
    q = index.manifest["encoder"]["question"]
    try:
        return load_encoder(q["source"], max_seq_length=q["max_seq_length"], device=device)
    except RaglineError as e:
        raise RaglineError(f"cannot load the question encoder recorded in index {index.name} ({e.problem})",
                           "pass --query-encoder with a compatible encoder") from None


def _check_encoder(index: Index, encoder: Encoder, allow_mismatch: bool) -> None:
    mf.check_question_encoder(index.manifest, encoder.dim, encoder.paired_with, encoder.name, allow_mismatch,
                              fingerprint=encoder.fingerprint)


def _validate(questions: list[str], k: int, mode: str, index: Index) -> None:
    if mode not in vocab.MODES:
        raise RaglineError(f"unknown retrieval mode {mode!r}", f"use one of {', '.join(vocab.MODES)}")
    if mode not in index.modes:
        raise RaglineError(f"index {index.name} cannot do {mode} retrieval (it has: {', '.join(index.modes)})",
                           "choose another --mode or rebuild the index with both dense and BM25 parts")
    if not questions:
        raise RaglineError("no question given", "pass at least one question")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise RaglineError(f"question {i + 1} is empty", "give a non-empty question")
    if not isinstance(k, int | np.integer) or k < 1:
        raise RaglineError(f"k={k} is not a positive number", "use -k 1 or more")
    if k > index.live_passages:
        raise RaglineError(f"k={k} is larger than index {index.name}, which holds {index.live_passages} passages",
                           f"use -k {index.live_passages} or less")
