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


def _loss_and_grads(rag, model: str, packed: bool, checkpointed: bool = False
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    from ragline.models.checkpointing import checkpointed_layers

    rag.generator.packed = packed
    parts = {"g": rag.generator.model, "q": rag.retriever.encoder.model}
    for m in parts.values():
        m.eval()
        m.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.requires_grad_(True)
    with checkpointed_layers(rag.generator.model, checkpointed):  # as the trainer's loss enters it: after eval()
        loss = rag.likelihood(QUESTIONS, ANSWERS, model=model).loss.float().mean()
    loss.backward()  # the checkpointed layers recompute here, after the block
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
    _assert_same(padded_loss, padded, packed_loss, packed)


def _assert_same(padded_loss: float, padded: dict, packed_loss: float, packed: dict) -> None:
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5, abs=1e-5)
    assert padded.keys() == packed.keys() and any(k.startswith("q.") for k in padded)
    assert any(k.startswith("g.") for k in padded)
    for name, g in padded.items():
        torch.testing.assert_close(packed[name], g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_seq2seq_packed_encoder_loss_and_gradients_equal_the_padded_ones(small_index, model, monkeypatch):
    """BART's encoder over packed rows (models/packed_encoder.py): rows of different lengths, no padding
    computed, the same loss and gradients as the padded pass."""
    from ragline.models import packed_encoder

    rag = _bart_rag(small_index)
    calls = []
    real = packed_encoder.encode_packed

    def spy(m, rows):
        calls.append([len(r) for r in rows])
        return real(m, rows)

    padded_loss, padded = _loss_and_grads(rag, model, packed=False)
    assert not calls
    monkeypatch.setattr(packed_encoder, "encode_packed", spy)
    packed_loss, packed = _loss_and_grads(rag, model, packed=True)
    assert calls and all(len(set(lengths)) > 1 for lengths in calls)  # ran, over rows of unequal lengths
    _assert_same(padded_loss, padded, packed_loss, packed)
    table = rag.generator.model.get_encoder().embed_positions
    assert "forward" not in table.__dict__  # the position table given back


@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_seq2seq_answers_from_the_packed_encoder_equal_the_padded_ones(small_index, model, monkeypatch):
    """Answering starts from the same packed encoder: the first step's log-probabilities, the decoded tokens
    and their log p(y|x) equal the padded pass's (fp32), over rows of unequal lengths."""
    from ragline.models import packed_encoder

    rag = _bart_rag(small_index)
    gen = rag.generator
    prompts = [gen.prompt(QUESTIONS[1], p) for p in rag.retriever.search(QUESTIONS[1:], 3)[0]]
    gen.packed = False
    with torch.no_grad():
        padded_first = gen.start(prompts)[1]
    padded = rag.answer(QUESTIONS, model=model, max_new_tokens=6, beams=2)
    calls = []
    real = packed_encoder.encode_packed

    def spy(m, rows):
        calls.append([len(r) for r in rows])
        return real(m, rows)

    monkeypatch.setattr(packed_encoder, "encode_packed", spy)
    gen.packed = True
    with torch.no_grad():
        packed_first = gen.start(prompts)[1]
    packed = rag.answer(QUESTIONS, model=model, max_new_tokens=6, beams=2)
    assert calls and all(len(set(lengths)) > 1 for lengths in calls)  # ran, over rows of unequal lengths
    torch.testing.assert_close(packed_first, padded_first, rtol=1e-5, atol=1e-5)
    assert [a.tokens for a in packed] == [a.tokens for a in padded]
    assert [a.logprob for a in packed] == pytest.approx([a.logprob for a in padded], abs=1e-4)


def test_seq2seq_without_learned_positions_stays_padded():
    """T5 (relative positions): no packed encoder; its answers are scored by the padded pass."""
    from conftest import word_tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    from ragline.models import packed_encoder
    from ragline.models.generators import Seq2SeqGenerator

    tok = word_tokenizer(["a", "b"])
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0)).eval()
    assert not packed_encoder.supports(t5)
    assert not Seq2SeqGenerator(t5, tok, "tiny-t5")._packed()


def _bart_rag(small_index):
    from conftest import tiny_bart_config, word_tokenizer
    from transformers import BartForConditionalGeneration

    from ragline.models.generators import Seq2SeqGenerator
    from ragline.rag.model import RagModel
    from ragline.retriever import Retriever

    tok = word_tokenizer(sorted({w for q in QUESTIONS + ANSWERS for w in q.split()}))  # passages' words: <unk>
    torch.manual_seed(1)
    bart = BartForConditionalGeneration(tiny_bart_config(len(tok), max_positions=512)).eval()
    return RagModel(Retriever(small_index), Seq2SeqGenerator(bart, tok, "tiny-bart"), k=3)


@pytest.mark.parametrize("generator", ["causal", "seq2seq"])
@pytest.mark.parametrize("model", ["rag-sequence", "rag-token"])
def test_activation_checkpointing_keeps_the_loss_and_gradients(rag, small_index, generator, model, monkeypatch):
    """``--activation-checkpointing``: every layer of the generator recomputed in the backward pass, the same
    loss and gradients (fp32), the layers' flags restored after; the packed causal pass keeps no cache."""
    from ragline.models import checkpointing

    rag = rag if generator == "causal" else _bart_rag(small_index)
    plain_loss, plain = _loss_and_grads(rag, model, packed=True)
    calls = []
    real = checkpointing.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", spy)
    layers = checkpointing.checkpointable_layers(rag.generator.model)
    ckpt_loss, ckpt = _loss_and_grads(rag, model, packed=True, checkpointed=True)
    n = len(layers)
    assert n >= 2 and len(calls) >= n and {id(c.args[0]) for c in calls} == {id(m) for m in layers}
    assert all("forward" not in m.__dict__ and not m.training for m in layers)  # unwrapped after, still eval
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6, abs=1e-6)
    assert plain.keys() == ckpt.keys() and any(k.startswith("g.") for k in plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)
    with checkpointing.checkpointed_layers(rag.generator.model, enabled=False) as n:
        assert n == 0 and not any("forward" in m.__dict__ for m in layers)


def test_checkpointing_wraps_a_forward_set_on_the_layer_and_gives_it_back():
    """A hook library's instance-level ``forward`` (accelerate's, say) runs inside the checkpoint and is
    restored after, not deleted."""
    from ragline.models.checkpointing import checkpointable_layers, checkpointed_layers

    model = tiny_generator().model
    layer = checkpointable_layers(model)[0]
    seen = []
    own = layer.forward

    def hooked(*args, **kwargs):
        seen.append(1)
        return own(*args, **kwargs)

    layer.forward = hooked
    ids = torch.tensor([[5, 6, 7, 8]])
    with checkpointed_layers(model):
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert len(seen) == 2  # the forward pass, and its recomputation in backward
    assert layer.__dict__["forward"] is hooked
    del layer.forward
