"""Fusion-in-Decoder (``--model fid``) on a tiny random BART: equal to a hand-built concatenation of separately
encoded (question, passage) inputs, trainable, with cross-attention attribution that sums to one per token."""

import pytest
import torch
from conftest import tiny_bart_config, word_tokenizer

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models.generators import Seq2SeqGenerator
from ragline.rag import fid
from ragline.rag.decoding import rag_token_decode

WORDS = [f"w{i}" for i in range(40)] + ["who", "what", "/", "//"]
QUESTIONS = ["who w3 w7", "what w11"]
PASSAGES = [[Passage("a#0", "a", "w1", "w3 w5 w7 w9 w11"), Passage("b#0", "b", "w2", "w4"),
             Passage("c#0", "c", "w6", "w8 w10 w12 w14 w16 w18 w20")],
            [Passage("d#0", "d", "w11", "w13 w15"), Passage("a#0", "a", "w1", "w3 w5 w7 w9 w11"),
             Passage("e#0", "e", "w21", "w22 w23 w24 w25")]]


@pytest.fixture(scope="module")
def gen():
    from transformers import BartForConditionalGeneration

    tok = word_tokenizer(WORDS)
    torch.manual_seed(3)
    cfg = tiny_bart_config(len(tok), d_model=16, max_positions=64, init_std=0.5)
    return Seq2SeqGenerator(BartForConditionalGeneration(cfg).eval(), tok, "tiny-bart")


def _hand_built_logits(gen, question, passages, tokens):
    """Each (question, passage) prompt encoded alone, unpadded; the states concatenated; one decoder pass."""
    states = []
    with torch.no_grad():
        for z in passages:
            ids = torch.tensor([gen.tokenizer(gen.prompt(question, z))["input_ids"]])
            states.append(gen.model.get_encoder()(input_ids=ids)[0])  # (1, S_k, H)
        hidden = torch.cat(states, 1)  # (1, sum S_k, H): no padding anywhere
        dec = torch.tensor([[gen.model.config.decoder_start_token_id, *tokens[:-1]]])
        return gen.model(encoder_outputs=(hidden,), decoder_input_ids=dec).logits[0]  # (T, V)


def test_fid_equals_a_hand_built_concatenation_of_separately_encoded_passages(gen):
    answers = [[5, 9, 2], [7, 2]]
    reader = fid.FusedReader(gen, 3)
    with torch.no_grad():
        logprobs, _, mask, mass = reader.forward(QUESTIONS, PASSAGES, answers, attentions=True)
    for b, (q, zs, y) in enumerate(zip(QUESTIONS, PASSAGES, answers, strict=True)):
        want = torch.log_softmax(_hand_built_logits(gen, q, zs, y).float(), -1)
        torch.testing.assert_close(logprobs[b, : len(y)], want, atol=1e-5, rtol=1e-5)
    # attribution: a distribution over the passages for every answer token
    torch.testing.assert_close(mass.sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)
    assert gen.model.config._attn_implementation == "sdpa"  # eager only for the attention pass


@pytest.mark.parametrize("beams", [1, 3])
def test_fid_decoding_scores_its_answers_as_the_hand_built_reader_does(gen, beams):
    reader = fid.FusedReader(gen, 3)
    out = rag_token_decode(reader, QUESTIONS, [[None]] * 2, torch.zeros(2, 1), beams=beams, max_new_tokens=6,
                           length_penalty=1.0, prompts=gen.pair_prompts(QUESTIONS, PASSAGES))
    for q, zs, d in zip(QUESTIONS, PASSAGES, out, strict=True):
        logp = torch.log_softmax(_hand_built_logits(gen, q, zs, d.tokens).float(), -1)
        assert d.logprob == pytest.approx(float(logp[torch.arange(len(d.tokens)), torch.tensor(d.tokens)].sum()),
                                          abs=1e-4)
        if beams == 1:  # greedy: every token is the hand-built reader's argmax
            assert d.tokens == logp.argmax(-1).tolist()[: len(d.tokens)]


def test_fid_loss_trains_the_reader_and_distils_into_the_retriever(gen):
    import copy

    g = copy.deepcopy(gen)
    reader = fid.FusedReader(g, 3)
    scores = torch.zeros(2, 3, requires_grad=True)  # stands in for q(x)·d(z): the question encoder's output
    opt = torch.optim.Adam([*g.model.parameters(), scores], lr=1e-2)
    answers = ["w9 w11", "w13"]
    losses = []
    for _ in range(15):
        ll = fid.likelihood(reader, QUESTIONS, PASSAGES, answers, torch.log_softmax(scores, -1))
        opt.zero_grad()
        ll.loss.mean().backward()
        assert scores.grad is not None and scores.grad.abs().sum() > 0  # FiD-Distill reaches the retriever
        opt.step()
        losses.append(float(ll.loss.mean().detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    torch.testing.assert_close(ll.posterior.sum(-1), torch.ones(2), atol=1e-5, rtol=0)


def test_fid_refuses_a_decoder_only_generator():
    from ragline.models.tiny import tiny_causal

    with pytest.raises(RaglineError, match="encoder-decoder"):
        fid.FusedReader(tiny_causal(), 3)
