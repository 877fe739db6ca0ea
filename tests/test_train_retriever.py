"""DPR training on pairs from a real slice of the bundled corpus (MiniLM of the small index)."""

import hashlib

import numpy as np
import pytest
from conftest import write_jsonl

from ragline.errors import RaglineError
from ragline.index.directory import IndexDir
from ragline.models.encoders import TextEncoder
from ragline.retriever import Retriever
from ragline.train.retriever import RetrieverTrainConfig, RetrieverTrainer, recall_at, resolve_pairs


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, wiki_docs):
    """Hard pairs: a span from the middle of each page (no title), positive = the page."""
    recs = []
    for i, d in enumerate(wiki_docs[:60]):
        words = d["text"].split()
        if len(words) >= 40:
            recs.append({"id": f"p{i}", "question": " ".join(words[20:30]), "answers": [d["title"]],
                         "positive": [d["title"]]})
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", recs)


def test_hard_negatives_come_from_other_pages(small_index, pairs_file):
    from ragline.train.data import read_examples

    index = IndexDir.open(small_index)
    pairs, missing = resolve_pairs(read_examples(str(pairs_file)), index, 2)
    titles = index.store.table.column("title").to_pylist()
    assert missing == 0 and pairs
    for p in pairs:
        assert titles[p.positive] in p.pages and len(p.negatives) <= 2  # fewer when BM25 matches fewer pages
        assert all(titles[r] not in p.pages for r in p.negatives)
    assert sum(len(p.negatives) == 2 for p in pairs) > 0.8 * len(pairs)


def test_training_raises_recall_on_its_pairs_and_leaves_the_index(tmp_path, small_index, pairs_file):
    emb = hashlib.sha256((small_index / "embeddings.npy").read_bytes()).hexdigest()
    cfg = RetrieverTrainConfig(train=str(pairs_file), index=str(small_index), lr=1e-4, batch_size=8, steps=30,
                               warmup=3, val_fraction=0.0, eval_every=10, save_every=15, seed=1)
    tr = RetrieverTrainer(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    index = IndexDir.open(small_index)
    before = recall_at(tr.question, index, tr.train_set)
    tr.run_training()
    trained = TextEncoder(str(tmp_path / "run" / "final" / "question_encoder"))
    after = recall_at(trained, index, tr.train_set)
    assert after["recall@1"] > before["recall@1"] + 0.05, (before, after)
    assert after["recall@5"] >= before["recall@5"]
    assert hashlib.sha256((small_index / "embeddings.npy").read_bytes()).hexdigest() == emb
    r = Retriever(small_index, trained)  # paired with the index's passage encoder as it is
    assert r.search([tr.train_set[0].question], k=1)[0]


def test_training_the_passage_encoder_reencodes_into_a_new_index_and_hot_swaps(tmp_path, small_index, pairs_file):
    new = tmp_path / "reencoded"
    cfg = RetrieverTrainConfig(train=str(pairs_file), index=str(small_index), train_passage_encoder=True, lr=5e-5,
                               batch_size=4, steps=2, warmup=1, val_fraction=0.0, eval_every=2, save_every=2,
                               new_index=str(new))
    RetrieverTrainer(cfg, tmp_path / "run", progress=False, log=lambda m: None).run_training()
    old, fresh = IndexDir.open(small_index), IndexDir.open(new)
    assert len(fresh) == len(old) and fresh.fingerprint != old.fingerprint
    assert not np.allclose(np.asarray(fresh.embeddings[:5]), np.asarray(old.embeddings[:5]))
    r = Retriever(small_index)
    q = TextEncoder(str(tmp_path / "run" / "final" / "question_encoder"))
    with pytest.raises(RaglineError, match="passage encoder"):
        r.swap(fresh)  # the old question encoder does not fit the re-encoded index
    r.swap(fresh, q)
    assert r.index.path == fresh.path and r.encoder is q
    assert r.search(["an example question"], k=3)[0]


def test_no_positive_in_the_index_is_a_clear_error(tmp_path, small_index):
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "q?", "answers": ["a"], "positive": ["No Such Page"]}])
    with pytest.raises(RaglineError, match="no training example has a positive"):
        RetrieverTrainer(RetrieverTrainConfig(train=str(f), index=str(small_index)), tmp_path / "run",
                         progress=False, log=lambda m: None)
