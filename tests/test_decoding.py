"""Decoding checks beyond the HF comparison: fast vs thorough, plain beam search vs HF generate, and the
bundled causal generator decoding with its KV cache."""

import pytest
import torch
from test_hf_reference import _batch, _generating_bart, _strip, tiny  # noqa: F401 - fixture

from ragline.corpus.passages import Passage
from ragline.models.thorough import PackedPass, PaddedPass, scoring_passes
from ragline.rag import marginal
from ragline.rag.decoding import (
    RowStepper,
    beam_search,
    rag_sequence_decode,
    rag_token_decode,
    stop_ids,
)


@pytest.mark.parametrize("model", [(0.5, 0, 0.0), (1.0, 4, 0.0)])
def test_fast_equals_thorough_when_every_beam_holds_the_same_hypotheses(tiny, model):  # noqa: F811
    bart = _generating_bart(tiny, *model)
    gen, questions, passages, _, doc_scores = _batch(tiny[0], bart)
    same = [[zs[0]] * 3 for zs in passages]  # one passage three times: identical beams
    doc = marginal.doc_log_probs(doc_scores)
    fast = rag_sequence_decode(gen, questions, same, doc, beams=3, max_new_tokens=10, thorough=False)
    thorough = rag_sequence_decode(gen, questions, same, doc, beams=3, max_new_tokens=10, thorough=True)
    assert [d.tokens for d in fast] == [d.tokens for d in thorough]
    for f, t in zip(fast, thorough, strict=True):
        assert f.logprob == pytest.approx(t.logprob, abs=1e-5)
    # with different passages fast decoding drops the unscored pairs: never a higher likelihood
    fast = rag_sequence_decode(gen, questions, passages, doc, beams=3, max_new_tokens=10, thorough=False)
    thorough = rag_sequence_decode(gen, questions, passages, doc, beams=3, max_new_tokens=10, thorough=True)
    assert all(t.logprob >= f.logprob - 1e-5 for f, t in zip(fast, thorough, strict=True))


@pytest.mark.parametrize("model", [(0.5, 0, 0.0), (0.5, 4, 4.0), (1.0, 4, 0.0)])
def test_plain_beam_search_equals_hugging_face_generate(tiny, model):  # noqa: F811
    bart = _generating_bart(tiny, *model)
    gen, questions, passages, _, _ = _batch(tiny[0], bart)
    prompts = gen.pair_prompts(questions, passages)
    enc = gen.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf = bart.generate(enc["input_ids"], attention_mask=enc["attention_mask"], num_beams=4,
                           num_return_sequences=4, max_length=11, min_length=0, no_repeat_ngram_size=0,
                           forced_bos_token_id=None, forced_eos_token_id=None, length_penalty=1.0,
                           early_stopping=False, output_scores=True, return_dict_in_generate=True)
    step = RowStepper(gen, prompts, len(prompts), 1, 4, lambda logp, _: logp[:, :, 0])
    ours = beam_search(step, len(prompts), 4, stop_ids(gen), 10, length_penalty=1.0)  # HF's default
    assert [[h.tokens for h in hs] for hs in ours] == [[_strip(s, gen.pad_id) for s in hf.sequences[i * 4 : i * 4 + 4]]
                                                       for i in range(len(prompts))]
    torch.testing.assert_close(torch.tensor([h.score for hs in ours for h in hs]), hf.sequences_scores,
                               atol=1e-4, rtol=1e-4)


def test_beams_ranked_by_the_step_equal_beams_ranked_over_all_log_probabilities(smollm2, wiki_docs):
    """RAG-Sequence's steps return each beam's best tokens only (logprobs.top): the same hypotheses, scores
    and answers as ranking the full log-probabilities, with a batch larger than a chunk of rows."""
    from conftest import lead_passages

    from ragline.models.generators import CausalGenerator

    gen = CausalGenerator(smollm2.model, smollm2.tokenizer, smollm2.name, kv_cache_mb=0)  # each run computes all
    zs = lead_passages(wiki_docs, 6)
    questions = ["Who is this passage about?", "What is the first thing the passage says?"]
    passages = [zs[:3], zs[3:]]
    prompts = gen.pair_prompts(questions, passages)
    calls = []
    ranked = RowStepper(gen, prompts, len(prompts), 1, 4, None)
    advance = gen.advance
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "advance", lambda *a: calls.append(len(a)) or advance(*a))
        ours = beam_search(ranked, len(prompts), 4, stop_ids(gen), 10)
    assert calls and all(n == 4 for n in calls)  # every step after the prompts asked for its top only
    full = beam_search(RowStepper(gen, prompts, len(prompts), 1, 4, lambda logp, _: logp[:, :, 0]),
                       len(prompts), 4, stop_ids(gen), 10)
    assert [[(h.tokens, h.logprob, h.score) for h in hs] for hs in ours] == \
        [[(h.tokens, h.logprob, h.score) for h in hs] for hs in full]
    doc = torch.log_softmax(torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0]]), -1)
    with pytest.MonkeyPatch.context() as m:  # rag_sequence_decode's stepper without the ranked steps
        m.setattr(RowStepper, "ranks", property(lambda self: False, lambda self, v: None), raising=False)
        plain = rag_sequence_decode(gen, questions, passages, doc, beams=4, max_new_tokens=10)
    assert [(d.tokens, d.logprob) for d in rag_sequence_decode(gen, questions, passages, doc, beams=4,
                                                               max_new_tokens=10)] == \
        [(d.tokens, d.logprob) for d in plain]


def test_rag_token_with_one_passage_is_plain_decoding(tiny):  # noqa: F811
    bart = _generating_bart(tiny, 1.0, 4, 0.0)
    gen, questions, passages, _, _ = _batch(tiny[0], bart)
    one = [[zs[0]] for zs in passages]
    rag = rag_token_decode(gen, questions, one, torch.zeros(2, 1), beams=4, max_new_tokens=10)
    seq = rag_sequence_decode(gen, questions, one, torch.zeros(2, 1), beams=4, max_new_tokens=10)
    assert [d.tokens for d in rag] == [d.tokens for d in seq]


def test_causal_generator_decodes_an_answer_from_the_passage():
    from ragline.models.generators import CausalGenerator

    smol = CausalGenerator.load("smollm2")
    paris = Passage("Paris#0", "Paris", "Paris", "Paris is the capital and largest city of France.")
    rome = Passage("Rome#0", "Rome", "Rome", "Rome is the capital city of Italy.")
    questions = ["What is the capital of France?", "What is the capital of Italy?"]
    passages = [[paris, rome], [rome, paris]]
    doc = torch.log_softmax(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), -1)
    for decoded in (rag_token_decode(smol, questions, passages, doc, beams=1, max_new_tokens=24),
                    rag_token_decode(smol, questions, passages, doc, beams=3, max_new_tokens=12),
                    rag_sequence_decode(smol, questions, passages, doc, beams=2, max_new_tokens=12)):
        texts = [smol.tokenizer.decode(d.tokens, skip_special_tokens=True) for d in decoded]
        assert "Paris" in texts[0] and "Rome" in texts[1], texts
    greedy_answers = rag_token_decode(smol, questions, passages, doc, beams=1, max_new_tokens=24)
    assert all(d.tokens[-1] in stop_ids(smol) for d in greedy_answers)  # finished, not cut
    # the cached incremental path gives the same log-likelihood as a scoring pass
    d = rag_token_decode(smol, questions[:1], passages[:1], doc[:1], beams=1, max_new_tokens=12)[0]
    lp, target, mask = smol.target_logprobs(questions[:1], passages[:1], [d.tokens])
    assert marginal.marginalize(doc[:1], lp).sum().item() == pytest.approx(d.logprob, abs=1e-3)


def _continuation_equals_full_scoring(gen, questions, passages, answers):
    prompts = gen.pair_prompts(questions, passages)
    state, first = gen.start(prompts)
    k = len(passages[0])
    ids = gen.target_ids(answers)
    t = max(map(len, ids))
    pairs = [(q, z) for q in range(len(questions)) for z in range(k)]
    targets = torch.tensor([ids[q] + [gen.pad_id] * (t - len(ids[q])) for q, _ in pairs])
    mask = torch.tensor([[i < len(ids[q]) for i in range(t)] for q, _ in pairs])
    with torch.no_grad():
        cached = gen.continuation_logprobs(state, first, torch.tensor([q * k + z for q, z in pairs]), targets, mask)
        full, _, _ = gen.target_logprobs(questions, passages, answers)  # (B, K, T)
        again = gen.continuation_logprobs(state, first, torch.tensor([0]), targets[:1], mask[:1])
    torch.testing.assert_close(cached, full.sum(-1).reshape(-1), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(again, cached[:1], atol=2e-4, rtol=1e-4)  # the prefill state was not consumed


def test_cached_continuation_scoring_equals_a_full_pass_seq2seq(tiny):  # noqa: F811
    bart = _generating_bart(tiny, 0.5, 0, 0.0)
    gen, questions, passages, answers, _ = _batch(tiny[0], bart)
    _continuation_equals_full_scoring(gen, questions, passages, answers)


def test_cached_continuation_scoring_equals_a_full_pass_causal():
    from ragline.models.generators import CausalGenerator

    smol = CausalGenerator.load("smollm2")
    paris = Passage("Paris#0", "Paris", "Paris", "Paris is the capital and largest city of France.")
    rome = Passage("Rome#0", "Rome", "Rome", "Rome, the Eternal City, is the capital city of Italy.")
    _continuation_equals_full_scoring(smol, ["What is the capital of France?", "Which city is Italy's capital?"],
                                      [[paris, rome], [rome, paris]], ["Paris", "Rome, the Eternal City"])



PRUNING_CASES = [(model, n_best) for model in [(0.5, 0, 0.0), (0.5, 4, 4.0), (1.0, 4, 0.0)] for n_best in (1, 3)]


def _pruning_case(tiny, model, n_best) -> tuple[int, int]:  # noqa: F811
    """Thorough decoding of one case checked against brute force; (pairs scored, pairs an exhaustive thorough
    decoding scores)."""
    bart = _generating_bart(tiny, *model)
    gen, questions, passages, _, doc_scores = _batch(tiny[0], bart)
    doc = marginal.doc_log_probs(doc_scores)
    k = len(passages[0])
    scored = []
    original = gen.continuation_logprobs
    gen.continuation_logprobs = \
        lambda state, first, rows, *a: scored.append(len(rows)) or original(state, first, rows, *a)
    thorough = rag_sequence_decode(gen, questions, passages, doc, beams=3, max_new_tokens=10, n_best=n_best)
    gen.continuation_logprobs = original
    exhaustive = 0
    for q, got in enumerate(thorough):
        # each passage's own beam hypotheses: decoding with that passage alone runs the same beam search
        beams = [{tuple(y) for y, _ in rag_sequence_decode(gen, questions[q : q + 1], [[z]], doc[q : q + 1, :1],
                                                            beams=3, max_new_tokens=10, thorough=False,
                                                            n_best=3)[0].alternatives} for z in passages[q]]
        cands = sorted(set().union(*beams))
        exhaustive += sum(k - sum(y in b for b in beams) for y in cands)
        lp, _, _ = gen.target_logprobs([questions[q]] * len(cands), [passages[q]] * len(cands),
                                       [list(y) for y in cands])  # (C, K, T)
        exact = marginal.marginalize(doc[q].expand(len(cands), -1), lp.sum(-1)).detach()  # (C,)
        order = sorted(range(len(cands)), key=lambda c: -float(exact[c]))[:n_best]
        assert [tuple(y) for y, _ in got.alternatives] == [cands[c] for c in order]
        torch.testing.assert_close(torch.tensor([v for _, v in got.alternatives]), exact[order], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.seq_logprobs, lp[order[0]].sum(-1), atol=1e-4, rtol=1e-4)
    return sum(scored), exhaustive


@pytest.mark.parametrize("model, n_best", PRUNING_CASES)
def test_thorough_decoding_prunes_pairs_but_equals_scoring_every_pair(tiny, model, n_best):  # noqa: F811
    """Thorough decoding skips (y, z) pairs whose upper bound cannot reach the n best; its answers and their
    scores must equal brute force: every candidate of the beams scored under every passage."""
    scored, exhaustive = _pruning_case(tiny, model, n_best)
    assert scored <= exhaustive


def test_the_pruning_comparisons_skip_pairs(tiny):  # noqa: F811
    """The cases above are not all trivial: in some of them the bound did skip work (else they would test
    nothing). Stands alone: it runs the cases itself until one skips."""
    cases = (_pruning_case(tiny, model, n_best) for model, n_best in PRUNING_CASES)
    assert any(scored < exhaustive for scored, exhaustive in cases)


def test_scoring_passes_hold_at_most_their_budget_of_positions():
    """Thorough decoding's scoring passes are cut by the positions the generator computes: a padded pass
    computes rows x longest, a packed one each distinct (row, prefix) of the targets' tokens after their first."""
    items = [(0, (7,) * n, 0) for n in (2, 2, 3, 5, 9)]  # sorted by length, as a padded pass sorts them
    padded = scoring_passes(items, 1, 12, PaddedPass)
    assert [len(c) for c in padded] == [3, 1, 1]  # 3 x 3 = 9; 4 x 5 = 20 is over; 2 x 9 = 18 is over
    assert [x for c in padded for x in c] == items
    # packed: one row's targets that begin alike share their positions; other rows (passages) do not
    items = [(0, (7, 1, 2, 3), 0), (0, (7, 1, 2, 4, 5), 0), (0, (7, 1, 2, 3), 1), (1, (8, 8), 0)]
    assert sorted(items, key=lambda m: PackedPass.order(m[0] * 2 + m[2], m[1])) == [items[0], items[1], items[2],
                                                                                     items[3]]
    plan = PackedPass()
    for q, y, z in items:
        plan.add(q * 2 + z, y)
    assert plan.positions == 3 + 1 + 3 + 1  # (7, 1, 2) once for row 0, then (..., 4); row 1 again; (8,)
    assert [len(c) for c in scoring_passes(items, 2, 7, PackedPass)] == [3, 1]  # 3 + 1 + 3; + 1 is over
    assert [len(c) for c in scoring_passes(items, 2, 4, PackedPass)] == [2, 2]
    assert scoring_passes(items[1:2], 2, 3, PackedPass) == [items[1:2]]  # an item over the budget goes alone
    assert scoring_passes([], 2, 3, PackedPass) == []
