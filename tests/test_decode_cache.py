"""The decoding cache written in place (models/decode_cache.py) gives the concatenated cache's log-probs bit
for bit, through every kind of step beam search takes, without copying the prompts' columns where the rows
keep their prompts."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lead_passages

from ragline.models import causal
from ragline.models import decode_cache as dc
from ragline.models.generators import CausalGenerator
from ragline.rag.decoding import rag_sequence_decode, rag_token_decode

QUESTIONS = ["Who founded it?", "In which year did the events described in the passage take place, and where?"]

# (parents, tokens) of each step over 3 prompts: the first step copies each prompt for 2 beams; then beams
# swap within their prompt, rows continue one for one, a prompt's rows leave, and the rest swap again
STEPS = [([0, 0, 1, 1, 2, 2], [11, 12, 13, 14, 15, 16]),
         ([1, 0, 3, 2, 4, 5], [21, 22, 23, 24, 25, 26]),
         ([0, 1, 2, 3, 4, 5], [31, 32, 33, 34, 35, 36]),
         ([1, 1, 2, 3, 5, 4], [41, 42, 43, 44, 45, 46]),
         ([0, 1, 4, 5], [51, 52, 53, 54]),
         ([1, 0, 3, 3], [61, 62, 63, 64]),
         ([2, 3, 0, 1], [71, 72, 73, 74])]  # rows swap across prompts: copied whole


def _steps(gen: CausalGenerator, prompts: list[str]) -> tuple[list[torch.Tensor], object]:
    state, first = gen.start(prompts)
    out = [first]
    for parents, tokens in STEPS:
        out.append(gen.advance(state, torch.tensor(parents), torch.tensor(tokens)))
    return out, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_steps_in_place_equal_the_concatenated_cache_bit_for_bit(smollm2, wiki_docs, monkeypatch, dtype):
    model = smollm2.model if dtype == torch.float32 else copy.deepcopy(smollm2.model).to(dtype)
    gen = CausalGenerator(model, smollm2.tokenizer, smollm2.name, kv_cache_mb=0)
    zs = lead_passages(wiki_docs, 3)
    prompts = gen.pair_prompts(QUESTIONS[:1], [zs])
    assert len({len(r) for r in gen.prompt_ids(prompts)}) == 3  # left padding differs row to row
    monkeypatch.setattr(dc, "RESERVE", 3)  # 3 free columns: the buffers grow on the way
    ours, state = _steps(gen, prompts)
    assert dc.is_decode_cache(state.cache)
    with monkeypatch.context() as m:
        m.setattr(causal, "decode_cache", lambda cache, rows: None)  # transformers' cache: cat, index_select
        theirs, plain = _steps(gen, prompts)
    assert not dc.is_decode_cache(plain.cache)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), step
    for mine, ref in zip(state.cache.layers, plain.cache.layers, strict=True):
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)


@torch.no_grad()
def test_beams_that_keep_their_prompts_move_only_their_generated_columns(smollm2, wiki_docs):
    gen = CausalGenerator(smollm2.model, smollm2.tokenizer, smollm2.name, kv_cache_mb=0)
    zs = lead_passages(wiki_docs, 2)
    state, _ = gen.start(gen.pair_prompts(QUESTIONS[:1], [zs]))
    prefilled = state.cache.layers[0]
    prefill_keys = prefilled.keys.clone()
    gen.advance(state, torch.tensor([0, 0, 1, 1]), torch.tensor([5, 6, 7, 8]))
    layer = state.cache.layers[0]
    assert layer is not prefilled and isinstance(layer, dc.DecodeLayer)
    prompt = layer.prompt
    buffer = layer._k.data_ptr()
    before = layer.keys.clone()
    gen.advance(state, torch.tensor([1, 0, 3, 2]), torch.tensor([9, 9, 9, 9]))
    assert layer._k.data_ptr() == buffer  # written in place: no new buffer, no copy of the prompts
    after = layer.keys
    assert torch.equal(after[:, :, :prompt], before[:, :, :prompt])
    assert torch.equal(after[:, :, prompt], before[[1, 0, 3, 2], :, prompt])  # the beams' own columns moved
    gen.advance(state, torch.tensor([0, 1]), torch.tensor([3, 3]))  # the second prompt's rows leave: copied
    assert state.cache.layers[0]._k.data_ptr() != buffer and state.cache.layers[0].keys.shape[0] == 2
    assert torch.equal(prefilled.keys, prefill_keys)  # the prefill's cache (thorough scoring reads it) as it was


def test_decoded_answers_are_those_of_the_concatenated_cache(smollm2, wiki_docs, monkeypatch):
    gen = CausalGenerator(smollm2.model, smollm2.tokenizer, smollm2.name)
    zs = lead_passages(wiki_docs, 6)
    passages = [zs[:3], zs[3:]]
    doc = torch.log_softmax(torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]]), -1)
    runs = ((rag_sequence_decode, {"beams": 3, "thorough": True}), (rag_token_decode, {"beams": 3}),
            (rag_token_decode, {"beams": 1}))
    ours = [[(d.tokens, d.logprob) for d in fn(gen, QUESTIONS, passages, doc, max_new_tokens=10, **kw)]
            for fn, kw in runs]
    monkeypatch.setattr(causal, "decode_cache", lambda cache, rows: None)
    theirs = [[(d.tokens, d.logprob) for d in fn(gen, QUESTIONS, passages, doc, max_new_tokens=10, **kw)]
              for fn, kw in runs]
    assert ours == theirs
