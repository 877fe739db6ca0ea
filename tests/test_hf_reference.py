"""Losses against Hugging Face's RagSequenceForGeneration / RagTokenForGeneration on the same tiny randomly
initialised BART generator and DPR question encoder, with the same passages and retrieval scores."""

import pytest
import torch
from conftest import tiny_bart_config, word_tokenizer

from ragline.corpus.passages import Passage
from ragline.models.generators import Seq2SeqGenerator
from ragline.rag import marginal

WORDS = ["who", "what", "where", "when", "directed", "wrote", "painted", "film", "novel", "music", "city", "capital",
         "river", "the", "a", "of", "is", "in", "by", "paris", "france", "kubrick", "stanley", "odyssey", "2001",
         "space", "twain", "mark", "huckleberry", "finn", "voltaire", "candide", "/", "//"]


@pytest.fixture(scope="module")
def tiny():
    from transformers import BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder, RagConfig

    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    bart_cfg = tiny_bart_config(len(tok))
    bart = BartForConditionalGeneration(bart_cfg).eval()
    dpr_cfg = DPRConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    dpr = DPRQuestionEncoder(dpr_cfg).eval()
    rag_cfg = RagConfig.from_question_encoder_generator_configs(dpr_cfg, bart_cfg, n_docs=3)
    return tok, bart, dpr, rag_cfg


def _batch(tok, bart, same_length=False):
    """Two questions with three passages each. ``same_length`` pads passage texts with filler words so that
    every prompt has the same number of tokens (no padding in the batch)."""
    gen = Seq2SeqGenerator(bart, tok, "tiny-bart")
    questions = ["who directed 2001 a space odyssey", "who wrote candide"]
    passages = [[Passage("a#0", "a", "kubrick", "stanley kubrick directed 2001 a space odyssey"),
                 Passage("b#0", "b", "paris", "paris is the capital of france"),
                 Passage("c#0", "c", "twain", "mark twain wrote huckleberry finn")],
                [Passage("d#0", "d", "voltaire", "voltaire wrote candide"),
                 Passage("b#0", "b", "paris", "paris is the capital of france"),
                 Passage("a#0", "a", "kubrick", "stanley kubrick directed 2001")]]
    answers = ["stanley kubrick", "voltaire"]
    doc_scores = torch.tensor([[3.0, 1.0, 0.5], [2.0, 0.1, -1.0]])
    if same_length:
        size = {(b, k): len(tok(gen.prompt(q, z))["input_ids"])
                for b, (q, zs) in enumerate(zip(questions, passages, strict=True))
                for k, z in enumerate(zs)}
        longest = max(size.values())
        passages = [[Passage(z.pid, z.doc_id, z.title, z.text + " the" * (longest - size[b, k]))
                     for k, z in enumerate(zs)]
                    for b, zs in enumerate(passages)]
    return gen, questions, passages, answers, doc_scores


def _hf_inputs(gen, questions, passages, answers):
    ctx = gen.tokenizer([gen.prompt(q, z) for q, zs in zip(questions, passages, strict=True) for z in zs],
                        padding=True, return_tensors="pt")
    target, mask = gen._targets(answers)
    # HF RAG feeds its labels to the decoder and scores them shifted by one, so labels =
    # [decoder start] + our target ids gives the decoder exactly the inputs our generator gives it.
    start = torch.full((len(answers), 1), gen.model.config.decoder_start_token_id)
    labels = torch.cat([start, target.masked_fill(~mask, gen.pad_id)], 1)
    return ctx, labels


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_losses_match_hugging_face(tiny, variant, eps):
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    tok, bart, dpr, rag_cfg = tiny
    rag_cfg.label_smoothing = eps
    cls = RagSequenceForGeneration if variant == "sequence" else RagTokenForGeneration
    hf = cls(config=rag_cfg, question_encoder=dpr, generator=bart).eval()
    gen, questions, passages, answers, doc_scores = _batch(tok, bart)
    ctx, labels = _hf_inputs(gen, questions, passages, answers)
    with torch.no_grad():
        out = hf(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                 doc_scores=doc_scores, labels=labels, n_docs=3, reduce_loss=False)
        scored = gen.score(questions, passages, answers)
    fn = marginal.rag_sequence if variant == "sequence" else marginal.rag_token
    ours = fn(scored.logprobs, marginal.doc_log_probs(doc_scores), scored.target, scored.mask, eps=eps)
    torch.testing.assert_close(ours.loss, out.loss, atol=1e-4, rtol=1e-5)


def test_hugging_face_rag_sequence_quirk_on_one_token_targets(tiny):
    """HF's RAG-Sequence adds log p(z|x) at target position 1. For a one-token target that position is
    padding, so HF drops the passage prior altogether; ragline keeps it, as the formula says."""
    from transformers import RagSequenceForGeneration

    tok, bart, dpr, rag_cfg = tiny
    rag_cfg.label_smoothing = 0.0
    hf = RagSequenceForGeneration(config=rag_cfg, question_encoder=dpr, generator=bart).eval()
    gen, questions, passages, _, doc_scores = _batch(tok, bart)
    gen.target_ids = lambda answers: [[tok.convert_tokens_to_ids(a)] for a in answers]  # one token, no </s>
    answers = ["kubrick", "voltaire"]
    ctx, labels = _hf_inputs(gen, questions, passages, answers)
    with torch.no_grad():
        out = hf(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                 doc_scores=doc_scores, labels=labels, n_docs=3, reduce_loss=False)
        scored = gen.score(questions, passages, answers)
    ours = marginal.rag_sequence(scored.logprobs, marginal.doc_log_probs(doc_scores), scored.target, scored.mask)
    uniform = marginal.rag_sequence(scored.logprobs, torch.zeros_like(doc_scores), scored.target, scored.mask)
    torch.testing.assert_close(uniform.loss, out.loss, atol=1e-4, rtol=1e-5)  # HF: prior lost (log 1 = 0 each)
    assert not torch.allclose(ours.loss, out.loss, atol=1e-3)


# Tiny random BARTs whose outputs are not degenerate (found by a search over seeds): init_std, seed, bonus on
# the end token's final logit. They give answers that stop early, answers cut at the length limit, beams
# that differ from greedy, and a one-token end-only candidate (HF's RAG-Sequence quirk).
GENERATING = [(0.5, 0, 0.0), (0.5, 4, 4.0), (1.0, 4, 0.0)]


def _generating_bart(tiny, std, seed, eos_bonus):
    from transformers import BartForConditionalGeneration

    _, bart, _, _ = tiny
    cfg = bart.config.__class__(**{**bart.config.to_dict(), "init_std": std})
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.final_logits_bias[0, cfg.eos_token_id] += eos_bonus
    return model


def _hf_generate(variant, tiny, bart, beams, max_new, same_length=False):
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    tok, _, dpr, rag_cfg = tiny
    rag_cfg.label_smoothing = 0.0
    cls = RagSequenceForGeneration if variant == "sequence" else RagTokenForGeneration
    hf = cls(config=rag_cfg, question_encoder=dpr, generator=bart).eval()
    gen, questions, passages, answers, doc_scores = _batch(tok, bart, same_length)
    ctx, _ = _hf_inputs(gen, questions, passages, answers)
    with torch.no_grad():
        out = hf.generate(context_input_ids=ctx["input_ids"], context_attention_mask=ctx["attention_mask"],
                          doc_scores=doc_scores, n_docs=3, num_beams=beams, max_length=max_new + 1,
                          min_length=0, no_repeat_ngram_size=0, forced_bos_token_id=None,
                          forced_eos_token_id=None, length_penalty=1.0, early_stopping=False)
    return gen, questions, passages, doc_scores, [_strip(s, gen.pad_id) for s in out]


def _strip(seq, pad):
    seq = seq.tolist()[1:]  # drop the decoder start token
    while seq and seq[-1] == pad:
        seq.pop()
    return seq


@pytest.mark.parametrize("model", GENERATING)
@pytest.mark.parametrize("beams", [1, 4])
def test_rag_token_generation_matches_hugging_face(tiny, model, beams):
    from ragline.rag.decoding import rag_token_decode

    bart = _generating_bart(tiny, *model)
    gen, questions, passages, doc_scores, hf = _hf_generate("token", tiny, bart, beams, max_new=12)
    ours = rag_token_decode(gen, questions, passages, marginal.doc_log_probs(doc_scores), beams=beams,
                            max_new_tokens=12, length_penalty=1.0)  # HF's default
    assert [d.tokens for d in ours] == hf


@pytest.mark.parametrize("model", GENERATING)
@pytest.mark.parametrize("beams", [1, 3])
def test_rag_sequence_thorough_generation_matches_hugging_face(tiny, model, beams):
    """Prompts of equal length: HF's RAG-Sequence generation ignores the passages' attention mask (see the
    next test), so with padding in the batch it decodes other inputs than the passages."""
    from ragline.rag.decoding import rag_sequence_decode

    bart = _generating_bart(tiny, *model)
    gen, questions, passages, doc_scores, hf = _hf_generate("sequence", tiny, bart, beams, max_new=12,
                                                            same_length=True)
    ours = rag_sequence_decode(gen, questions, passages, marginal.doc_log_probs(doc_scores), beams=beams,
                               max_new_tokens=12, thorough=True, length_penalty=1.0)  # HF's default
    assert [d.tokens for d in ours] == hf


def test_hugging_face_rag_sequence_generation_ignores_the_passage_mask(tiny):
    """HF's RagSequenceForGeneration.generate sets attention_mask=None before calling the generator, so
    passages shorter than the longest attend to padding. ragline masks padding; its per-passage beams equal
    the generator's own generate() with the mask, and HF's equal it without."""
    from ragline.rag.decoding import RowStepper, greedy, stop_ids

    bart = _generating_bart(tiny, 0.5, 0, 0.0)
    gen, questions, passages, _, _ = _batch(tiny[0], bart)
    enc = gen.tokenizer(gen.pair_prompts(questions, passages), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch is padded
    kw = dict(num_beams=1, max_length=13, min_length=0, no_repeat_ngram_size=0, forced_bos_token_id=None,
              forced_eos_token_id=None)
    with torch.no_grad():
        out = bart.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        masked = [_strip(s, gen.pad_id) for s in out]
        unmasked = [_strip(s, gen.pad_id) for s in bart.generate(enc["input_ids"], **kw)]
    ours = [h.tokens for h in greedy(RowStepper(gen, gen.pair_prompts(questions, passages), 6, 1, 1,
                                                lambda logp, _: logp[:, :, 0]), 6, stop_ids(gen), 12)]
    assert ours == masked and masked != unmasked


def test_the_generation_comparisons_were_not_trivial(tiny):
    """The comparisons above cover many different outputs of several lengths (else matching Hugging Face would
    say little). Stands alone: it generates their reference outputs itself."""
    seen = set()
    for model in GENERATING:
        bart = _generating_bart(tiny, *model)
        for kind, beams, same in (("token", 1, False), ("token", 4, False), ("sequence", 1, True),
                                  ("sequence", 3, True)):
            seen.update(tuple(x) for x in _hf_generate(kind, tiny, bart, beams, max_new=12, same_length=same)[4])
    lengths = {len(x) for x in seen}
    assert len(seen) >= 8 and {1, 12} <= lengths and len(lengths) >= 4, seen


def test_seq2seq_special_tokens_in_user_text_are_read_as_text(tiny):
    """A passage holding ``</s>`` is tokenised with special-token strings read as text, inside the tokenizer's own
    ``<s> ... </s>``; other prompts are encoded exactly as before. (This word-level test vocabulary has ``</s>``
    as a word too, so the ids coincide here; a BPE vocabulary spells it in pieces.)"""
    tok, bart, _, _ = tiny
    gen = Seq2SeqGenerator(bart, tok, "tiny-bart")
    plain = gen.prompt("who wrote candide", Passage("d#0", "d", "voltaire", "voltaire wrote candide"))
    hostile = gen.prompt("who wrote candide", Passage("d#0", "d", "voltaire", "voltaire </s> wrote candide"))
    enc = gen._encode([plain, hostile])
    first = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    assert first == tok(plain)["input_ids"]  # unchanged (then right-padded to the longer row)
    ids = enc["input_ids"][1][enc["attention_mask"][1].bool()].tolist()
    text = "voltaire / voltaire </s> wrote candide // who wrote candide"
    assert ids == [tok.bos_token_id, *tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"],
                   tok.eos_token_id]
