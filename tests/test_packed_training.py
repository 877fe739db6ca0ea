"""Training computes no padding: the marginal likelihood's loss and gradients through the packed prefill equal
the padded pass's (fp32, to 1e-5), for RAG-Sequence and RAG-Token, on the tiny causal generator over the real
slice index (the question encoder's gradient through p(z|x) included)."""

import pytest
import torch
from conftest import tiny_generator

QUESTIONS = ["Who wrote Candide?", "Which city is the capital of the Roman Empire, and for how long was it?"]
ANSWERS = ["Voltaire", "Rome, for centuries"]


@pytest.fixture(scope="module")
def rag(small_index):
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever

    torch.manual_seed(0)
    gen = tiny_generator()
    gen.kv_cache = None
    return RagModel(Retriever(small_index), gen, k=3)


def _loss_and_grads(rag, model: str, packed: bool) -> tuple[float, dict[str, torch.Tensor]]:
    rag.generator.packed = packed
    parts = {"g": rag.generator.model, "q": rag.retriever.encoder.model}
    for m in parts.values():
        m.eval()
        m.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.requires_grad_(True)
    loss = rag.likelihood(QUESTIONS, ANSWERS, model=model).loss.float().mean()
    loss.backward()
    loss = loss.detach()
    grads = {f"{k}.{n}": p.grad.detach().clone() for k, m in parts.items() for n, p in m.named_parameters()
             if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_packed_loss_and_gradients_equal_the_padded_ones(rag, model, monkeypatch):
    from ragline.models import causal

    calls = []
    real = causal.prefill

    def spy(*args, **kwargs):
        calls.append(kwargs.get("states"))
        return real(*args, **kwargs)

    padded_loss, padded = _loss_and_grads(rag, model, packed=False)
    monkeypatch.setattr(causal, "prefill", spy)
    try:
        packed_loss, packed = _loss_and_grads(rag, model, packed=True)
    finally:
        rag.generator.packed = True
    assert calls and calls == [False] * len(calls)  # the packed pass ran, without gathering a decoding cache
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-5)
    assert padded.keys() == packed.keys() and any(k.startswith("q.") for k in padded)
    for name, g in padded.items():
        torch.testing.assert_close(packed[name], g, rtol=1e-5, atol=1e-5, msg=name)
