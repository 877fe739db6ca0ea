"""Generators p_theta(y | x, z): score target sequences for (question, passage) pairs.

Two back ends share one interface, :meth:`Generator.score`, returning full-vocabulary log-probabilities
of each target token, shape (B, K, T, V), for B questions, K passages each, T target positions:

* :class:`CausalGenerator` (decoder-only, ``AutoModelForCausalLM``): the prompt holds the passage and the
  question (the tokenizer's chat template when it has one); the answer is scored after it. Prompts are
  left-padded, so the answer occupies the same last positions in every row and only those positions'
  logits are computed.
* :class:`Seq2SeqGenerator` (encoder-decoder, ``AutoModelForSeq2SeqLM``, BART in the paper): the encoder
  reads ``title / text // question`` (as Hugging Face's RAG does) and the decoder scores the answer.

A passage of ``None`` gives the closed-book prompt (the question alone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models.catalog import generator_path

SYSTEM_PROMPT = "Answer the question using the passage. Reply with the answer only, as briefly as possible."
CLOSED_BOOK_SYSTEM_PROMPT = "Answer the question. Reply with the answer only, as briefly as possible."


@dataclass
class Scored:
    logprobs: torch.Tensor  # (B, K, T, V) log p_theta(y_t = v | x, z_k, y_<t)
    target: torch.Tensor    # (B, T) target token ids (pad_id where mask is False)
    mask: torch.Tensor      # (B, T) bool: real target positions


class Generator(ABC):
    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @abstractmethod
    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """Token ids the model must produce for each answer, ending with its end-of-answer token."""

    @abstractmethod
    def score(self, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]],
              answers: Sequence[str]) -> Scored:
        """Log-probabilities of ``answers[b]`` given ``questions[b]`` and each of ``passages[b]`` (K each)."""

    def _targets(self, answers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.target_ids(answers)
        t = max(map(len, ids))
        target = torch.full((len(ids), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.bool)
        for b, row in enumerate(ids):
            target[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return target, mask  # (B, T) each


def _check_shapes(questions: Sequence[str], passages: Sequence[Sequence], answers: Sequence[str]) -> int:
    if not (len(questions) == len(passages) == len(answers)) or not questions:
        raise RaglineError("questions, passages and answers must be non-empty lists of one length",
                           "pass one passage list and one answer per question")
    k = len(passages[0])
    if k == 0 or any(len(p) != k for p in passages):
        raise RaglineError("every question needs the same number of passages (k >= 1)",
                           "retrieve the same k for each question; use [None] for closed book")
    return k


class CausalGenerator(Generator):
    """Decoder-only generator; the default back end (Qwen2.5-0.5B-Instruct, SmolLM2-135M-Instruct)."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "causal") -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.tokenizer.padding_side = "left"
        chat = getattr(tokenizer, "chat_template", None)
        self.use_chat = bool(chat)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if self.use_chat else None
        self.end_id = int(end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id)

    @classmethod
    def load(cls, name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32) -> CausalGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name, path = generator_path(name_or_path)
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model.eval()
        return cls(model, tok, name)

    def prompt(self, question: str, passage: Passage | None) -> str:
        if not self.use_chat:
            ctx = f"{passage.title} / {passage.text} // " if passage is not None else ""
            return f"{ctx}{question}\nAnswer:"
        user = f"Question: {question}" if passage is None else \
            f"Passage: {passage.title}: {passage.text}\nQuestion: {question}"
        system = SYSTEM_PROMPT if passage is not None else CLOSED_BOOK_SYSTEM_PROMPT
        return self.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": user}],
                                                  tokenize=False, add_generation_prompt=True)

    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        lead = "" if self.use_chat else " "
        return [self.tokenizer(lead + a.strip(), add_special_tokens=False)["input_ids"] + [self.end_id]
                for a in answers]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, (N, L) each."""
        enc = self.tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def score(self, questions, passages, answers) -> Scored:
        k = _check_shapes(questions, passages, answers)
        b = len(questions)
        ids, attn = self.encode_prompts([self.prompt(q, z) for q, zs in zip(questions, passages, strict=True)
                                         for z in zs])  # (B*K, L)
        target, mask = self._targets(answers)  # (B, T)
        t = target.shape[1]
        rep_t = target.repeat_interleave(k, 0)  # (B*K, T)
        rep_m = mask.repeat_interleave(k, 0)
        full = torch.cat([ids, rep_t], 1)  # (B*K, L+T): [pads][prompt][answer][answer pads]
        full_attn = torch.cat([attn, rep_m.long()], 1)
        positions = (full_attn.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=full, attention_mask=full_attn, position_ids=positions, logits_to_keep=t + 1)
        logits = out.logits[:, :t]  # (B*K, T, V): position L-1+i predicts answer token i
        logprobs = torch.log_softmax(logits.float(), -1)
        return Scored(logprobs.view(b, k, t, -1), target, mask)


class Seq2SeqGenerator(Generator):
    """Encoder-decoder generator (BART/T5 family), as in the paper."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "seq2seq", max_source_length: int = 512) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_source_length = max_source_length

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Seq2SeqGenerator:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        name, folder = generator_path(str(path))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), dtype=dtype)
        model.eval()
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), name)

    @staticmethod
    def prompt(question: str, passage: Passage | None) -> str:
        """Hugging Face RAG's layout: ``title / text // question``."""
        return question if passage is None else f"{passage.title} / {passage.text} // {question}"

    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(a.strip())["input_ids"] for a in answers]

    def score(self, questions, passages, answers) -> Scored:
        k = _check_shapes(questions, passages, answers)
        enc = self.tokenizer([self.prompt(q, z) for q, zs in zip(questions, passages, strict=True) for z in zs],
                             padding=True, truncation=True, max_length=self.max_source_length, return_tensors="pt")
        target, mask = self._targets(answers)  # (B, T)
        labels = target.masked_fill(~mask, -100).repeat_interleave(k, 0)  # (B*K, T)
        decoder_inputs = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            decoder_input_ids=decoder_inputs).logits  # (B*K, T, V)
        logprobs = torch.log_softmax(logits.float(), -1)
        return Scored(logprobs.view(len(questions), k, target.shape[1], -1), target, mask)
