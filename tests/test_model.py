"""RagModel end to end on the test index slice with the bundled SmolLM2: answers, attribution, gradients."""

import pytest
import torch

from ragline.errors import RaglineError
from ragline.models.generators import CausalGenerator
from ragline.rag.model import RagModel
from ragline.retriever import Retriever

Q = "Who directed the film 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def rag(small_index, encoders):
    return RagModel(Retriever(small_index, encoders.question), CausalGenerator.load("smollm2"), k=3)


@pytest.mark.parametrize("model, decoding", [("rag-sequence", "thorough"), ("rag-sequence", "fast"),
                                             ("rag-token", "beam"), ("rag-token", "greedy")])
def test_answers_come_with_their_sources(rag, model, decoding):
    (a,) = rag.answer([Q], model=model, decoding=decoding, beams=2, max_new_tokens=32)
    assert "Kubrick" in a.text, a.text
    assert [s.rank for s in a.sources] == [1, 2, 3] and a.sources[0].title == "2001: A Space Odyssey"
    assert sum(s.prior for s in a.sources) == pytest.approx(1.0, abs=1e-5)
    assert sum(s.posterior for s in a.sources) == pytest.approx(1.0, abs=1e-5)
    assert a.sources[0].posterior > a.sources[0].prior  # the answer came from the Kubrick passage
    assert a.logprob < 0
    if model == "rag-token":
        assert a.token_sources and all(len(p) == 3 and sum(p) == pytest.approx(1, abs=1e-5) for _, p in a.token_sources)
        assert "Kub" in "".join(t for t, _ in a.token_sources)
    else:
        assert a.token_sources is None


def test_batched_answers_equal_one_by_one(rag):
    qs = [Q, "Who wrote the novel about Huckleberry Finn?"]
    both = rag.answer(qs, model="rag-token", decoding="greedy", max_new_tokens=16)
    for q, a in zip(qs, both, strict=True):
        (one,) = rag.answer([q], model="rag-token", decoding="greedy", max_new_tokens=16)
        assert one.text == a.text and one.logprob == pytest.approx(a.logprob, abs=1e-3)
        assert [s.pid for s in one.sources] == [s.pid for s in a.sources]


def test_closed_book_has_no_sources(rag):
    (a,) = rag.answer(["What is the capital of France?"], model="closed-book", decoding="greedy", max_new_tokens=12)
    assert "Paris" in a.text and a.sources == []


def test_bad_model_or_decoding(rag):
    with pytest.raises(RaglineError, match="rag-token has no 'thorough' decoding; use --decoding beam or greedy"):
        rag.answer([Q], model="rag-token", decoding="thorough")
    with pytest.raises(RaglineError, match="unknown model 'rag-tree'"):
        rag.answer([Q], model="rag-tree")


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_likelihood_trains_generator_and_question_encoder(rag, model):
    gen, enc = rag.generator.model, rag.retriever.encoder.model
    gen.zero_grad()
    enc.zero_grad()
    lik = rag.likelihood([Q], ["Stanley Kubrick"], model=model)
    lik.loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    gen.zero_grad()
    enc.zero_grad()
    assert lik.posterior[0, 0] > 0.5  # the answer is attributed to the Kubrick passage
    assert torch.isfinite(lik.loglik).all() and lik.loglik.item() < 0


def test_prior_is_the_scaled_softmax_of_the_retrieval_scores(rag):
    (a,) = rag.answer([Q], model="rag-token", decoding="greedy", max_new_tokens=4)
    scores = torch.tensor([s.score for s in a.sources])
    assert rag.prior_scale is None  # the index's own scale: MiniLM's cosines record 20
    from ragline.index import manifest as mf

    assert rag.retriever.index.manifest["encoder"]["prior_scale"] == mf.prior_scale(rag.retriever.index.manifest) == 20
    expect = torch.softmax(20 * scores, 0)
    assert [s.prior for s in a.sources] == pytest.approx(expect.tolist(), abs=1e-5)
    flat = torch.softmax(scores, 0)  # scale 1: cosines in [-1, 1] keep the best passage under half the prior
    assert flat.max() < 0.5 < a.sources[0].prior


@pytest.mark.parametrize("model, decoding", [("rag-sequence", "thorough"), ("rag-token", "beam")])
def test_n_best_alternatives(rag, model, decoding):
    (a,) = rag.answer([Q], model=model, decoding=decoding, beams=3, n_best=3, max_new_tokens=12)
    assert 1 < len(a.alternatives) <= 3
    assert a.alternatives[0] == (a.text, pytest.approx(a.logprob))
    assert len({t for t, _ in a.alternatives}) == len(a.alternatives)
    if model == "rag-sequence":  # ranked by the marginal log p(y|x)
        assert [lp for _, lp in a.alternatives] == sorted((lp for _, lp in a.alternatives), reverse=True)


def test_cli_ask_prints_json_and_rejects_a_wrong_decoding(small_index):
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "ragline", "ask", Q, "--index", str(small_index), "--generator", "smollm2", "-k", "2"]
    ok = subprocess.run([*base, "--model", "rag-token", "--decoding", "greedy", "--json", "--max-new-tokens", "24"],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    a = json.loads(ok.stdout.splitlines()[0])
    assert "Kub" in a["text"] and len(a["sources"]) == 2 and a["token_sources"]
    bad = subprocess.run([*base, "--model", "rag-token", "--decoding", "thorough"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("error: rag-token has no 'thorough' decoding; "
                                                   "use --decoding beam or greedy")
