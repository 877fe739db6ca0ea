import threading
import time

import numpy as np
import pytest
from conftest import SLICE_DOCS, make_encoder_copy

from ragline.errors import RaglineError
from ragline.index.build import BuildOptions, build_index
from ragline.index.directory import IndexDir
from ragline.index.hybrid import rrf_fuse
from ragline.models.encoders import BiEncoder, TextEncoder, load_encoder
from ragline.retriever import Retriever

QUESTION = "Who directed the film 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def retriever(small_index, encoders):
    return Retriever(small_index, encoders.question)


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_each_mode_finds_the_right_page(retriever, mode):
    hits = retriever.search([QUESTION, "Who wrote the novel about Huckleberry Finn?"], k=5, mode=mode)
    assert hits[0][0].title == "2001: A Space Odyssey" and "Kubrick" in hits[0][0].text
    assert hits[1][0].title == "Adventures of Huckleberry Finn"
    for hs in hits:
        assert [h.rank for h in hs] == list(range(1, len(hs) + 1))
        assert all(a.score >= b.score for a, b in zip(hs, hs[1:], strict=False))
        assert len({h.row for h in hs}) == len(hs)


def test_dense_scores_are_inner_products_of_stored_embeddings(retriever):
    res = retriever.retrieve([QUESTION], k=10, mode="dense")
    q = res.question_vectors  # (1, d): the q(x) the search used, returned with the hits
    np.testing.assert_array_equal(q, retriever.encoder.encode([QUESTION]))
    emb = retriever.index.embeddings
    np.testing.assert_allclose(res.scores[0], emb[res.rows[0]] @ q[0], rtol=1e-4, atol=1e-5)
    brute = np.argsort(-(emb @ q[0]))[:10]  # exact index: same order as brute force
    np.testing.assert_array_equal(res.rows[0], brute)


def test_batch_equals_one_by_one(retriever):
    qs = [QUESTION, "Where is the Amazon river?", "theory of relativity"]
    batch = retriever.retrieve(qs, k=7)
    for i, q in enumerate(qs):
        one = retriever.retrieve([q], k=7)
        np.testing.assert_array_equal(batch.rows[i], one.rows[0])


def _fused(retriever, question: str, k: int) -> np.ndarray:
    """The hybrid ranking computed one half after the other: RRF of the dense and BM25 top 100."""
    dense = retriever.retrieve([question], k=100, mode="dense").rows
    bm25 = retriever.retrieve([question], k=100, mode="bm25").rows
    return rrf_fuse([dense, bm25], k, c=retriever.rrf_c, weights=(1.0, retriever.bm25_weight))[1]


def test_hybrid_searches_bm25_beside_the_dense_half_with_the_same_result(retriever, monkeypatch):
    from ragline import retriever as module

    threads = []
    search, encode = retriever.index.bm25.search, retriever.encoder.encode
    monkeypatch.setattr(retriever.index.bm25, "search",
                        lambda *a: (threads.append(threading.current_thread().name), search(*a))[1])
    # the dense half made slow, so that the worker surely takes the BM25 half up first on a loaded machine
    monkeypatch.setattr(retriever.encoder, "encode", lambda qs: (time.sleep(0.3), encode(qs))[1])
    got = retriever.retrieve([QUESTION], k=7, mode="hybrid").rows
    assert threads == [t for t in threads if t.startswith("ragline-bm25")] and len(threads) == 1
    threads.clear()
    np.testing.assert_array_equal(got, _fused(retriever, QUESTION, 7))

    # every worker busy: the request searches its own BM25 half rather than wait behind them
    release = threading.Event()
    busy = [module._BACKGROUND.submit(release.wait, 30) for _ in range(module.HYBRID_THREADS)]
    try:
        threads.clear()
        got = retriever.retrieve([QUESTION], k=7, mode="hybrid").rows
        assert threads == [threading.current_thread().name]
    finally:
        release.set()
        for f in busy:
            f.result()
    np.testing.assert_array_equal(got, _fused(retriever, QUESTION, 7))


def test_a_failing_bm25_half_fails_the_hybrid_search(retriever, monkeypatch):
    def broken(*a):
        raise OSError("bm25 file unreadable")

    monkeypatch.setattr(retriever.index.bm25, "search", broken)
    with pytest.raises(OSError, match="bm25 file unreadable"):
        retriever.retrieve([QUESTION], k=5, mode="hybrid")


def test_bad_queries(retriever):
    n = len(retriever.index)
    for questions, k, mode, msg in [([""], 5, "dense", "question 1 is empty"),
                                    (["ok", "  "], 5, "bm25", "question 2 is empty"),
                                    ([], 5, "dense", "no question given"),
                                    (["ok"], 0, "dense", "k=0 is not a positive number"),
                                    (["ok"], n + 1, "hybrid", f"k={n + 1} is larger than index"),
                                    (["ok"], 5, "splade", "unknown retrieval mode")]:
        with pytest.raises(RaglineError, match=msg):
            retriever.search(questions, k=k, mode=mode)
    assert len(retriever.search(["ok"], k=n, mode="dense")[0]) == n  # k == corpus size is fine


def test_encoder_mismatch_is_refused_with_a_clear_message(small_index, tmp_path):
    other = TextEncoder(str(make_encoder_copy(tmp_path / "perturbed", noise=1e-3)))
    with pytest.raises(RaglineError, match="does not match index .* built with passage encoder"):
        Retriever(small_index, other)
    assert Retriever(small_index, other, allow_encoder_mismatch=True).search([QUESTION], k=1)[0]
    tiny = TextEncoder(str(make_encoder_copy(tmp_path / "tiny", dim=32)))
    with pytest.raises(RaglineError, match="gives 32-d vectors but index .* holds 384-d"):
        Retriever(small_index, tiny, allow_encoder_mismatch=True)


def test_question_encoder_loaded_from_the_manifest(small_index):
    r = Retriever(small_index)  # no encoder given: the one recorded in the manifest
    assert r.search([QUESTION], k=1)[0][0].title == "2001: A Space Odyssey"


def test_hot_swap_under_concurrent_searches(small_index, encoders, tmp_path):
    other = build_index(BuildOptions(source="wiki-leads", out=tmp_path / "bigger", limit=SLICE_DOCS + 60,
                                     progress=False, bm25=False), encoders=encoders, log=lambda m: None)
    r = Retriever(small_index, encoders.question)
    a, b = IndexDir.open(small_index), IndexDir.open(other)
    errors, seen = [], set()
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            try:
                res = r.retrieve([QUESTION], k=3)
                seen.add(res.index.fingerprint)
                assert (res.rows >= 0).all()
            except Exception as e:  # noqa: BLE001 - any failure is what the test looks for
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2.0
    i = 0
    while time.monotonic() < deadline:  # swap back and forth while the workers search
        r.swap(b if i % 2 == 0 else a)
        i += 1
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and i > 50
    assert seen == {a.fingerprint, b.fingerprint}
    r.swap(b)
    assert r.index.fingerprint == b.fingerprint and len(r.index) > len(a)
    with pytest.raises(RaglineError, match="cannot do bm25 retrieval"):  # built with --no-bm25
        r.search([QUESTION], k=3, mode="bm25")


def test_swap_to_an_index_of_another_encoder_keeps_the_old_one(small_index, tmp_path):
    enc = BiEncoder.load(str(make_encoder_copy(tmp_path / "perturbed", noise=1e-3)))
    foreign = build_index(BuildOptions(source="wiki-leads", out=tmp_path / "foreign", limit=20, progress=False,
                                       bm25=False), encoders=enc, log=lambda m: None)
    r = Retriever(small_index)
    before = r.index.fingerprint
    with pytest.raises(RaglineError, match="does not match index foreign"):
        r.swap(foreign)
    assert r.index.fingerprint == before


def test_a_plain_bert_folder_is_read_dpr_style_not_mean_pooled(tmp_path):
    """A bare BERT folder (no sentence-transformers config) is a DPR-style encoder: the last layer's [CLS]
    vector, not normalised, with prior scale 1; sentence-transformers would have mean-pooled it silently."""
    import torch

    make_encoder_copy(tmp_path / "st", dim=32)
    plain = tmp_path / "st-bert"  # the bare BertModel + tokenizer that make_encoder_copy wrapped
    enc = load_encoder(str(plain))
    assert (enc.kind, enc.pooling, enc.normalised, enc.prior_scale) == ("bert-cls", "cls", False, 1.0)
    v = enc.encode(["a question", "another question"])
    assert v.shape == (2, 32) and enc.dim == 32
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(plain), AutoModel.from_pretrained(plain)
    batch = tok(["a question"], return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (1, T, 32)
    np.testing.assert_allclose(v[0], h[0, 0].numpy(), rtol=1e-4, atol=1e-5)
    mean = (h * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum()
    assert not np.allclose(v[0], mean[0].numpy(), atol=1e-3)
    with pytest.raises(RaglineError, match="not a sentence-transformers folder"):
        TextEncoder(str(plain))


def test_doc_scores_are_recomputed_with_gradient_to_the_question_encoder(small_index, encoders):
    r = Retriever(small_index, encoders.question)
    qs = [QUESTION, "Who wrote the novel about Huckleberry Finn?"]
    res = r.retrieve(qs, k=4)
    before = np.array(r.index.embeddings[res.rows.reshape(-1)])
    model = encoders.question.model
    model.zero_grad()
    scores = r.doc_scores(encoders.question.embed(qs), res.rows, res.index)  # (B, K), differentiable
    np.testing.assert_allclose(scores.detach().numpy(), res.scores, atol=1e-4)
    scores.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    np.testing.assert_array_equal(np.array(r.index.embeddings[res.rows.reshape(-1)]), before)  # d(z) frozen
    model.zero_grad()


def test_a_swap_during_retrieval_never_pairs_one_encoders_q_with_another_indexs_d(small_index, tmp_path):
    """RAG's prior uses the q(x) the search used, from the same (index, encoder) snapshot, even when a swap to
    an index of another encoder lands between the search and the scoring."""
    from ragline.rag.model import RagModel

    enc = BiEncoder.load(str(make_encoder_copy(tmp_path / "perturbed", noise=1e-2)))
    foreign = build_index(BuildOptions(source="wiki-leads", out=tmp_path / "foreign", limit=20, progress=False,
                                       bm25=False), encoders=enc, log=lambda m: None)
    r = Retriever(small_index)
    old_index, old_encoder = r.snapshot()
    search = old_index.dense.search

    def search_then_swap(queries, k):
        out = search(queries, k)
        r.swap(foreign, enc.question)  # lands after the search, before the prior is computed
        return out

    old_index.dense.search = search_then_swap
    try:
        passages, scores, _ = RagModel(r, generator=None, k=3).retrieve([QUESTION], 3)
    finally:
        old_index.dense.search = search
    assert r.index.name == "foreign" and r.encoder is enc.question
    rows = np.array([old_index.store.row_of(p.pid) for p in passages[0]])
    q = old_encoder.encode([QUESTION])[0]
    np.testing.assert_allclose(scores[0].numpy(), old_index.embeddings[rows] @ q, rtol=1e-5, atol=1e-6)
    assert not np.allclose(enc.question.encode([QUESTION])[0] @ old_index.embeddings[rows].T, scores[0].numpy(),
                           atol=1e-4)  # the new encoder's q(x) would have given other scores
