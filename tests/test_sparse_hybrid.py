import numpy as np

from ragline.index.hybrid import rrf_fuse
from ragline.index.sparse import BM25Index

TEXTS = ["Paris is the capital of France", "Berlin is the capital of Germany",
         "The cat sat on the mat", "Rome is Italy's capital city"]


def test_bm25_ranks_by_shared_terms_and_survives_reload(tmp_path):
    idx = BM25Index.build([TEXTS[:2], TEXTS[2:]], tmp_path / "bm")
    scores, rows = idx.search(["capital of Germany", "cats", "the of", "zzzz Italy"], 3)
    assert rows[0, 0] == 1 and set(rows[0]) == {0, 1, 3}  # every "capital" passage, Germany first
    assert rows[1].tolist() == [2, -1, -1]                  # stemming: cats -> cat
    assert rows[2].tolist() == [-1, -1, -1]                 # only stop words: no hits, not 3 arbitrary ones
    assert rows[3].tolist() == [3, -1, -1]                  # unknown words are ignored
    assert scores[0, 0] > scores[0, 1] > 0
    again = BM25Index.load(tmp_path / "bm")
    s2, r2 = again.search(["capital of Germany", "cats", "the of", "zzzz Italy"], 3)
    np.testing.assert_array_equal(rows, r2)
    np.testing.assert_allclose(scores, s2)


def test_rrf_matches_hand_computation():
    dense_rows = np.array([[5, 3, 9, -1]])
    bm25_rows = np.array([[3, 7, -1, -1]])
    scores, rows = rrf_fuse([dense_rows, bm25_rows], k=4, c=60)
    # 3: 1/62 + 1/61; 5: 1/61; 7: 1/62; 9: 1/63
    assert rows.tolist() == [[3, 5, 7, 9]]
    np.testing.assert_allclose(scores[0], [1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63], rtol=1e-6)
    scores, rows = rrf_fuse([dense_rows, bm25_rows], k=6)
    assert rows[0, 4:].tolist() == [-1, -1] and scores[0, 4:].tolist() == [0, 0]
    # weights: with equal weights BM25's first place (7) ties dense's first (5) and beats dense's second (9)
    d, s = np.array([[5, 9]]), np.array([[7]])
    assert rrf_fuse([d, s], k=3, c=20)[1].tolist() == [[5, 7, 9]]
    scores, rows = rrf_fuse([d, s], k=3, c=20, weights=(1.0, 0.3))
    assert rows.tolist() == [[5, 9, 7]]
    np.testing.assert_allclose(scores[0], [1 / 21, 1 / 22, 0.3 / 21], rtol=1e-6)


def test_bm25_search_ranks_only_matching_passages_as_a_full_ranking_would(tmp_path):
    """Search ranks the passages sharing a query term; the result equals the top k of every passage's score
    (zeros dropped), ties by row, with and without an allowed mask."""
    from ragline.index.topk import top_k

    texts = [TEXTS[i % 4] + (" extra words" * (i % 3)) for i in range(40)]  # repeated passages: tied scores
    idx = BM25Index.build([texts], tmp_path / "bm")
    queries = ["capital of Germany", "the cat", "Rome capital extra", "France words"]
    allowed = np.arange(40) % 5 != 0
    for mask in (None, allowed):
        scores, rows = idx.search(queries, 7, mask)
        ids = idx.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        for b, q in enumerate(ids):
            full = idx.retriever.get_scores(list(q))
            if mask is not None:
                full = np.where(mask, full, 0).astype(full.dtype)
            want = top_k(full, 7)
            want = want[full[want] > 0]
            assert len(want) == 7 and rows[b].tolist() == want.tolist()
            np.testing.assert_array_equal(scores[b], full[want])
