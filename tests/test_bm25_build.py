"""The BM25 index built from term counts (index/bm25_build.py) equals the one bm25s builds from token lists,
value for value: on its own statistics, on a whole corpus's (a shard), for each lean method."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import lead_passages

from ragline.index import sparse
from ragline.index.sparse import BM25Index, BM25Stats, TermCounts


class _ShardReference(bm25s.BM25):
    """The former bm25s-based build of a shard scored with a whole corpus's statistics (bm25s's own scoring
    functions, its per-passage loop): what the lean build must equal."""

    def __init__(self, stats: BM25Stats, vocab: dict[str, int], **kwargs) -> None:
        super().__init__(**kwargs)
        self._stats, self._vocab = stats, vocab

    def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False):
        from bm25s.scoring import (
            _build_idf_array,
            _build_scores_and_indices_for_matrix,
            _calculate_doc_freqs,
            _select_idf_scorer,
        )

        st, n_docs = self._stats, len(corpus_token_ids)
        self.nonoccurrence_array = None
        token_of = {i: t for t, i in self._vocab.items()}
        corpus_df = {i: st.df.get(token_of.get(i, ""), 0) for i in unique_token_ids}
        idf = _build_idf_array(corpus_df, st.passages, _select_idf_scorer(self.idf_method), self.dtype)
        shard_df = _calculate_doc_freqs(corpus_token_ids, unique_token_ids, show_progress=False)
        data, doc_idx, vocab_idx = _build_scores_and_indices_for_matrix(
            corpus_token_ids=corpus_token_ids, idf_array=idf, avg_doc_len=st.tokens / max(st.passages, 1),
            doc_frequencies=shard_df, k1=self.k1, b=self.b, delta=self.delta, show_progress=False,
            leave_progress=False, dtype=self.dtype, int_dtype=self.int_dtype, method=self.method,
            nonoccurrence_array=None)
        m = sp.csc_matrix((data, (doc_idx, vocab_idx)), shape=(n_docs, len(unique_token_ids)), dtype=self.dtype)
        return {"data": m.data, "indices": m.indices, "indptr": m.indptr, "num_docs": n_docs}


def _texts(wiki_docs, n: int) -> list[str]:
    texts = [p.text for p in lead_passages(wiki_docs, n)]
    return texts + ["", "the of and", "Ünïcode — ‘quotes’ 1,234.5 km²"]  # empty, all stop words, odd characters


def _reference(texts: list[str], method: str, stats: BM25Stats | None):
    tok = sparse._tokenizer("english")
    ids = tok.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    ref = bm25s.BM25(method=method) if stats is None else _ShardReference(stats, tok.get_vocab_dict(), method=method)
    ref.index(bm25s.tokenization.Tokenized(ids=ids, vocab=tok.get_vocab_dict()), show_progress=False)
    return ref, ids, tok.get_vocab_dict()


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire"])
@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("bounded", [False, True], ids=["one-run", "runs-and-blocks"])
def test_the_lean_build_equals_bm25s(wiki_docs, tmp_path, method, shard, bounded):
    """Counted in one run and merged in one block, or (``bounded``) in runs of ~600 tokens merged in blocks of
    ~50 pairs: terms first seen in a late run, terms absent from some runs, terms with more pairs than a
    block (the stop-word-free lead words recur in most passages), an empty passage at a run's edge."""
    texts = _texts(wiki_docs, 300)
    stats = BM25Stats.of([texts[::2], texts[1::2], ["more text for the corpus only"]]) if shard else None
    ref, ids, vocab = _reference(texts, method, stats)
    sizes = {"run_tokens": 600, "block_pairs": 50} if bounded else {}
    chunks = [texts[lo : lo + 7] for lo in range(0, len(texts), 7)] if bounded else [texts[:100], texts[100:]]
    ours = BM25Index.build(chunks, tmp_path / "bm25", method=method, corpus_stats=stats, **sizes)
    assert not (tmp_path / "bm25" / sparse.RUNS_DIR).exists()  # the scratch runs are gone
    got = ours.retriever.scores
    assert got["num_docs"] == ref.scores["num_docs"] == len(texts)
    np.testing.assert_array_equal(got["indptr"], ref.scores["indptr"])
    np.testing.assert_array_equal(got["indices"], ref.scores["indices"])
    np.testing.assert_array_equal(got["data"], ref.scores["data"])  # bit for bit
    assert got["data"].dtype == ref.scores["data"].dtype == np.float32
    assert ours.retriever.vocab_dict == ref.vocab_dict
    loaded = BM25Index.load(tmp_path / "bm25")
    query = ["Who was the first president of the republic?", "the of and"]
    scores, rows = loaded.search(query, 5)
    assert rows[1].tolist() == [-1] * 5  # stop words only: no hits
    terms = [t for t in loaded.tokenizer.tokenize(query[:1], update_vocab=False, return_as="ids",
                                                  show_progress=False)[0] if t != vocab[""]]
    want = ref.get_scores(terms)  # (passages,) bm25s's own scores of the question
    np.testing.assert_array_equal(scores[0], want[rows[0]])
    assert scores[0][-1] >= np.sort(want)[-5]  # the five best
    counts = TermCounts.load(tmp_path / "bm25")
    want = TermCounts.of(ids, vocab)
    for name in ("indptr", "rows", "counts", "doc_len"):
        np.testing.assert_array_equal(getattr(counts, name), getattr(want, name))
    assert counts.terms == want.terms


def test_term_counts_from_chunks_equal_counts_from_lists(wiki_docs, tmp_path):
    texts = _texts(wiki_docs, 120)
    a = TermCounts.build([texts[:50], texts[50:], []])
    tok = sparse._tokenizer("english")
    ids = tok.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    b = TermCounts.of(ids, tok.get_vocab_dict())
    TermCounts.build_into([texts[lo : lo + 9] for lo in range(0, len(texts), 9)], tmp_path, run_tokens=300,
                          block_pairs=40)  # in runs and blocks, as a whole corpus is counted
    c = TermCounts.load(tmp_path)
    assert a.terms == b.terms == c.terms and a.passages == c.passages == len(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"{n}.npy" for n in sparse.COUNTS),
                                                                 sparse.TERMS_FILE])
    for name in ("indptr", "rows", "counts", "doc_len"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(getattr(c, name), getattr(b, name))
    # a term's passages ascend, and its counts are what the token lists say
    j = b.terms.index(b.terms[ids[0][0]])
    lo, hi = b.indptr[j], b.indptr[j + 1]
    assert np.all(np.diff(b.rows[lo:hi]) > 0)
    assert b.counts[lo:hi][list(b.rows[lo:hi]).index(0)] == ids[0].count(ids[0][0])


def test_term_counts_give_the_statistics_of_the_passages_they_keep(wiki_docs):
    """``TermCounts.stats`` (what a sharded compact sums instead of tokenising again) equals ``BM25Stats.of`` over
    the same texts, for all passages and for those a mask keeps (a term left only in dropped passages is gone)."""
    texts = _texts(wiki_docs, 120) + ["zyzzogeton quokka"]
    counts = TermCounts.build([texts])
    assert counts.stats() == BM25Stats.of([texts])
    alive = np.random.default_rng(0).random(len(texts)) < 0.6
    alive[-1] = False
    kept = counts.stats(alive)
    assert kept == BM25Stats.of([[t for t, a in zip(texts, alive, strict=True) if a]])
    assert "quokka" in counts.stats().df and "quokka" not in kept.df


def test_npy_rows_read_and_write_what_numpy_does(tmp_path):
    """The build's vectors go through file calls (index/npy_rows.py): the same rows numpy reads and writes."""
    from ragline.errors import RaglineError
    from ragline.index.npy_rows import NpyRows, NpyWriter

    a = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (1000, 7) and rows.dtype == np.float16 and len(rows) == 1000
    np.testing.assert_array_equal(rows[10:250], a[10:250])
    np.testing.assert_array_equal(rows[995:2000], a[995:])  # a slice past the end stops at it
    pick = np.array([999, 3, 3, 500, 0])
    np.testing.assert_array_equal(rows[pick], a[pick])  # any order, repeats
    assert rows[np.array([], dtype=np.int64)].shape == (0, 7)
    with pytest.raises(IndexError):
        rows[np.array([1000])]
    into = np.full((240, 7), np.nan, dtype=np.float16)
    rows.read_into(10, into, chunk=14 * 9)  # straight into a buffer, 9 rows a call: 27 calls, the last short
    np.testing.assert_array_equal(into, a[10:250])
    with pytest.raises(IndexError, match="out of range"):
        rows.read_into(800, into)
    for bad in (np.zeros((5, 7), np.float32), np.zeros((5, 6), np.float16), np.zeros((5, 14), np.float16)[:, ::2]):
        with pytest.raises(ValueError, match="cannot read"):
            rows.read_into(0, bad)
    np.save(tmp_path / "v.npy", np.arange(50, dtype=np.int64))
    np.testing.assert_array_equal(NpyRows(tmp_path / "v.npy", ndim=1)[np.array([49, 2])], [49, 2])
    cut = (tmp_path / "a.npy").read_bytes()[:-14]  # the last row missing
    (tmp_path / "short.npy").write_bytes(cut)
    with pytest.raises(RaglineError, match="shorter than its header"):
        NpyRows(tmp_path / "short.npy")[np.array([0])]
    with pytest.raises(RaglineError, match="shorter than its header"):
        NpyRows(tmp_path / "short.npy").read_into(0, np.empty((1000, 7), np.float16))
    with NpyWriter(tmp_path / "b.npy", 1000, 7) as w:
        for lo in range(0, 1000, 300):
            w.write(rows[lo : lo + 300])
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), a.astype(np.float32))
    with pytest.raises(ValueError, match="999 rows written of 1000"), NpyWriter(tmp_path / "c.npy", 1000, 7) as w:
        w.write(a[:999])
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    for bad in ("obj.npy", "cube.npy"):
        with pytest.raises(RaglineError):
            NpyRows(tmp_path / bad)


def test_scattered_rows_are_read_through_maps_of_a_bounded_window(tmp_path, monkeypatch):
    """Gathering rows spread over the whole file (an IVF build's training sample) maps at most a window of it
    at a time, so the pages it touches never add up to the file: the rows equal numpy's, in any order."""
    import mmap

    from ragline.index import npy_rows

    a = np.random.default_rng(1).standard_normal((5000, 37)).astype(np.float32)  # 148-byte rows: some straddle
    np.save(tmp_path / "a.npy", a)
    maps: list[int] = []

    class Recorded(mmap.mmap):
        def __new__(cls, fileno, length, *args, **kw):
            maps.append(length)
            return super().__new__(cls, fileno, length, *args, **kw)

    monkeypatch.setattr(npy_rows, "WINDOW", 3 * mmap.ALLOCATIONGRANULARITY)
    monkeypatch.setattr(npy_rows.mmap, "mmap", Recorded)
    pick = np.random.default_rng(2).integers(0, 5000, 1500)  # any order, repeats, the whole file
    pick[:2] = [4999, 0]
    np.testing.assert_array_equal(npy_rows.NpyRows(tmp_path / "a.npy")[pick], a[pick])
    file_bytes = (tmp_path / "a.npy").stat().st_size
    assert len(maps) > 20 and max(maps) <= npy_rows.WINDOW + 148 + mmap.ALLOCATIONGRANULARITY < file_bytes / 10
    np.save(tmp_path / "v.npy", np.arange(100_000, dtype=np.int64))  # 1-d, 800 kB: many windows too
    np.testing.assert_array_equal(npy_rows.NpyRows(tmp_path / "v.npy", ndim=1)[pick * 20], pick * 20)


def test_rows_written_in_place_in_any_order_equal_numpys_and_map_nothing(tmp_path, monkeypatch):
    """The encoders' vectors are written into their file in place with file calls (a run of consecutive rows
    one call, however the rows come: in chunks, shuffled, resumed in a reopened file), never mapped; short
    writes are finished, and rows that do not fit are refused."""
    import os

    from ragline.index import npy_rows

    rng = np.random.default_rng(3)
    a = rng.standard_normal((1000, 7)).astype(np.float32)

    def no_map(*args, **kw):
        raise AssertionError("a map was made")

    real_pwrite, calls = os.pwrite, []

    def short_pwrite(fd, data, pos):  # at most 100 bytes a call, as a kernel may
        calls.append(len(data))
        return real_pwrite(fd, bytes(data[:100]), pos)

    monkeypatch.setattr(npy_rows.mmap, "mmap", no_map)
    monkeypatch.setattr(np, "memmap", no_map)
    monkeypatch.setattr(npy_rows.os, "pwrite", short_pwrite)
    path = tmp_path / "a.npy"
    with npy_rows.NpyRowWriter(path, 1000, 7) as w:
        w.write(0, a[:100])  # a chunk: one run of rows
        perm = rng.permutation(np.arange(100, 600))
        for lo in range(0, 500, 128):  # shuffled rows, as a pool of actors returns them
            w.write(perm[lo : lo + 128], a[perm[lo : lo + 128]])
        w.write(np.zeros(0, np.int64), a[:0])
        for bad_at, bad_rows in ((999, a[:2]), (np.array([-1]), a[:1]), (5, a[:3, :6])):
            with pytest.raises(ValueError, match="do not fit"):
                w.write(bad_at, bad_rows)
        w.sync()
    with npy_rows.NpyRowWriter(path) as w:  # reopened, as a resumed encoding does
        w.write(600, a[600:].astype(np.float64))  # converted to the file's float32
    assert calls[0] == 100 * 7 * 4 and 100 in calls  # the first chunk one run, finished 100 bytes at a time
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), a)
    with npy_rows.NpyRowWriter(tmp_path / "h.npy", 4, 3, "float16") as w:  # zeros until written
        w.write(np.array([2, 0]), np.ones((2, 3)))
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), np.array([[1] * 3, [0] * 3] * 2, np.float16))


def test_bm25l_keeps_bm25s_own_build(tmp_path):
    """BM25L and BM25+ are built by bm25s itself, from the flat token ids turned back into lists."""
    texts = ["the cat sat on the mat", "dogs and cats", "", "a mat for a dog"]
    ours = BM25Index.build([texts[:2], texts[2:]], tmp_path / "bm25", method="bm25l")
    tok = sparse._tokenizer("english")
    ids = tok.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
    ref = bm25s.BM25(method="bm25l")
    ref.index(bm25s.tokenization.Tokenized(ids=ids, vocab=tok.get_vocab_dict()), show_progress=False)
    for key in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(ours.retriever.scores[key], ref.scores[key])
    assert ours.params["documents"] == 4
