import faiss
import numpy as np
import pytest

from ragline import vocab
from ragline.errors import RaglineError
from ragline.index import dense as dense_index
from ragline.index import dense_build as dense


def _vectors(n=3000, d=32, seed=0):
    """Clustered unit vectors, like text embeddings (uniform random ones defeat any ANN index)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d))
    x = centers[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _exact_top(q, x, k):
    s = q @ x.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def test_flat_is_exact_inner_product_for_batches_and_single_queries():
    x = _vectors()
    index, rep = dense.build(x, "flat")
    q = x[:5] + 0.01
    expect, brute = _exact_top(q, x, 10)
    scores, rows = index.search(q, 10)  # batch: FAISS
    np.testing.assert_array_equal(rows, expect)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expect, 1), rtol=1e-5)
    for i in range(5):  # one query: the BLAS matrix-vector path
        s1, r1 = index.search(q[i : i + 1], 10)
        np.testing.assert_array_equal(r1[0], expect[i])
        np.testing.assert_allclose(s1[0], scores[i], rtol=1e-5)
    assert index.search(q[:1], len(x))[1].shape == (1, len(x))  # k == n
    assert rep.factory == "Flat" and rep.recall_at_10 is None


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "sq8", "ivfsq8"])
def test_approximate_indexes_report_their_real_recall(kind):
    both = _vectors(3200, d=64)
    x, q = both[:3000], both[3000:]  # held-out queries from the same distribution
    index, rep = dense.build(x, kind, target_recall=0.9)
    assert rep.recall_at_10 is not None
    # IVF-PQ, 8 codes of 6 bits for 64 dims: with 40 candidates re-ranked it stays below 0.9 at every nprobe
    # (checked below); the tuned re-ranking depth gets there
    assert rep.recall_at_10 >= 0.9, rep
    if kind != "sq8":
        assert rep.search_param in ("efSearch", "nprobe") and rep.search_value >= 1
    assert rep.rerank == index.rerank and (rep.rerank > 4 if kind == "ivfpq" else rep.rerank == 0)
    if kind == "ivfpq":
        shallow = dense.DenseIndex(index.index, "ivfpq", "nprobe", faiss.extract_index_ivf(index.index).nlist, 4, x)
        assert _tuning_recall(shallow, x) < 0.9
    # the tuned settings are what search uses, and the recall holds on fresh queries
    exact = _exact_top(q, x, 10)[0]
    got = index.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)])
    assert recall >= min(0.88, rep.recall_at_10 - 0.05), (recall, rep)


def test_reranking_lifts_pq_recall_and_returns_exact_scores():
    both = _vectors(3200, d=64)
    x, q = both[:3000], both[3000:]
    index, rep = dense.build(x, "ivfpq")
    plain = dense.DenseIndex(index.index, "ivfpq", rep.search_param, rep.search_value)  # no vectors: no rerank
    exact = _exact_top(q, x, 10)[0]

    def recall(ix):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ix.search(q, 10)[1], strict=True)])

    assert recall(index) > recall(plain) + 0.2
    scores, rows = index.search(q[:3], 10)
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q[:3], x[rows]), rtol=1e-5)
    # a hybrid query's 100 candidates re-rank the tuned depth, not 100 x the per-result factor
    assert index.depth(100) == max(400, rep.rerank * 10) and index.depth(10) == max(40, rep.rerank * 10)


def test_an_unreachable_recall_target_keeps_the_best_setting_found():
    both = _vectors(3200, d=64)
    x = both[:3000]
    index, rep = dense.build(x, "ivfpq", target_recall=1.01)
    assert _tuning_recall(index, x) == pytest.approx(rep.recall_at_10)  # the kept setting's recall is reported
    nlist = faiss.extract_index_ivf(index.index).nlist
    for nprobe in (1, nlist):  # and no (nprobe, depth) tried does better
        for factor in dense_index.RERANK_FACTORS:
            other = dense.DenseIndex(index.index, "ivfpq", "nprobe", nprobe, factor, x)
            assert _tuning_recall(other, x) <= rep.recall_at_10 + 1e-9


def test_the_tunings_recall_from_candidates_alone_equals_re_ranking_each_depth():
    """The tuning counts the true neighbours among each depth's prefix of the deepest candidates, reading no
    stored vector: the recall it reports for every (nprobe, depth) is that of re-ranking that prefix exactly,
    as a search does. (A search asking FAISS for fewer candidates can differ where PQ scores tie at the cut.)"""
    x = _vectors(3000, d=64)
    index, _ = dense.build(x, "ivfpq")
    rows, noisy = dense.tuning_queries(x)
    sets = ((noisy, dense.exact_top_k(x, noisy, 11), None), (x[rows], dense.exact_top_k(x, x[rows], 11), rows))
    factors = list(dense_index.RERANK_FACTORS)

    class Unread:
        def __getitem__(self, rows):
            raise AssertionError("the tuning read stored vectors")

    for nprobe in (1, 4):
        index.search_value, index.vectors = nprobe, Unread()
        got = dict(dense._recalls(index, factors, sets, 10))
        assert list(got) == factors
        index.vectors = x
        want = dict.fromkeys(factors, 1.0)
        for q, truth, ex in sets:
            index.rerank = max(factors)
            deep = index.index.search(q, index.depth(11), params=index._params(11))[1]
            for factor in factors:
                index.rerank = factor
                ranked = index._rerank(q, deep[:, : index.depth(11)], 11)[1]
                want[factor] = min(want[factor], dense.recall_of(ranked, truth, 10, ex))
        assert got == pytest.approx(want)
    assert len({round(v, 6) for v in got.values()}) > 1  # the depths differ here: a prefix mix-up would show


def test_found_at_depth_places_the_true_neighbours_among_candidates():
    """Positions of each query's true top k (less its excluded row) among its candidates, the depth where absent."""
    truth = np.array([[5, 1, 9, 7], [2, 3, 4, 8]])  # exact top k + 1 = 4
    cand = np.array([[9, 0, 5, -1, 7], [3, 2, 6, 4, 1]])
    found = dense.found_at_depth(cand, truth, 3, exclude=np.array([-1, 2]))
    np.testing.assert_array_equal(found, [[0, 2, 5], [0, 3, 5]])  # 1 absent; query 2 skips its own row 2


def _tuning_recall(index, x) -> float:
    """The build's measure: recall@10 against exact search on the worse of its two tuning query sets."""
    rows, noisy = dense.tuning_queries(x)
    stored = x[rows]
    return min(dense.recall_against_exact(index, noisy, dense.exact_top_k(x, noisy, 11)),
               dense.recall_against_exact(index, stored, dense.exact_top_k(x, stored, 11), exclude=rows))


def test_hnsw_search_breadth_grows_with_k():
    x = _vectors(3000, d=64)
    index, rep = dense.build(x, "hnsw")
    assert index._params(10).efSearch == rep.search_value
    assert index._params(100).efSearch >= max(100, rep.search_value * 10)


def test_tuning_queries_are_harder_than_stored_vectors():
    x = _vectors(3000, d=64)
    rows, q = dense.tuning_queries(x, 200)
    assert len(set(rows.tolist())) == 200
    exact = faiss.IndexFlatIP(64)
    exact.add(x)
    top1 = exact.search(q, 1)[0].mean()
    assert 0.3 < top1 < 0.8  # like real questions, unlike a stored vector (1.0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-4)


def test_ivfpq_sizes_for_tiny_corpora():
    assert dense.factory_string("ivfpq", 400, 384) == "IVF10,PQ96x4fs"
    assert dense.factory_string("ivfpq", 12000, 384) == "IVF307,PQ96x4fs"
    assert dense.factory_string("ivfpq", 12000, 6) == "IVF307,PQ2x4fs"  # 4 does not divide 6: 3 dims each
    index, _ = dense.build(_vectors(400), "ivfpq")  # trains despite few points
    assert index.ntotal == 400
    assert isinstance(index.index, faiss.IndexIVFPQFastScan)


def test_unknown_index_type():
    with pytest.raises(RaglineError, match="unknown index type 'annoy'"):
        dense.factory_string("annoy", 10, 8)


def test_save_load_keeps_search_results(tmp_path):
    x = _vectors(500)
    index, rep = dense.build(x, "hnsw")
    index.save(tmp_path / "i.faiss")
    back = dense.DenseIndex.load(tmp_path / "i.faiss", "hnsw", rep.search_param, rep.search_value)
    np.testing.assert_array_equal(index.search(x[:20], 5)[1], back.search(x[:20], 5)[1])


def test_a_flat_index_is_saved_without_its_vectors_and_filled_from_the_stored_ones(tmp_path, monkeypatch):
    """A flat index's vectors are the stored embeddings: saved, it is a header, not n x d x 4 bytes again;
    loaded beside them it is filled from their file with read calls into FAISS's own array (allocated once) and
    answers as the index it was, batches and single queries; a flat index saved whole (as ragline did before)
    loads as it is; a build that only saves it fills nothing."""
    from ragline.index.npy_rows import NpyRows

    x = _vectors(3000)
    built, _ = dense.build(x, "flat")
    built.save(tmp_path / "dense.faiss")
    assert (tmp_path / "dense.faiss").stat().st_size < 100 and built.ntotal == len(x)  # saving kept it whole
    np.save(tmp_path / "embeddings.npy", x)
    vectors = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    reads, read_into = [], NpyRows.read_into
    monkeypatch.setattr(NpyRows, "read_into", lambda rows, lo, out: reads.append((lo, len(out)))
                        or read_into(rows, lo, out))
    back = dense_index.DenseIndex.load(tmp_path / "dense.faiss", "flat", vectors=vectors)
    assert reads == [(0, len(x))] and back.ntotal == len(x)
    q = _vectors(20, seed=3)
    for batch in (q, q[:1]):  # FAISS's scan, and the single query's matrix-vector product over FAISS's array
        np.testing.assert_array_equal(back.search(batch, 10)[1], built.search(batch, 10)[1])
        np.testing.assert_array_equal(back.search(batch, 10)[0], built.search(batch, 10)[0])
    faiss.write_index(built.index, str(tmp_path / "whole.faiss"))  # the format before: vectors inside
    reads.clear()
    whole = dense_index.DenseIndex.load(tmp_path / "whole.faiss", "flat", vectors=vectors)
    assert not reads and whole.ntotal == len(x)
    np.testing.assert_array_equal(whole.search(q, 10)[1], built.search(q, 10)[1])
    unfilled, _ = dense.build(x, "flat", fill_flat=False)
    assert unfilled.index.ntotal == 0 and unfilled.index.codes.size() == 0
    unfilled.save(tmp_path / "u.faiss")
    assert (tmp_path / "u.faiss").read_bytes() == (tmp_path / "dense.faiss").read_bytes()
    empty = faiss.IndexFlatIP(x.shape[1])
    dense_index.fill_flat(empty, x[:100], chunk_rows=7)  # an array, in chunks: copied
    np.testing.assert_array_equal(faiss.rev_swig_ptr(empty.get_xb(), 100 * x.shape[1]).reshape(100, -1), x[:100])
    for target, rows in ((empty, x), (faiss.IndexFlatIP(8), x)):  # full already; another dimension
        with pytest.raises(ValueError, match="cannot fill a flat index"):
            dense_index.fill_flat(target, rows)


def test_streamed_exact_top_k_equals_brute_force():
    x = _vectors(1000, d=16)
    q = _vectors(7, d=16, seed=3)
    expect, _ = _exact_top(q, x, 5)
    np.testing.assert_array_equal(dense.exact_top_k(x, q, 5, chunk=64), expect)
    np.testing.assert_array_equal(dense.exact_top_k(x[:3], q, 5, chunk=2), _exact_top(q, x[:3], 3)[0])


def test_fp16_scans_exactly_over_float16_vectors(tmp_path):
    """fp16 ranks as the exact scan over the vectors rounded to float16 (exactly so when they were float16
    already), holds half the bytes, reports its recall against the float32 scan and survives a reload."""
    x = _vectors(2000, d=64).astype(np.float16).astype(np.float32)  # float16 values: no rounding left
    index, rep = dense.build(x, "fp16")
    assert rep.factory == "SQfp16" and rep.recall_at_10 == 1.0 and rep.search_param is None
    q = _vectors(20, d=64, seed=3)
    expect, brute = _exact_top(q, x, 10)
    for batch in (q, q[:1]):  # a batch and one query (one thread)
        scores, rows = index.search(batch, 10)
        np.testing.assert_array_equal(rows, expect[: len(batch)])
        np.testing.assert_allclose(scores, np.take_along_axis(brute, expect, 1)[: len(batch)], rtol=1e-5)
    assert index.index.sa_code_size() == 2 * 64
    index.save(tmp_path / "i.faiss")
    back = dense.DenseIndex.load(tmp_path / "i.faiss", "fp16")
    np.testing.assert_array_equal(back.search(q, 10)[1], expect)
    rounded, _ = dense.build(_vectors(2000, d=64), "fp16")  # float32 vectors: rounded, ranking kept nearly
    assert rounded.search(q, 10)[1][:, 0].tolist() == _exact_top(q, _vectors(2000, d=64), 1)[0][:, 0].tolist()


def test_auto_picks_by_corpus_size_and_memory():
    gib = 2**30
    assert dense.choose_type(12_324, 384, 24 * gib)[0] == "flat"
    assert dense.choose_type(vocab.AUTO_EXACT_MAX, 384, 24 * gib)[0] == "flat"
    kind, why = dense.choose_type(1_000_000, 384, 24 * gib)
    assert kind == "fp16" and "0.7 GiB" in why
    assert dense.choose_type(10_000_000, 384, 24 * gib)[0] == "ivfpq"  # 7.2 GiB > a quarter of 24
    assert dense.choose_type(10_000_000, 384, 64 * gib)[0] == "fp16"
    assert dense.resolve_type("hnsw", 10, 8) == ("hnsw", None)
    assert dense.resolve_type("auto", 10, 8)[0] == "flat"
    with pytest.raises(RaglineError, match="unknown index type"):
        dense.factory_string(dense.resolve_type("annoy", 10, 8)[0], 10, 8)


def test_exact_top_k_streams_to_the_brute_force_answer():
    x = _vectors(1000, d=16, seed=4)
    q = _vectors(30, d=16, seed=5)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    for chunk in (1, 5, 7, 64, 5000):  # blocks smaller than, equal to and larger than k, and one block
        np.testing.assert_array_equal(dense.exact_top_k(x, q, 7, chunk=chunk), want)


@pytest.mark.parametrize("kind", ["flat", "fp16", "sq8", "hnsw"])
def test_codes_are_filled_in_place_once_reserved(kind, monkeypatch):
    """A batched build allocates a one-array index's codes once (``reserve_codes``): the array never moves
    while the batches fill it (without the reservation it does, each move holding two copies), and a build
    reserves exactly its vectors' count."""
    x = _vectors(3000, d=16)

    def fill(reserve: bool) -> set[int]:
        index = faiss.index_factory(16, dense.factory_string(kind, len(x), 16), faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(x)
        if reserve:
            dense.reserve_codes(index, len(x))
        flat = faiss.downcast_index(index.storage) if kind == "hnsw" else index
        codes = flat.codes
        places = set()
        for lo in range(0, len(x), 100):
            index.add(x[lo : lo + 100])
            places.add(int(codes.data()))
        assert index.ntotal == len(x) and codes.size() == len(x) * flat.code_size
        return places

    assert len(fill(reserve=True)) == 1
    assert len(fill(reserve=False)) > 1
    reserved = []
    monkeypatch.setattr(dense, "reserve_codes", lambda index, n: reserved.append(n))
    dense.build(x, kind, add_batch=512)
    assert reserved == [len(x)]
