"""The packed prefill with shared blocks and the passage key/value cache (models/prefill.py) computes what the
padded prefill computes, and --precision falls back cleanly (models/precision.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lead_passages

from ragline import profile, vocab, yielding
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models import causal, logprobs
from ragline.models import precision as precisions
from ragline.models.generators import CausalGenerator
from ragline.models.prefill import BLOCK, PrefixCache, block_keys, prefill
from ragline.models.thorough import PrefixStates, ScoringMemo, continuation_logits
from ragline.models.tiny import tiny_causal
from ragline.rag import marginal
from ragline.rag.decoding import RowStepper, beam_search, rag_sequence_decode, rag_token_decode, stop_ids

QUESTIONS = ["Who founded it?", "In which year did the events described in the passage take place, and where?"]


def _padded(gen: CausalGenerator) -> CausalGenerator:
    """The same weights with the padded prefill and no cache (the path before the packed one)."""
    return CausalGenerator(gen.model, gen.tokenizer, gen.name, kv_cache_mb=0, packed=False)


@pytest.fixture(scope="module")
def smol(smollm2):
    """The session's SmolLM2 weights behind an empty passage cache of their own."""
    return CausalGenerator(smollm2.model, smollm2.tokenizer, smollm2.name)


@torch.no_grad()
def test_packed_prefill_equals_padded_prefill_and_its_cache_continues_the_same(wiki_docs):
    gen = tiny_causal(seed=3)
    zs = lead_passages(wiki_docs, 4)
    prompts = gen.pair_prompts(QUESTIONS, [zs[:3], zs[1:]])
    lengths = [len(r) for r in gen.prompt_ids(prompts)]
    assert len(set(lengths)) == len(lengths)  # rows of different lengths: the padded path pads them
    gen.kv_cache = None
    packed_state, packed = gen.start(prompts)
    padded_state, padded = _padded(gen).start(prompts)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    # the gathered cache continues exactly as the padded one: a step from each
    rows, tokens = torch.tensor([0, 2, 5, 5]), torch.tensor([11, 12, 13, 14])
    torch.testing.assert_close(gen.advance(packed_state, rows, tokens),
                               _padded(gen).advance(padded_state, rows, tokens), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_rows_split_into_several_packs_give_the_same_states_and_give_way_between_packs(wiki_docs):
    gen = tiny_causal(seed=9)
    zs = lead_passages(wiki_docs, 4)
    rows = gen.prompt_ids(gen.pair_prompts(QUESTIONS, [zs[:3], zs[1:]]))
    one = prefill(gen.model, rows, PrefixCache(2**30))
    gave_way = []
    with yielding.hooked(lambda: gave_way.append(1)):  # a server's batch thread: yield points between packs
        many = prefill(gen.model, rows, None, pack_tokens=2 * max(map(len, rows)))  # three packs, no cache
    assert len(gave_way) == 2
    torch.testing.assert_close(many.logits, one.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(many.attention_mask, one.attention_mask) and torch.equal(many.positions, one.positions)
    for a, b in zip(many.cache.layers, one.cache.layers, strict=True):
        real = one.attention_mask.bool()[:, None, :, None]  # padding holds no state worth comparing
        torch.testing.assert_close(a.keys * real, b.keys * real, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_shared_blocks_are_computed_once_and_cached_passages_not_again(wiki_docs):
    gen = tiny_causal(seed=4)
    zs = lead_passages(wiki_docs, 3)
    prompts = gen.pair_prompts(QUESTIONS, [zs, zs])
    reference = _padded(gen).start(prompts)[1]
    with profile.recording() as cold:
        first = gen.start(prompts)[1]
    # the system prompt and each passage's blocks once, though six rows read them
    assert cold.counts[profile.COMPUTED_TOKENS] < cold.counts[profile.PROMPT_TOKENS] * 0.6
    assert cold.counts[profile.CACHED_TOKENS] == 0 and len(gen.kv_cache) > 0
    with profile.recording() as warm:
        second = gen.start(gen.pair_prompts(["What is it?"], [zs]))[1]
    assert warm.counts[profile.CACHED_TOKENS] > 0
    assert warm.counts[profile.COMPUTED_TOKENS] < 3 * (BLOCK + 20)  # tails only: passage ends and the question
    torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, _padded(gen).start(gen.pair_prompts(["What is it?"], [zs]))[1],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_is_keyed_by_tokens_so_an_edited_passage_is_never_served_stale(wiki_docs):
    gen = tiny_causal(seed=5)
    z = lead_passages(wiki_docs, 1)[0]
    gen.start(gen.pair_prompts(QUESTIONS[:1], [[z]]))
    edited = Passage(z.pid, z.doc_id, z.title, z.text.replace(z.text.split()[3], "zebra"))  # same pid
    got = gen.start(gen.pair_prompts(QUESTIONS[:1], [[edited]]))[1]
    torch.testing.assert_close(got, _padded(gen).start(gen.pair_prompts(QUESTIONS[:1], [[edited]]))[1],
                               atol=1e-5, rtol=1e-5)


def test_scoring_with_the_cache_equals_the_padded_scoring(wiki_docs):
    gen = tiny_causal(seed=6)
    zs = lead_passages(wiki_docs, 3)
    with torch.no_grad():
        gen.start(gen.pair_prompts(QUESTIONS[:1], [zs]))  # warm the cache
        ours, target, mask = gen.target_logprobs(QUESTIONS, [zs[:2], zs[1:]], ["Ada Lovelace", "1843 in London"])
        theirs, _, _ = _padded(gen).target_logprobs(QUESTIONS, [zs[:2], zs[1:]], ["Ada Lovelace", "1843 in London"])
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # answers of different lengths
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    # with gradient (training) the padded path runs, whatever the flag says
    s = gen.score(QUESTIONS[:1], [zs[:2]], ["Ada"])
    assert s.logprobs.requires_grad


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # per-row packed attention; one dense masked pass
@torch.no_grad()
def test_packed_continuation_scoring_equals_the_padded_path_without_computing_padding(smollm2, wiki_docs,
                                                                                     attention):
    model = smollm2.model  # trained weights: positions and masks change what they compute
    if attention == "eager":
        model = copy.deepcopy(model)
        model.set_attn_implementation("eager")
    gen = CausalGenerator(model, smollm2.tokenizer, smollm2.name)
    zs = lead_passages(wiki_docs, 3)
    prompts = gen.pair_prompts(QUESTIONS, [zs, zs])  # six rows, prompts of different lengths
    state, first = gen.start(prompts)
    padded = _padded(gen)
    padded_state, padded_first = padded.start(prompts)
    # a one-token answer, a row read three times, and answers of one row that begin alike
    answers = [[5, 6, 7, 8, 9], [10], [11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21, 22], [13, 14, 15, 30, 31],
               [5, 6, 40]]
    rows = torch.tensor([0, 1, 4, 5, 5, 5, 0])
    # ... as tokens of words (whose keys and values the continuations' attention reads), one per number
    words = list(dict.fromkeys(gen.tokenizer(" Ada Lovelace wrote the first published program for Charles Babbage's"
                                             " Analytical Engine in London in 1843, a century before any computer"
                                             " was built")["input_ids"]))
    word = dict(zip(sorted({x for a in answers for x in a}), words, strict=False))
    assert len(word) == len({x for a in answers for x in a})
    answers = [[word[x] for x in a] for a in answers]
    # fed: each answer but its last token; each distinct (row, prefix) once: row 0 [5..8] holds [5, 6];
    # row 5 [13..18], [20, 21] and, after the shared [13, 14, 15], [30]
    shared = 4 + 0 + 1 + 6 + 2 + 1 + 0
    t = max(map(len, answers))
    targets = torch.tensor([a + [gen.pad_id] * (t - len(a)) for a in answers])  # (5, 7)
    mask = torch.tensor([[i < len(a) for i in range(t)] for a in answers])
    fed = []
    forward = gen.model.forward
    gen.model.forward = lambda *a, **kw: fed.append(kw["input_ids"].numel()) or forward(*a, **kw)
    memo = ScoringMemo()  # what one pass computed, the next reads
    try:
        ours = gen.continuation_logprobs(state, first, rows, targets, mask)
        again = gen.continuation_logprobs(state, first, rows[:1], targets[:1], mask[:1])
        part = gen.continuation_logprobs(state, first, rows[:4], targets[:4], mask[:4], memo)
        rest = gen.continuation_logprobs(state, first, rows, targets, mask, memo)
    finally:
        del gen.model.forward
    # one pass each: no padding, no shared prefix fed twice; after the first four answers (4 + 0 + 1 + 6
    # positions), the memo holds their steps, and the keys and values of their positions: the rest computes
    # [20], [20, 21]; [13, 14, 15] again (its step to 30 is new) and [.., 30]; [5, 6] again (to 40)
    assert fed == [shared, len(answers[0]) - 1, 11, 5]
    torch.testing.assert_close(part, ours[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, ours, atol=1e-5, rtol=1e-5)
    assert gen.scoring_positions(list(zip(rows.tolist(), answers, strict=True)), memo) == 0  # all known now
    assert shared < sum(len(a) - 1 for a in answers)
    pairs = list(zip(rows.tolist(), answers, strict=True))
    assert gen.scoring_positions(pairs) == fed[0]  # what thorough decoding budgets
    assert padded.scoring_positions(pairs) == len(answers) * t
    theirs = padded.continuation_logprobs(padded_state, padded_first, rows, targets, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ours[:1], atol=1e-6, rtol=1e-6)  # the prefill state was left as it was
    # and each equals a pass over the whole (prompt, answer) row
    for r, a, got in zip(rows.tolist(), answers, ours.tolist(), strict=True):
        ids = torch.tensor([gen.prompt_ids([prompts[r]])[0] + a])
        lp = torch.log_softmax(gen.model(input_ids=ids).logits[0, -len(a) - 1 : -1].float(), -1)
        assert got == pytest.approx(float(lp.gather(1, torch.tensor(a)[:, None]).sum()), abs=1e-4)


def test_log_probabilities_a_few_rows_at_a_time_equal_torch_bit_for_bit():
    """log_softmax, picked and top (beam search's best tokens) chunked, against torch on the whole tensor."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(21, 3000) * 4).to(dtype)  # more rows than a chunk, and a ragged last chunk
        assert len(x) > logprobs.ROWS_PER_CHUNK and len(x) % logprobs.ROWS_PER_CHUNK
        assert torch.equal(logprobs.log_softmax(x), torch.log_softmax(x.float(), -1))
        y, t = x.view(3, 7, 3000), torch.randint(0, 3000, (3, 7))
        reference = y.float().gather(-1, t[..., None])[..., 0] - torch.logsumexp(y.float(), -1)
        assert torch.equal(logprobs.picked(y, t), reference)
        rows = torch.tensor([20, 0, 20, 3, 9])  # a row read twice, rows of different chunks
        targets = torch.randint(0, 3000, (5,))
        assert torch.equal(logprobs.picked_at(x, rows, targets), logprobs.picked(x[rows], targets))
        coarse = (x * 8).round() / 8  # many equal logits: ties inside each row's best
        for k in (1, 8, 3000, 4000):  # ... up to the whole vocabulary, and more than it
            values, tokens = logprobs.top(coarse, k)
            full = torch.topk(torch.log_softmax(coarse.float(), -1), min(k, 3000), -1)
            assert torch.equal(values, full.values) and torch.equal(tokens, full.indices)


def test_answers_are_unchanged_token_for_token(smol, wiki_docs):
    zs = lead_passages(wiki_docs, 6)
    questions = ["Who is this passage about?", "What is the first thing the passage says?"]
    passages = [zs[:3], zs[3:]]
    doc = torch.log_softmax(torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]]), -1)
    padded = _padded(smol)
    for run in range(2):  # cold cache, then warm
        for fn, kw in ((rag_sequence_decode, {"beams": 3, "thorough": True}), (rag_token_decode, {"beams": 1}),
                       (rag_token_decode, {"beams": 3})):
            ours = fn(smol, questions, passages, doc, max_new_tokens=12, **kw)
            theirs = fn(padded, questions, passages, doc, max_new_tokens=12, **kw)
            assert [d.tokens for d in ours] == [d.tokens for d in theirs], (run, fn.__name__, kw)
            assert [d.logprob for d in ours] == pytest.approx([d.logprob for d in theirs], abs=1e-3)
    assert smol.kv_cache.hits > 0


def test_prefix_cache_is_bounded_in_bytes_and_forgets_least_recent_first():
    kv = torch.zeros(2, 2, 1, BLOCK, 4)  # 1 KiB
    size = kv.numel() * kv.element_size()
    cache = PrefixCache(3 * size)
    for key in (b"a", b"b", b"c"):
        cache.put(key, kv.clone())
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", kv.clone())
    assert cache.bytes <= 3 * size and len(cache) == 3
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"d") is not None


def test_block_keys_chain_the_whole_prefix():
    a = list(range(3 * BLOCK + 1))
    b = [99] + a[1:]
    assert len(block_keys(a)) == 3
    assert block_keys(a)[:2] == block_keys(a[: 2 * BLOCK + 5])[:2]
    assert not set(block_keys(a)) & set(block_keys(b))  # one token apart at the start: no block shared
    assert len(block_keys(a, keep_last=BLOCK + 1)) == 2  # the scored positions stay out of the blocks


@torch.no_grad()
def test_an_optimiser_step_empties_the_cache(wiki_docs):
    gen = tiny_causal(seed=7)
    zs = lead_passages(wiki_docs, 2)
    gen.start(gen.pair_prompts(QUESTIONS[:1], [zs]))
    assert len(gen.kv_cache) > 0
    next(gen.model.parameters()).add_(0.1)  # what an optimiser step does
    got = gen.start(gen.pair_prompts(QUESTIONS[:1], [zs]))[1]
    torch.testing.assert_close(got, _padded(gen).start(gen.pair_prompts(QUESTIONS[:1], [zs]))[1],
                               atol=1e-5, rtol=1e-5)


def test_precision_without_the_instructions_falls_back_to_fp32_with_a_notice(monkeypatch):
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx2"}))
    cpu = torch.device("cpu")
    assert precisions.resolve(vocab.BF16, "qwen2.5-0.5b", cpu)[0] == vocab.FP32
    chosen, notice = precisions.resolve(vocab.INT8, "qwen2.5-0.5b", cpu)
    assert chosen == vocab.FP32 and "VNNI" in notice and "fp32" in notice
    assert precisions.resolve(vocab.AUTO, "qwen2.5-0.5b", cpu) == (vocab.FP32, None)
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    assert precisions.resolve(vocab.INT8, "qwen2.5-0.5b", cpu) == (vocab.INT8, None)
    monkeypatch.setitem(precisions.CHECKED, "tiny-checked", (vocab.BF16, vocab.INT8))
    assert precisions.resolve(vocab.AUTO, "tiny-checked", cpu) == (vocab.INT8, None)  # bf16 not native here
    assert precisions.resolve(vocab.AUTO, "some/folder", cpu) == (vocab.FP32, None)  # unchecked: fp32
    with pytest.raises(RaglineError, match="--precision"):
        vocab.check_precision("fp8")


@torch.no_grad()
def test_bf16_prefill_cache_and_decoding_match_the_padded_bf16_path(wiki_docs):
    """What --precision bf16 (auto's choice on a CPU with AVX512-BF16) runs: the packed prefill and the passage
    cache in bf16 give the padded bf16 path's log-probs (to bf16's rounding), the cache holds bf16 states (half
    fp32's bytes), and RAG-Sequence and RAG-Token decode whole, the seq2seq generator too."""
    from conftest import tiny_bart_config, word_tokenizer
    from transformers import BartForConditionalGeneration

    from ragline.models.generators import Seq2SeqGenerator

    gen = tiny_causal(seed=10)
    zs = lead_passages(wiki_docs, 3)
    prompts = gen.pair_prompts(QUESTIONS, [zs[:2], zs[1:]])
    gen.start(prompts)
    fp32_bytes = gen.kv_cache.bytes
    gen.model = precisions.apply(gen.model, vocab.BF16)
    gen.kv_cache.clear()
    cold = gen.start(prompts)[1]
    assert gen.kv_cache.bytes == fp32_bytes // 2
    assert all(kv.dtype == torch.bfloat16 for kv in gen.kv_cache._blocks.values())
    warm = gen.start(prompts)[1]
    padded = _padded(gen).start(prompts)[1]
    assert cold.dtype == torch.float32 and torch.isfinite(cold).all()
    torch.testing.assert_close(warm, cold, atol=0, rtol=0)  # the cache returns what it stored
    torch.testing.assert_close(cold, padded, atol=3e-2, rtol=0)  # bf16 keeps 8 bits of mantissa
    doc = torch.log_softmax(torch.tensor([[0.5, 0.0], [0.3, 0.0]]), -1)
    for fn, kw in ((rag_sequence_decode, {"beams": 2, "thorough": True}), (rag_token_decode, {"beams": 1})):
        out = fn(gen, QUESTIONS, [zs[:2], zs[1:]], doc, max_new_tokens=4, **kw)
        assert all(d.tokens and torch.isfinite(torch.tensor(d.logprob)) for d in out), fn.__name__

    words = sorted({w for z in zs for w in z.text.split()} | {w for q in QUESTIONS for w in q.split()})
    tok = word_tokenizer(words)
    bart = Seq2SeqGenerator(BartForConditionalGeneration(tiny_bart_config(len(tok))).eval(), tok,
                            "tiny-bart")
    answers = [" ".join(words[:3]), words[3]]
    reference = bart.target_logprobs(QUESTIONS, [zs[:2], zs[1:]], answers)[0]  # (B, K, T)
    bart.model = precisions.apply(bart.model, vocab.BF16)
    assert next(bart.model.parameters()).dtype == torch.bfloat16
    for fn, kw in ((rag_sequence_decode, {"beams": 2, "thorough": True}), (rag_token_decode, {"beams": 2})):
        out = fn(bart, QUESTIONS, [zs[:2], zs[1:]], doc, max_new_tokens=4, **kw)
        assert all(d.tokens and torch.isfinite(torch.tensor(d.logprob)) for d in out), fn.__name__
    torch.testing.assert_close(bart.target_logprobs(QUESTIONS, [zs[:2], zs[1:]], answers)[0], reference,
                               atol=1e-2, rtol=0)  # the same answers' log-probs, to bf16's rounding


@torch.no_grad()
def test_int8_keeps_the_output_layer_and_feed_forward_outputs_in_fp32_and_decodes(wiki_docs):
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no fbgemm int8 engine")
    gen = tiny_causal(seed=8)
    gen.model = precisions.apply(gen.model, vocab.INT8)
    layer = gen.model.model.layers[0]
    assert type(gen.model.get_output_embeddings()) is torch.nn.Linear
    assert type(layer.mlp.down_proj) is torch.nn.Linear  # reads the activation outliers: fp32
    assert all("quantized" in type(m).__module__ for m in (layer.mlp.up_proj, layer.mlp.gate_proj,
                                                            layer.self_attn.q_proj, layer.self_attn.o_proj))
    zs = lead_passages(wiki_docs, 2)
    out = rag_token_decode(gen, QUESTIONS[:1], [zs], torch.zeros(1, 2), beams=2, max_new_tokens=3)
    assert len(out[0].tokens) >= 1 and gen.vocab_size == len(gen.tokenizer)


@torch.no_grad()
def test_greedy_rag_token_keeps_each_passages_token_logprobs_as_a_scoring_pass_computes_them(smol, wiki_docs):
    zs = lead_passages(wiki_docs, 6)
    questions = ["Who is this passage about?", "What is the first thing the passage says?"]
    passages = [zs[:3], zs[3:]]
    doc = torch.log_softmax(torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]]), -1)
    decoded = rag_token_decode(smol, questions, passages, doc, beams=1, max_new_tokens=12)
    for q, z, d in zip(questions, passages, decoded, strict=True):
        scored, _, _ = _padded(smol).target_logprobs([q], [z], [d.tokens])  # (1, K, T)
        assert d.token_logprobs.shape == scored[0].shape and len(d.tokens) > 1
        torch.testing.assert_close(d.token_logprobs, scored[0], atol=1e-3, rtol=1e-4)


def test_cli_precision_falls_back_with_a_notice_and_eval_records_what_ran(tmp_path, small_index, monkeypatch):
    import json

    from conftest import run_cli, run_cli_streams

    from ragline.models.tiny import save_tiny_causal

    folder = save_tiny_causal(tmp_path / "tiny")
    monkeypatch.setattr(precisions, "cpu_flags", lambda: frozenset({"avx2"}))  # a CPU without bf16 or VNNI
    out, notice = run_cli_streams("ask", "Who wrote Candide?", "--index", small_index, "--generator", folder,
                                  "-k", 2, "--max-new-tokens", 2, "--precision", "bf16", "--json")
    assert "--precision bf16: this CPU has no bf16 instructions" in notice and "answering in fp32" in notice
    assert json.loads(out)["text"] is not None  # stdout holds the JSON alone
    out = run_cli("eval", "--task", "fanoutqa-dev", "--limit", 1, "--index", small_index, "--generator", folder,
                  "-k", 2, "--max-new-tokens", 2, "--precision", "int8", "--out", tmp_path / "run")
    said = " ".join(out.split())  # the log wraps long lines
    assert "--precision int8: this CPU has no int8 dot-product instructions (VNNI); answering in fp32" in said
    identity = json.loads((tmp_path / "run" / "config.json").read_text())
    assert identity["precision"] == "fp32"  # what ran, not what was asked


@pytest.mark.parametrize("n_best", [1, 3])
@torch.no_grad()
def test_packed_thorough_scoring_shares_positions_and_equals_scoring_every_pair(smol, wiki_docs, n_best):
    """Thorough decoding on the packed path: candidates that begin alike are scored on shared positions, in
    a pass and across passes (what one computed, the next reads), and the branch and bound reads the known
    prefixes' log-probabilities. Its answers and their scores must equal brute force: every candidate of the
    beams scored under every passage by a full pass over (prompt, candidate)."""
    zs = lead_passages(wiki_docs, 6)
    questions = ["Who is this passage about?", "Where and when was this born?"]
    passages = [zs[:3], zs[3:]]
    doc = torch.log_softmax(torch.tensor([[1.0, 0.6, 0.2], [0.3, 0.9, 0.5]]), -1)
    fed, computed = [], []
    original = causal.continuation_logits

    def counting(model, cache, mask, positions, rows, tokens, states=None):
        out = original(model, cache, mask, positions, rows, tokens, states)
        computed.append(len(out.logits))
        return out

    scoring = smol.continuation_logprobs
    smol.continuation_logprobs = lambda state, first, rows, targets, mask, *a: fed.append(
        int((mask.sum(1) - 1).sum())) or scoring(state, first, rows, targets, mask, *a)
    causal.continuation_logits = counting
    try:
        got = rag_sequence_decode(smol, questions, passages, doc, beams=3, max_new_tokens=8, n_best=n_best)
    finally:
        causal.continuation_logits = original
        del smol.continuation_logprobs
    assert 0 < sum(computed) < sum(fed)  # positions shared: fewer computed than the pairs' tokens
    for q, answer in enumerate(got):
        beams = [{tuple(y) for y, _ in rag_sequence_decode(smol, questions[q : q + 1], [[z]], doc[q : q + 1, :1],
                                                            beams=3, max_new_tokens=8, thorough=False,
                                                            n_best=3)[0].alternatives} for z in passages[q]]
        cands = sorted(set().union(*beams))
        lp, _, _ = _padded(smol).target_logprobs([questions[q]] * len(cands), [passages[q]] * len(cands),
                                                 [list(y) for y in cands])  # (C, K, T)
        exact = marginal.marginalize(doc[q].expand(len(cands), -1), lp.sum(-1))  # (C,)
        order = sorted(range(len(cands)), key=lambda c: -float(exact[c]))[:n_best]
        assert [tuple(y) for y, _ in answer.alternatives] == [cands[c] for c in order]
        torch.testing.assert_close(torch.tensor([v for _, v in answer.alternatives]), exact[order], atol=1e-4,
                                   rtol=1e-4)


@torch.no_grad()
def test_continuations_read_the_positions_earlier_passes_computed(wiki_docs):
    """Positions held from earlier passes (two passes, two rows) are read in place of computing them: the
    logits equal a pass that computes every position, and only the asked and unheld positions are computed."""
    gen = tiny_causal(seed=8)  # random weights: attention spread over every key, a wrong one shows
    zs = lead_passages(wiki_docs, 3)
    prompts = gen.pair_prompts(QUESTIONS[:1], [zs])
    state, _ = gen.start(prompts)
    states = PrefixStates()

    def run(rows, tokens, held=None):
        return continuation_logits(gen.model, state.cache, state.attention_mask, state.positions, rows, tokens, held)

    run([0, 2], [[101, 102, 103], [201, 202]], states)  # first pass: row 0's [101..103], row 2's [201, 202]
    run([2], [[201, 202, 203, 204]], states)  # second: row 2's [.., 203, 204], reading [201], [201, 202]
    assert len(states) == 3 + 2 + 2
    rows, tokens = [2, 0, 2, 1], [[201, 202, 203, 204, 205], [101, 102, 103, 104], [201, 202, 299], [301]]
    got, full = run(rows, tokens, states), run(rows, tokens)
    assert len(got.logits) == 4  # the asked ones only: [.., 205], [.., 104], [.., 299], [301]; the rest read
    torch.testing.assert_close(got.logits[got.where], full.logits[full.where], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_the_steps_beam_search_records_are_the_models_log_probabilities(wiki_docs):
    """Beam search records every step it ranked after a running beam (what thorough decoding's scoring then
    reads instead of computing): each equals the log-probability of a full pass over (prompt, tokens)."""
    gen = tiny_causal(seed=11)
    zs = lead_passages(wiki_docs, 2)
    prompts = gen.pair_prompts(QUESTIONS[:1], [zs])
    record: dict = {}
    beam_search(RowStepper(gen, prompts, 2, 1, 3, None), 2, 3, stop_ids(gen), 6, record=record)
    assert {len(toks) for _, toks in record} == set(range(2, 7))  # after every step but the prompt's
    assert {g for g, _ in record} == {0, 1}
    for (g, toks), v in list(record.items())[:: max(1, len(record) // 25)]:
        ids = torch.tensor([gen.prompt_ids([prompts[g]])[0] + list(toks)])
        full = torch.log_softmax(gen.model(input_ids=ids).logits[0, -2].float(), -1)[toks[-1]]
        assert v == pytest.approx(float(full), abs=1e-4)
