import faiss
import numpy as np
import pytest

from ragline.errors import RaglineError
from ragline.index import dense


def _vectors(n=3000, d=32, seed=0):
    """Clustered unit vectors, like text embeddings (uniform random ones defeat any ANN index)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, d))
    x = centers[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact_inner_product():
    x = _vectors()
    index, rep = dense.build(x, "flat")
    q = x[:5] + 0.01
    scores, rows = dense.DenseIndex(index, "flat").search(q, 10)
    brute = q @ x.T
    expect = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expect)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expect, 1), rtol=1e-5)
    assert rep.factory == "Flat" and rep.recall_at_10 is None


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "sq8", "ivfsq8"])
def test_approximate_indexes_report_their_real_recall(kind):
    both = _vectors(3200, d=64)
    x, q = both[:3000], both[3000:]  # held-out queries from the same distribution
    index, rep = dense.build(x, kind, target_recall=0.9)
    assert rep.recall_at_10 is not None
    if kind == "ivfpq":  # 8 codes of 6 bits for 64 dims: too lossy for 0.9 at any nprobe
        assert rep.search_value == faiss.extract_index_ivf(index).nlist  # so tuning went to the end
    else:
        assert rep.recall_at_10 >= 0.9, rep
    if kind != "sq8":
        assert rep.search_param in ("efSearch", "nprobe") and rep.search_value >= 1
    # the tuned setting is what search uses, and the reported recall holds on fresh queries
    di = dense.DenseIndex(index, kind, rep.search_param, rep.search_value)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    got = di.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got, strict=True)])
    assert abs(recall - rep.recall_at_10) < 0.08, (recall, rep)


def test_ivfpq_sizes_for_tiny_corpora():
    assert dense.factory_string("ivfpq", 400, 384) == "IVF10,PQ48x4"
    assert dense.factory_string("ivfpq", 12000, 384) == "IVF307,PQ48x8"
    index, rep = dense.build(_vectors(400), "ivfpq")  # trains despite few points
    assert index.ntotal == 400


def test_unknown_index_type():
    with pytest.raises(RaglineError, match="unknown index type 'annoy'"):
        dense.factory_string("annoy", 10, 8)


def test_save_load_keeps_search_results(tmp_path):
    x = _vectors(500)
    index, rep = dense.build(x, "hnsw")
    di = dense.DenseIndex(index, "hnsw", rep.search_param, rep.search_value)
    di.save(tmp_path / "i.faiss")
    back = dense.DenseIndex.load(tmp_path / "i.faiss", "hnsw", rep.search_param, rep.search_value)
    np.testing.assert_array_equal(di.search(x[:20], 5)[1], back.search(x[:20], 5)[1])
