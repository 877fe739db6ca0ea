"""The decoder-only generator (``AutoModelForCausalLM``): ragline's default back end.

The prompt holds the passage and the question (the tokenizer's chat template when it has one,
:func:`ragline.models.prompts.causal_prompt`); the answer is scored after it. Prompts are prefilled packed
(:mod:`ragline.models.prefill`): no padding computed, shared blocks once, cached passages not at all; the
padded path (left-padded prompts, the answer at the same last positions of every row) remains for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ragline import profile
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models import logprobs
from ragline.models.catalog import generator_path
from ragline.models.decode_cache import decode_cache, is_decode_cache, reorder_tail
from ragline.models.generator import DecodeState, Generator, next_logprobs, pad_rows
from ragline.models.prefill import cache_kwarg, cache_of_mb, output_cache, prefill
from ragline.models.prompts import causal_concat_prompt, causal_prompt, is_guarded
from ragline.models.thorough import Node, PackedPass, PaddedPass, ScoringMemo, asked_steps, continuation_logits
from ragline.vocab import DEFAULT_GENERATOR, DEFAULT_KV_CACHE_MB


def ensure_pad_token(tokenizer, name: str) -> None:
    """Give a tokenizer without a pad token (Llama-style) one: its end-of-sequence token (padding is masked)."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise RaglineError(f"the tokenizer of {name} has no pad, end-of-sequence or unknown token to pad with",
                           "give the tokenizer a pad_token (tokenizer.pad_token = ...) and save it again")
    tokenizer.pad_token = fallback


class CausalGenerator(Generator):
    """Decoder-only generator; the default back end (Qwen2.5-0.5B-Instruct, SmolLM2-135M-Instruct).

    Without gradient, prompts are prefilled packed (:mod:`ragline.models.prefill`): no padding computed, the
    shared system-prompt blocks once, and blocks already in ``kv_cache`` (the system prompt, passages read
    before, ``kv_cache_mb`` MiB of them; 0 turns the cache off) not at all. ``packed=False`` restores the
    padded prefill (what benchmarks/latency.py compares against)."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "causal",
                 kv_cache_mb: float = DEFAULT_KV_CACHE_MB, packed: bool = True) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.packed = packed
        self.kv_cache = cache_of_mb(kv_cache_mb)
        self.tokenizer.padding_side = "left"
        ensure_pad_token(tokenizer, name)
        chat = getattr(tokenizer, "chat_template", None)
        self.use_chat = bool(chat)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if self.use_chat else None
        self.end_id = int(end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id)

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_GENERATOR, dtype: torch.dtype = torch.float32,
             device: str | None = None) -> CausalGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name, path = generator_path(name_or_path)
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(devices.resolve(device))
        model.eval()
        return cls(model, tok, name)

    def prompt(self, question: str, passage: Passage | None) -> str:
        return causal_prompt(self.tokenizer, self.use_chat, question, passage)

    def concat_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        return causal_concat_prompt(self.tokenizer, self.use_chat, question, passages)

    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        lead = "" if self.use_chat else " "
        return [self.tokenizer(lead + a.strip(), add_special_tokens=False)["input_ids"] + [self.end_id]
                for a in answers]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, (N, L) each."""
        return pad_rows(self.prompt_ids(prompts), self.pad_id, left=True)  # as the tokenizer pads

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's token ids (guarded parts as plain text, :meth:`tokenize_prompt`)."""
        if not is_guarded(prompts):
            return self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        return [self.tokenize_prompt(p) for p in prompts]

    def _packed(self) -> bool:
        """Whether this call prefills packed: always, unless turned off, or the model is in training mode
        (dropout: rows sharing a block would share its dropout draw). Under autograd (training) the packed
        pass is differentiable and computes no padding (models/prefill.py)."""
        return self.packed and not self.model.training

    def _prefill(self, rows: list[list[int]], keep_last: list[int] | None = None, states: bool = True):
        if torch.is_grad_enabled():  # training: cached blocks hold no gradient and stale weights
            return prefill(self.model, rows, None, keep_last, states=states)
        if self.kv_cache is not None:
            self.kv_cache.check_weights(self.model)
        return prefill(self.model, rows, self.kv_cache, keep_last, states=states)

    def _row_logits(self, prompts: list[str], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._packed():  # each row is its prompt and its answer but the last token: no padding computed
            lengths = mask.sum(1).tolist()
            rows = [p + target[r, : n - 1].tolist() for r, (p, n) in enumerate(zip(self.prompt_ids(prompts), lengths,
                                                                                  strict=True))]
            right = self._prefill(rows, lengths, states=False).logits  # (N, max n, V), right-aligned
            out = torch.zeros((len(rows), target.shape[1], right.shape[-1]), dtype=right.dtype, device=right.device)
            for r, n in enumerate(lengths):
                out[r, :n] = right[r, right.shape[1] - n :]
            return out  # (N, T, V), zeros at padding
        ids, attn = (x.to(self.device) for x in self.encode_prompts(prompts))  # (N, L), left-padded
        t = target.shape[1]
        full = torch.cat([ids, target], 1)  # (N, L+T): [pads][prompt][answer][answer pads]
        full_attn = torch.cat([attn, mask.long()], 1)
        positions = (full_attn.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=full, attention_mask=full_attn, position_ids=positions, logits_to_keep=t + 1)
        return out.logits[:, :t]  # (N, T, V): position L-1+i predicts answer token i

    def start(self, prompts: list[str]) -> tuple[DecodeState, torch.Tensor]:
        if self._packed():
            pre = self._prefill(self.prompt_ids(prompts))
            return (DecodeState(pre.cache, pre.attention_mask, pre.positions),
                    logprobs.log_softmax(pre.logits[:, -1]).cpu())
        ids, attn = (x.to(self.device) for x in self.encode_prompts(prompts))  # (N, L)
        profile.count(profile.PROMPT_TOKENS, int(attn.sum()))
        profile.count(profile.COMPUTED_TOKENS, attn.numel())
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        state = DecodeState(output_cache(out), attn, positions[:, -1] + 1)
        return state, logprobs.log_softmax(out.logits[:, -1]).cpu()

    def scoring_pass(self, memo: ScoringMemo | None = None) -> PaddedPass:
        """Packed, each target's tokens after its first (which the prefill's logits give), each distinct
        (row, prefix) once, less what ``memo`` holds (:func:`ragline.models.thorough.continuation_logits`)."""
        return PackedPass(memo) if self._packed() else super().scoring_pass(memo)

    def continuation_logprobs(self, state: DecodeState, first: torch.Tensor, rows: torch.Tensor,
                              targets: torch.Tensor, mask: torch.Tensor, memo: ScoringMemo | None = None
                              ) -> torch.Tensor:
        """As :meth:`Generator.continuation_logprobs`; packed, the continuations go in one pass without
        padding (:func:`ragline.models.thorough.continuation_logits`): targets that begin alike under one row
        share their positions, and the output layer and softmax run at computed positions only. With
        ``memo``, the steps and positions earlier calls over ``state`` computed are read from it, not computed
        again, and this call's enter it."""
        if not self._packed():
            return super().continuation_logprobs(state, first, rows, targets, mask, memo)
        lengths = mask.sum(1).tolist()
        lp = first[rows].gather(1, targets[:, :1]).squeeze(1)  # (N,) first target token
        steps: list[Node] = []  # each target's steps after its first token, target after target
        owner: list[int] = []
        asked: dict[Node, tuple[int, list[int], int]] = {}  # a step to compute: (row, prefix, next token)
        for i, n in enumerate(lengths):
            row, y = int(rows[i]), targets[i, :n].tolist()
            steps += [(row, tuple(y[: t + 1])) for t in range(1, n)]
            owner += [i] * (n - 1)
            for t in asked_steps(row, y, memo):
                asked.setdefault((row, tuple(y[: t + 1])), (row, y[:t], y[t]))
        computed: dict[Node, float] = {}
        if asked:
            out = continuation_logits(self.model, state.cache, state.attention_mask, state.positions,
                                      [a[0] for a in asked.values()], [a[1] for a in asked.values()],
                                      None if memo is None else memo.states)  # (S', V): shared positions once
            want = torch.tensor([a[2] for a in asked.values()])  # (A,) the token each asked step predicts
            computed = dict(zip(asked, logprobs.picked_at(out.logits, out.where, want).cpu().tolist(), strict=True))
            if memo is not None:
                memo.logprobs.update(computed)
        if steps:
            step = torch.tensor([computed[s] if s in computed else memo.logprobs[s] for s in steps], dtype=lp.dtype)
            lp = lp.index_add(0, torch.tensor(owner), step)  # (N,) the steps added in order, as one pass would
        return lp

    def _extend(self, state: DecodeState, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = torch.cat([state.attention_mask, mask.long()], 1)
        pos = state.positions[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # (N, T)
        return self.model(input_ids=tokens, attention_mask=attn, position_ids=pos,
                          **cache_kwarg(self.model, state.cache), use_cache=True).logits

    def advance(self, state: DecodeState, parents: torch.Tensor, tokens: torch.Tensor, top: int | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One decoding step. The first moves the prompts' cache into buffers that steps write in place
        (:mod:`ragline.models.decode_cache`); after it, rows that continue one for one (greedy, every row
        still decoding) keep their cache where it is, and rows that follow beams of their own prompts move
        their generated columns only."""
        parents, tokens = parents.to(self.device), tokens.to(self.device)
        attn, pos = state.attention_mask, state.positions
        sources = parents if state.source_rows is None else state.source_rows[parents]  # (N',) prompt of each row
        if state.source_rows is None and (moved := decode_cache(state.cache, parents)) is not None:
            state.cache, attn, pos = moved, attn[parents], pos[parents]  # the prefill's cache is left as it is
            state.source_rows = sources
        elif len(parents) != len(pos) or not torch.equal(parents, torch.arange(len(pos), device=parents.device)):
            if is_decode_cache(state.cache) and torch.equal(sources, state.source_rows):  # False on other lengths
                reorder_tail(state.cache, parents)  # same prompts row for row: mask and positions unchanged
            else:
                state.cache.reorder_cache(parents)  # rows copied: they follow their beams, or leave
                attn, pos = attn[parents], pos[parents]
                state.source_rows = sources
        ones = torch.ones(len(parents), 1, dtype=torch.long, device=self.device)
        attn = torch.cat([attn, ones], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=attn, position_ids=pos[:, None],
                         **cache_kwarg(self.model, state.cache), use_cache=True)
        state.cache, state.attention_mask, state.positions = output_cache(out), attn, pos + 1
        return next_logprobs(out.logits[:, -1], top)  # (N', V), or (N', top) twice

