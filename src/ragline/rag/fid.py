"""Fusion-in-Decoder (Izacard & Grave 2021) over a seq2seq generator (BART/T5).

Each (question, passage) prompt is encoded on its own; the K encoder outputs are concatenated along the
sequence and one decoder reads them all:

    p(y | x, z_1..z_K) = prod_t p_theta(y_t | y_<t, [enc(x, z_1); ...; enc(x, z_K)])

No marginal: the decoder itself weighs the passages. Attribution is its cross-attention mass: for answer token
t, the attention of every decoder layer and head on passage k's encoder positions, averaged over layers and
heads, a distribution over the K passages (it sums to one, since each head's attention does).

Training (``train rag --model fid``) minimises -log p(y | x, z_1..z_K); as in FiD-Distill (Izacard & Grave,
"Distilling Knowledge from Reader to Retriever") the question encoder learns from the reader's attention:
KL(a || p_eta(z|x)), a the answer's cross-attention mass per passage (held fixed), so the retriever's prior
moves towards the passages the reader reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models import logprobs as vocab_logprobs
from ragline.models.generator import DecodeState, Generator
from ragline.models.prefill import output_cache
from ragline.models.seq2seq import Seq2SeqGenerator
from ragline.rag.marginal import Likelihood


class FusedReader:
    """A seq2seq generator whose decoding rows are questions reading K fused passages each: what the decoding
    search steps (``start`` takes the B*K (question, passage) prompts, question-major, and returns B rows)."""

    def __init__(self, generator: Generator, k: int) -> None:
        if not isinstance(generator, Seq2SeqGenerator):
            raise RaglineError(f"fid reads passages with an encoder-decoder; {generator.name} is decoder-only",
                               "use --generator with a BART or T5 folder (or a RAG checkpoint), or another --model")
        self.gen, self.k = generator, k

    def __getattr__(self, name: str):  # tokenizer, pad_id, vocab_size, advance, fork: the generator's own
        return getattr(self.gen, name)

    def fuse(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states of the prompts, concatenated per question: (B, K*S, H) and its mask (B, K*S)."""
        enc = self.gen._encode(prompts)  # (B*K, S), right-padded
        hidden = self.gen.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        b, s = len(prompts) // self.k, hidden.shape[1]
        return hidden.reshape(b, self.k * s, -1), enc["attention_mask"].reshape(b, self.k * s)

    def start(self, prompts: list[str]) -> tuple[DecodeState, torch.Tensor]:
        hidden, mask = self.fuse(prompts)  # (B, K*S, H)
        b = hidden.shape[0]
        first = torch.full((b, 1), self.gen.model.config.decoder_start_token_id, dtype=torch.long,
                           device=hidden.device)
        out = self.gen.model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=first, use_cache=True)
        state = DecodeState(output_cache(out), mask, None, hidden, torch.arange(b, device=hidden.device))
        return state, vocab_logprobs.log_softmax(out.logits[:, -1]).cpu()

    def forward(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]], answers,
                attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass over the answers: log-probs (B, T, V), target and mask (B, T), and with
        ``attentions`` the cross-attention mass per passage (B, T, K)."""
        target, mask = self.gen._targets(answers)
        target, mask = target.to(self.gen.device), mask.to(self.gen.device)
        hidden, enc_mask = self.fuse(self.gen.pair_prompts(questions, passages))
        decoder_inputs = self.gen.model.prepare_decoder_input_ids_from_labels(labels=target.masked_fill(~mask, -100))
        with _eager(self.gen.model, attentions):
            out = self.gen.model(encoder_outputs=(hidden,), attention_mask=enc_mask, decoder_input_ids=decoder_inputs,
                                 output_attentions=attentions)
        logprobs = torch.log_softmax(out.logits.float(), -1)  # (B, T, V)
        mass = None
        if attentions:
            att = torch.stack(out.cross_attentions).mean((0, 2))  # (layers, B, heads, T, K*S) -> (B, T, K*S)
            mass = att.reshape(*att.shape[:2], self.k, -1).sum(-1)  # (B, T, K)
        return logprobs, target, mask, mass


@contextmanager
def _eager(model: torch.nn.Module, on: bool):
    """Eager attention for the duration (the fused kernels return no attention weights); the same numbers."""
    before = model.config._attn_implementation
    if on and before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if on and before != "eager":
            model.set_attn_implementation(before)


def likelihood(reader: FusedReader, questions: Sequence[str], passages: Sequence[Sequence[Passage]],
               answers: Sequence[str], doc_logprobs: torch.Tensor, eps: float = 0.0) -> Likelihood:
    """FiD's loss per question: -log p(y | x, z_1..z_K) (label-smoothed with ``eps``), plus FiD-Distill's
    KL(a || p_eta(z|x)) with a (B, K) the answer's mean cross-attention mass per passage, held fixed: its only
    gradient goes to the question encoder through ``doc_logprobs`` (B, K)."""
    logprobs, target, mask, mass = reader.forward(questions, passages, answers, attentions=True)
    maskf = mask.to(logprobs.dtype)
    tok = logprobs.gather(-1, target[..., None]).squeeze(-1) * maskf  # (B, T)
    loglik = tok.sum(-1)
    loss = -loglik
    if eps:
        loss = (1 - eps) * loss - eps / logprobs.shape[-1] * (logprobs.sum(-1) * maskf).sum(-1)
    attn = (mass * maskf[..., None]).sum(1) / maskf.sum(1, keepdim=True)  # (B, K) mean over answer tokens
    target_dist = attn.detach().clamp_min(1e-12)
    doc = doc_logprobs.to(logprobs.device)
    distill = (target_dist * (target_dist.log() - doc)).sum(-1)  # (B,) KL(a || p_eta)
    return Likelihood(loglik, loss + distill, attn, token_posterior=mass)
