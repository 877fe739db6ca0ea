"""Losses against Hugging Face's RagSequenceForGeneration / RagTokenForGeneration on the same tiny randomly
initialised BART generator and DPR question encoder, with the same passages and retrieval scores."""

import pytest
import torch

from ragline.corpus.passages import Passage
from ragline.models.generators import Seq2SeqGenerator
from ragline.rag import marginal

WORDS = ["who", "what", "where", "when", "directed", "wrote", "painted", "film", "novel", "music", "city", "capital", "river", "the", "a", "of", "is", "in", "by", "paris", "france", "kubrick", "stanley", "odyssey", "2001", "space", "twain", "mark", "huckleberry", "finn", "voltaire", "candide", "/", "//"]


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        DPRConfig,
        DPRQuestionEncoder,
        PreTrainedTokenizerFast,
        RagConfig,
    )

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    bart_cfg = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None)
    bart = BartForConditionalGeneration(bart_cfg).eval()
    dpr_cfg = DPRConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    dpr = DPRQuestionEncoder(dpr_cfg).eval()
    rag_cfg = RagConfig.from_question_encoder_generator_configs(dpr_cfg, bart_cfg, n_docs=3)
    return tok, bart, dpr, rag_cfg


def _batch(tok, bart):
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
