"""The encoder-decoder generator (``AutoModelForSeq2SeqLM``: BART in the paper, T5).

The encoder reads Hugging Face RAG's ``prefix + title + title_sep + text + doc_sep + question`` (``" / "`` and
``" // "`` unless a RAG checkpoint says otherwise, :class:`ragline.models.prompts.Seq2SeqPrompt`) and the
decoder scores the answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ragline.corpus.passages import Passage
from ragline.models import device as devices
from ragline.models import logprobs, packed_encoder
from ragline.models.catalog import generator_path
from ragline.models.generator import DecodeState, Generator, next_logprobs, pad_rows
from ragline.models.prefill import cache_kwarg, output_cache
from ragline.models.prompts import Seq2SeqPrompt, is_guarded

PROMPT_FILE = "ragline_generator.json"  # beside a saved seq2seq generator: its Seq2SeqPrompt
QUESTION_TOKENIZER = "question_tokenizer"  # ... and the question encoder's tokenizer it reads questions through


def source_limit(model: torch.nn.Module, tokenizer) -> int:
    """The longest input an encoder takes: its position table (BART), else the tokenizer's limit (T5's relative
    positions have none; 4096 caps a tokenizer that names no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 4096
    return int(min(positions, limit) if positions else limit)


class Seq2SeqGenerator(Generator):
    """Encoder-decoder generator (BART/T5 family), as in the paper.

    ``question_tokenizer``, when given (a RAG checkpoint's question encoder tokenizer), rewrites each question
    as Hugging Face's ``RagRetriever`` hands it to the generator: tokenised by the question encoder's tokenizer
    and decoded back (BERT uncased lower-cases it), which is the text RAG checkpoints were trained on."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "seq2seq", layout: Seq2SeqPrompt | None = None,
                 question_tokenizer=None, packed: bool = True) -> None:
        """``packed`` runs the encoder over packed rows, scoring answers and decoding them, where the model
        allows it (:mod:`ragline.models.packed_encoder`); False keeps the padded pass."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.layout = layout or Seq2SeqPrompt(prefix=getattr(model.config, "prefix", None) or "")
        self.question_tokenizer = question_tokenizer
        self.packed = packed

    @property
    def max_source_length(self) -> int:
        return self.layout.max_combined_length

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None
             ) -> Seq2SeqGenerator:
        """A BART/T5 folder; a prompt layout and question tokenizer saved beside it (:meth:`save`) are kept."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        name, folder = generator_path(str(path))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), dtype=dtype).to(devices.resolve(device))
        model.eval()
        layout = Seq2SeqPrompt(**json.loads((folder / PROMPT_FILE).read_text())) \
            if (folder / PROMPT_FILE).is_file() else None
        qtok = AutoTokenizer.from_pretrained(str(folder / QUESTION_TOKENIZER)) \
            if (folder / QUESTION_TOKENIZER).is_dir() else None
        return cls(model, AutoTokenizer.from_pretrained(str(folder)), name, layout, qtok)

    def save(self, path: Path, model: torch.nn.Module | None = None) -> None:
        super().save(path, model)
        (Path(path) / PROMPT_FILE).write_text(json.dumps(asdict(self.layout)))
        if self.question_tokenizer is not None:
            self.question_tokenizer.save_pretrained(Path(path) / QUESTION_TOKENIZER)

    def question_text(self, question: str) -> str:
        """The question as the generator reads it (see the class docstring)."""
        if self.question_tokenizer is None:
            return question
        ids = self.question_tokenizer([question], truncation=True)["input_ids"]
        return self.question_tokenizer.batch_decode(ids, skip_special_tokens=True)[0]

    def prompt(self, question: str, passage: Passage | None) -> str:
        return self.layout.pair(self.tokenizer, self.question_text(question), passage)

    def concat_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        return self.layout.concat(self.tokenizer, self.question_text(question), passages)

    def widened(self, passages: int) -> Seq2SeqGenerator:
        limit = min(self.layout.max_combined_length * passages, source_limit(self.model, self.tokenizer))
        if limit <= self.layout.max_combined_length:
            return self
        out = copy.copy(self)
        out.layout = replace(self.layout, max_combined_length=limit)
        return out

    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(a.strip())["input_ids"] for a in answers]

    def _encode(self, prompts: list[str]) -> dict:
        """Token ids and attention mask of the prompts, right-padded, on the model's device."""
        return {k: v.to(self.device) for k, v in self._encode_cpu(prompts).items()}

    def _encode_cpu(self, prompts: list[str]) -> dict:
        if not is_guarded(prompts):
            return dict(self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_source_length,
                                       return_tensors="pt"))
        head, tail = self._special_frame()
        keep = self.max_source_length - len(head) - len(tail)
        rows = [head + self.tokenize_prompt(p)[:keep] + tail for p in prompts]
        ids, attn = pad_rows(rows, self.pad_id, left=False)  # right padding, as the tokenizer pads for an encoder
        return {"input_ids": ids, "attention_mask": attn}

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text (BART: ``<s>`` and ``</s>``)."""
        inner = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        outer = self.tokenizer("x")["input_ids"]
        for i in range(len(outer) - len(inner) + 1):
            if outer[i : i + len(inner)] == inner:
                return outer[:i], outer[i + len(inner) :]
        return [], []

    def _packed(self) -> bool:
        """Whether the encoder runs over packed rows (scoring answers and starting to decode them): unless turned
        off, in training mode (rows sharing one pass would share dropout draws) or where the model does not
        allow it."""
        return self.packed and not self.model.training and packed_encoder.supports(self.model)

    def _encoder_states(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's states (N, S, d) of the padded prompts ``enc`` and their mask (N, S): over packed rows
        (the same token ids, no padding computed) where :meth:`_packed`, else the padded pass."""
        if self._packed():
            return packed_encoder.encode_packed(self.model, [
                ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)])
        hidden = self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        return hidden, enc["attention_mask"]

    def _row_logits(self, prompts: list[str], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, attn = self._encoder_states(self._encode(prompts))
        decoder_inputs = self.model.prepare_decoder_input_ids_from_labels(labels=target.masked_fill(~mask, -100))
        return self.model(encoder_outputs=(hidden,), attention_mask=attn,
                          decoder_input_ids=decoder_inputs).logits  # (N, T, V)

    def start(self, prompts: list[str]) -> tuple[DecodeState, torch.Tensor]:
        hidden, attn = self._encoder_states(self._encode(prompts))  # (N, S, d), (N, S)
        first = torch.full((len(prompts), 1), self.model.config.decoder_start_token_id, dtype=torch.long,
                           device=self.device)
        out = self.model(encoder_outputs=(hidden,), attention_mask=attn, decoder_input_ids=first, use_cache=True)
        state = DecodeState(output_cache(out), attn, None, hidden, torch.arange(len(prompts), device=self.device))
        return state, logprobs.log_softmax(out.logits[:, -1]).cpu()

    def _extend(self, state: DecodeState, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(encoder_outputs=(state.encoder_hidden,), attention_mask=state.attention_mask,
                          decoder_input_ids=tokens, decoder_attention_mask=None, **cache_kwarg(self.model, state.cache),
                          use_cache=True).logits  # padding comes after the real tokens: causal, so harmless

    def advance(self, state: DecodeState, parents: torch.Tensor, tokens: torch.Tensor, top: int | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The encoder side (cross-attention keys and values, encoder states and mask) depends only on the
        prompt a row reads. Beams keep their rows' prompts from step to step (a beam's parent reads the same
        passage), so after the first step only the decoder's self-attention cache is reordered: the far
        larger cross-attention cache (rows x source length) is not copied at every step as in HF."""
        parents, tokens = parents.to(self.device), tokens.to(self.device)
        sources = state.source_rows[parents]  # (N',)
        state.cache.self_attention_cache.reorder_cache(parents)
        if not torch.equal(sources, state.source_rows):
            state.cache.cross_attention_cache.reorder_cache(parents)
            state.attention_mask, state.encoder_hidden = state.attention_mask[parents], state.encoder_hidden[parents]
            state.source_rows = sources
        out = self.model(encoder_outputs=(state.encoder_hidden,), attention_mask=state.attention_mask,
                         decoder_input_ids=tokens[:, None], **cache_kwarg(self.model, state.cache), use_cache=True)
        state.cache = output_cache(out)
        return next_logprobs(out.logits[:, -1], top)
