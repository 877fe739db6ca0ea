"""The RAG likelihoods against explicit sums over passages, and against Hugging Face's RAG classes."""

import math

import pytest
import torch

from ragline.rag import marginal


def _random_case(b=3, k=4, t=5, v=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(b, k, t, v, generator=g, dtype=torch.float64), -1)
    doc = torch.log_softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1)
    target = torch.randint(0, v, (b, t), generator=g)
    lengths = [t, t - 2, 1]
    mask = torch.tensor([[i < n for i in range(t)] for n in lengths[:b]])
    return logprobs, doc, target, mask


def test_sequence_and_token_likelihoods_equal_explicit_sums():
    logprobs, doc, target, mask = _random_case()
    seq = marginal.rag_sequence(logprobs, doc, target, mask)
    tok = marginal.rag_token(logprobs, doc, target, mask)
    p = logprobs.exp()
    for b in range(target.shape[0]):
        n = int(mask[b].sum())
        # RAG-Sequence: sum_z p(z|x) prod_t p(y_t|x,z,y<t)
        p_seq = sum(math.exp(doc[b, z]) * math.prod(p[b, z, i, target[b, i]].item() for i in range(n))
                    for z in range(doc.shape[1]))
        # RAG-Token: prod_t sum_z p(z|x) p(y_t|x,z,y<t)
        p_tok = math.prod(sum(math.exp(doc[b, z]) * p[b, z, i, target[b, i]].item() for z in range(doc.shape[1]))
                          for i in range(n))
        assert seq.loglik[b].item() == pytest.approx(math.log(p_seq), rel=1e-10)
        assert tok.loglik[b].item() == pytest.approx(math.log(p_tok), rel=1e-10)
        # posterior p(z|x,y) for RAG-Sequence
        joint = [math.exp(doc[b, z]) * math.prod(p[b, z, i, target[b, i]].item() for i in range(n))
                 for z in range(doc.shape[1])]
        assert seq.posterior[b].tolist() == pytest.approx([j / sum(joint) for j in joint], rel=1e-9)
    assert torch.allclose(seq.loss, -seq.loglik) and torch.allclose(tok.loss, -tok.loglik)
    assert torch.allclose(tok.token_posterior.sum(-1), torch.ones_like(tok.token_posterior.sum(-1)))


def test_one_passage_makes_both_models_the_plain_likelihood():
    logprobs, _, target, mask = _random_case(k=1)
    doc = torch.zeros(3, 1, dtype=torch.float64)
    plain = (marginal.gather_targets(logprobs, target, mask.double())[:, 0]).sum(-1)
    assert torch.allclose(marginal.rag_sequence(logprobs, doc, target, mask).loglik, plain)
    assert torch.allclose(marginal.rag_token(logprobs, doc, target, mask).loglik, plain)


def test_log_space_survives_long_targets():
    """Probabilities far below float range: the products would underflow to 0; log space does not."""
    logprobs, doc, target, mask = _random_case(b=1, t=600, v=50_000 // 100, seed=3)
    mask = torch.ones_like(mask, dtype=torch.bool)[:, :600]
    ll = marginal.rag_sequence(logprobs.float(), doc.float(), target, mask).loglik
    assert torch.isfinite(ll).all() and ll.item() < -1000


def test_gradient_reaches_the_retrieval_scores():
    logprobs, _, target, mask = _random_case()
    scores = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for fn in (marginal.rag_sequence, marginal.rag_token):
        scores.grad = None
        fn(logprobs, marginal.doc_log_probs(scores), target, mask).loss.sum().backward()
        assert scores.grad is not None and scores.grad.abs().sum() > 0
