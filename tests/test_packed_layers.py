"""Inference kernels: oneDNN-packed linear layers (models/packed_linear.py) compute what ``nn.Linear`` computes,
follow their weights, and stay out of training; the packed prefill's per-row attention
(models/packed_attention.py) computes each row on its own keys and equals the dense masked pass."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import lead_passages

from ragline.models import packed_attention
from ragline.models import precision as precisions
from ragline.models import prefill as prefill_module
from ragline.models.generators import CausalGenerator
from ragline.models.loading import load_generator
from ragline.models.packed_linear import PackedLinear, available, pack_linears
from ragline.models.prefill import PrefixCache, prefill
from ragline.models.tiny import save_tiny_causal, tiny_causal
from ragline.rag.decoding import rag_sequence_decode, rag_token_decode

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN packed linear")


def _layers(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.SiLU(), torch.nn.Linear(96, 40, bias=False))


def _packed(seed: int = 0) -> torch.nn.Sequential:
    net = _layers(seed)
    pack_linears(net)
    return net


def _plain(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.silu(torch.nn.functional.linear(x, net[0].weight, net[0].bias))
    return torch.nn.functional.linear(h, net[2].weight)


@torch.no_grad()
def test_packed_linear_equals_linear_bit_for_bit_in_bf16_and_to_rounding_in_fp32():
    for dtype in (torch.bfloat16, torch.float32):
        net = _layers().to(dtype)
        assert pack_linears(net) == 2 and all(type(m) is PackedLinear for m in (net[0], net[2]))
        for shape in ((1, 48), (7, 48), (2, 5, 48)):  # a decoding step, a few rows, (batch, tokens, features)
            x = torch.randn(shape).to(dtype)
            got, want = net(x), _plain(net, x)
            assert got.shape == want.shape and got.dtype == dtype
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert net[0]._packed is not None  # the laid-out copy was made and used


@torch.no_grad()
def test_a_changed_weight_is_laid_out_again():
    net, x = _packed(), torch.randn(3, 48)
    before = net(x)
    net[0].weight.add_(0.5)  # an optimiser step, in place
    torch.testing.assert_close(net(x), _plain(net, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(x), before)
    net.load_state_dict(_layers(seed=1).state_dict())  # copied into the same tensors
    torch.testing.assert_close(net(x), _plain(net, x), atol=1e-5, rtol=1e-5)
    net.to(torch.bfloat16)  # new tensors, new dtype
    xb = x.to(torch.bfloat16)
    assert torch.equal(net(xb), _plain(net, xb))


def test_training_runs_plain_linear_and_gets_the_same_gradients():
    net, ref = _packed(), _layers()
    x = torch.randn(4, 48)
    with torch.no_grad():
        net(x)  # a packed copy exists; training must not read it
    net(x).square().sum().backward()
    _plain(ref, x).square().sum().backward()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_a_layer_onednn_refuses_stays_plain_linear(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("this oneDNN has no such layout")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    net, x = _packed(), torch.randn(3, 48)
    with torch.no_grad():
        got = net(x)
    assert net[0]._unsupported and net[0]._packed is None
    assert torch.equal(got, _plain(net, x))


@torch.no_grad()
def test_autocast_keeps_computing_in_its_own_dtype():
    net, x = _packed(), torch.randn(3, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = net(x), _plain(net, x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@torch.no_grad()
def test_packed_layers_copy_pickle_and_save_like_linear():
    net, x = _packed(), torch.randn(2, 48)
    y = net(x)
    twin = copy.deepcopy(net)  # the packed copy stays behind and is made again
    assert "_packed" not in twin[0].__dict__ and torch.equal(twin(x), y)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf)) == set(_layers().state_dict())  # the same keys: folders load anywhere
    quantised = precisions.apply(_layers(), "int8") if "fbgemm" in torch.backends.quantized.supported_engines \
        else None
    if quantised is not None:  # dynamic int8 layers are not plain Linear: left alone; fp32 ones are packed
        assert pack_linears(quantised) == 0


@torch.no_grad()
def test_load_generator_packs_the_generator_and_answers_as_the_plain_one(tmp_path, wiki_docs):
    folder = save_tiny_causal(tmp_path / "tiny", seed=2)
    loaded = load_generator(str(folder))
    packed = loaded.generator
    assert all(type(m) is PackedLinear for m in packed.model.modules() if isinstance(m, torch.nn.Linear))
    plain = tiny_causal(seed=2)
    zs = lead_passages(wiki_docs, 4)
    questions, passages = ["Who founded it?", "Where is it?"], [zs[:2], zs[2:]]
    doc = torch.log_softmax(torch.tensor([[0.4, 0.0], [0.0, 0.3]]), -1)
    for fn, kw in ((rag_sequence_decode, {"beams": 3}), (rag_token_decode, {"beams": 1})):
        ours = fn(packed, questions, passages, doc, max_new_tokens=6, **kw)
        theirs = fn(plain, questions, passages, doc, max_new_tokens=6, **kw)
        assert [d.tokens for d in ours] == [d.tokens for d in theirs]
        assert [d.logprob for d in ours] == pytest.approx([d.logprob for d in theirs], abs=1e-4)


def _rows(gen: CausalGenerator, wiki_docs) -> list[list[int]]:
    """Rows that share the system prompt and passages, and differ in length and question."""
    zs = lead_passages(wiki_docs, 3)
    return gen.prompt_ids(gen.pair_prompts(["Who founded it?", "When did it happen, and where exactly?"],
                                           [zs, zs[::-1]]))


@torch.no_grad()
def test_per_row_attention_reads_each_rows_keys_only_and_equals_the_dense_masked_pass(wiki_docs, monkeypatch):
    gen = tiny_causal(seed=11)
    rows = _rows(gen, wiki_docs)
    calls: list[tuple[int, int]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    cache = PrefixCache(2**30)
    cold = prefill(gen.model, rows[:3], cache)  # fills the cache: the next pass reads these rows' blocks from it
    assert gen.model.config._attn_implementation == packed_attention.IMPLEMENTATION
    layers = gen.model.config.num_hidden_layers
    assert len(calls) == 3 * layers  # one attention per row and layer, not one over the whole pack
    packed_len = sum(len(r) for r in rows[:3])
    assert max(k for _, k in calls) <= max(map(len, rows[:3])) < packed_len  # a row reads its own keys only
    calls.clear()
    warm = prefill(gen.model, rows, cache, keep_last=[1, 3, 1, 2, 1, 1])  # cached blocks and a pack's own
    assert len(calls) == len(rows) * layers
    monkeypatch.setattr(prefill_module.packed_attention, "enable", lambda model: False)  # the dense masked pass
    dense_cold = prefill(gen.model, rows[:3], None)
    dense_warm = prefill(gen.model, rows, None, keep_last=[1, 3, 1, 2, 1, 1])
    assert len(calls) == len(rows) * layers + 2 * layers  # the dense passes: one attention per layer
    torch.testing.assert_close(cold.logits, dense_cold.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(warm.logits, dense_warm.logits, atol=1e-5, rtol=1e-5)
    real = warm.attention_mask.bool()[:, None, :, None]
    for a, b in zip(warm.cache.layers, dense_warm.cache.layers, strict=True):
        torch.testing.assert_close(a.keys * real, b.keys * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values * real, b.values * real, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_calls_without_a_layout_are_transformers_sdpa_unchanged(wiki_docs):
    gen = tiny_causal(seed=12)
    rows = _rows(gen, wiki_docs)
    prefill(gen.model, rows[:1], None)  # switches the model to the per-row attention
    assert gen.model.config._attn_implementation == packed_attention.IMPLEMENTATION
    ids = torch.tensor(rows[1])[None]
    switched = gen.model(input_ids=ids).logits
    gen.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(gen.model(input_ids=ids).logits, switched, atol=0, rtol=0)
    eager = tiny_causal(seed=12)
    eager.model.set_attn_implementation("eager")
    assert not packed_attention.enable(eager.model)  # a model on another implementation is left as it is
    assert eager.model.config._attn_implementation == "eager"
