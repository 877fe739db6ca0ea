"""The concatenated-context reader (``--model concat``): the top-k passages numbered in one prompt, decoded
greedily or with beams; attribution by the answer's score under each passage alone."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_bart_config, word_tokenizer

from ragline import vocab
from ragline.corpus.passages import Passage
from ragline.models.generators import CausalGenerator
from ragline.rag import marginal
from ragline.rag.citations import from_marks
from ragline.rag.model import RagModel
from ragline.retriever import Retriever
from ragline.serve.budget import Budget, Settings

Q = "Who directed the film 2001: A Space Odyssey?"


@pytest.fixture(scope="module")
def rag(small_index, encoders):
    return RagModel(Retriever(small_index, encoders.question), CausalGenerator.load("smollm2"), k=3)


def _direct_logprob(gen: CausalGenerator, prompt: str, tokens: list[int]) -> float:
    """log p(tokens | prompt) from one plain forward pass over prompt + tokens."""
    ids = gen.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([tokens])], 1)
    with torch.no_grad():
        logp = torch.log_softmax(gen.model(input_ids=full).logits[0].float(), -1)  # (L+T, V)
    n = ids.shape[1]
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(tokens)))


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_concat_answer_is_its_joined_prompts_likelihood_with_every_passage_attributed(rag, decoding):
    (a,) = rag.answer([Q], model="concat", decoding=decoding, beams=3, max_new_tokens=16)
    assert a.model == "concat" and [s.rank for s in a.sources] == [1, 2, 3]
    passages = [Passage(s.pid, s.doc_id, s.title, s.text) for s in a.sources]
    prompt = rag.generator.concat_prompt(Q, passages)
    assert all(f"[{i}] {z.title}: {z.text}" in prompt for i, z in enumerate(passages, 1))
    assert a.logprob == pytest.approx(_direct_logprob(rag.generator, prompt, a.tokens), abs=1e-3)
    # p(z|x,y) = p(z|x) p(y|x,z) / sum: the answer scored under each passage alone
    lp, _, _ = rag.generator.target_logprobs([Q], [passages], [a.tokens])  # (1, K, T)
    prior = torch.tensor([[s.prior for s in a.sources]]).log()
    want = marginal.sequence_posterior(prior, lp.sum(-1))[0]
    assert [s.posterior for s in a.sources] == pytest.approx(want.tolist(), abs=1e-4)
    assert sum(s.posterior for s in a.sources) == pytest.approx(1.0, abs=1e-5)
    assert a.sources[0].title == "2001: A Space Odyssey"


def test_seq2seq_concat_reads_all_passages_past_the_single_prompt_limit():
    """A BART generator's concatenated prompt may exceed the per-passage limit (max_combined_length): the
    reader widens it to the model's own, and its score equals a direct forward pass over the joined prompt."""
    from tokenizers import pre_tokenizers
    from transformers import BartForConditionalGeneration

    from ragline.models.generators import Seq2SeqGenerator, Seq2SeqPrompt
    from ragline.rag.decoding import rag_token_decode

    words = [f"w{i}" for i in range(60)] + ["who", "what", "/", "//", "[", "]", "1", "2", "3"]
    tok = word_tokenizer(words, pre_tokenizers.BertPreTokenizer())
    torch.manual_seed(0)
    cfg = tiny_bart_config(len(tok), d_model=16, layers=1, max_positions=512, init_std=0.5)
    gen = Seq2SeqGenerator(BartForConditionalGeneration(cfg).eval(), tok, "tiny-bart",
                           Seq2SeqPrompt(max_combined_length=40))
    passages = [Passage(f"p{i}#0", f"p{i}", f"w{i}", " ".join(f"w{(i * 7 + j) % 60}" for j in range(30)))
                for i in range(3)]
    prompt = gen.concat_prompt("who w5", passages)
    wide = gen.widened(3)
    assert wide.max_source_length == 120 and gen.max_source_length == 40  # the original is left alone
    full = tok(prompt)["input_ids"]
    assert 40 < len(full) <= 120  # longer than one passage's limit, read whole
    (d,) = rag_token_decode(wide, ["who w5"], [[None]], torch.zeros(1, 1), beams=1, max_new_tokens=6,
                            prompts=[prompt])
    with torch.no_grad():
        dec = torch.tensor([[cfg.decoder_start_token_id, *d.tokens[:-1]]])
        logits = gen.model(input_ids=torch.tensor([full]), decoder_input_ids=dec).logits[0]
    direct = torch.log_softmax(logits.float(), -1)[torch.arange(len(d.tokens)), torch.tensor(d.tokens)].sum()
    assert d.logprob == pytest.approx(float(direct), abs=1e-4)
    assert "[1] w0 / " in prompt and "[3] w2 / " in prompt and prompt.endswith(" // who w5")


def test_citation_marks_are_taken_out_of_the_answer():
    text, cited, runs = from_marks("Paris [2], and Lyon [1][2] [7]", 5)
    assert (text, cited) == ("Paris, and Lyon [7]", [2, 1])
    assert [(r.text, r.passages) for r in runs] == [("Paris", [2]), (", and Lyon", [1, 2]), (" [7]", [])]
    assert from_marks("Voltaire", 5)[:2] == ("Voltaire", [])
    assert from_marks("[3] Voltaire", 5)[1] == [3]


def test_concat_costs_one_row_holding_k_passages():
    s = Settings(vocab.CONCAT, None, 5, vocab.DENSE, 4, 32)
    assert s.rows == 4 and s.passages_per_row == 5
    b = Budget()
    assert b.cost(s, 10) == 4 * (10 + 5 * b.passage_tokens + 32)
    assert Settings(vocab.RAG_TOKEN, "greedy", 5, vocab.DENSE, 4, 32).rows == 5


def test_cli_ask_with_the_concatenated_reader(small_index):
    out = subprocess.run([sys.executable, "-m", "ragline", "ask", Q, "--index", str(small_index), "--generator",
                          "smollm2", "-k", "2", "--model", "concat", "--decoding", "greedy", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    a = json.loads(out.stdout)
    assert a["model"] == "concat" and len(a["sources"]) == 2 and a["cited"] is not None
    assert sum(s["posterior"] for s in a["sources"]) == pytest.approx(1.0, abs=1e-5)
