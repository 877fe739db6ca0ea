"""The generator interface p_theta(y | x, z): prompts, scoring, prefill and cached decoding steps.

Two back ends implement it: :class:`ragline.models.causal.CausalGenerator` (decoder-only) and
:class:`ragline.models.seq2seq.Seq2SeqGenerator` (encoder-decoder, BART in the paper). Readers (RAG-Sequence,
RAG-Token, concatenated, FiD) work through this interface and never branch on the back end. :meth:`score`
returns full-vocabulary log-probabilities of each target token, shape (B, K, T, V), for B questions, K
passages each, T target positions; a passage of ``None`` gives the closed-book prompt (the question alone).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models import logprobs
from ragline.models.prompts import guard, tokenize_guarded
from ragline.models.thorough import PaddedPass, ScoringMemo, asked_steps


@dataclass
class DecodeState:
    """Rows being decoded (one per question x passage x beam) and the model's cache for them."""
    cache: object
    attention_mask: torch.Tensor        # (N, L) decoder-only: prompt + generated; seq2seq: encoder mask
    positions: torch.Tensor | None      # (N,) next position id (decoder-only)
    encoder_hidden: torch.Tensor | None = None  # (N, S, H) seq2seq
    source_rows: torch.Tensor | None = None     # (N,) the prompt each row reads (seq2seq: its encoder states)


@dataclass
class Scored:
    """Per-passage token log-probabilities of target answers (what the RAG likelihoods marginalise)."""

    logprobs: torch.Tensor  # (B, K, T, V) log p_theta(y_t = v | x, z_k, y_<t)
    target: torch.Tensor    # (B, T) target token ids (pad_id where mask is False)
    mask: torch.Tensor      # (B, T) bool: real target positions

class Generator(ABC):
    """A generator back end (causal or seq2seq): prompts, scoring, prefill and cached steps."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def device(self) -> torch.device:
        """Where the model runs; inputs move there, and start/advance return their log-probs on the CPU."""
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def guard(self, text: str) -> str:
        """User or corpus text for a prompt: when it holds a string the tokenizer would read as a special or
        added token (``<|im_start|>``, ``</s>``), it is marked so that :meth:`tokenize_prompt` reads it as
        plain text; other text is left as it is (and tokenised exactly as before)."""
        return guard(self.tokenizer, text)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Ids of a prompt whose guarded parts (:meth:`guard`) are tokenised as plain text: a special token's
        string there is its characters, never the token (no chat role can be injected)."""
        return tokenize_guarded(self.tokenizer, prompt)

    def save(self, path: Path, model: torch.nn.Module | None = None) -> None:
        """Write the generator (``model`` in place of its own, e.g. with LoRA merged) as a folder that
        ``--generator PATH`` loads back with the same prompts."""
        (model or self.model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @abstractmethod
    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """Token ids the model must produce for each answer, ending with its end-of-answer token."""

    @abstractmethod
    def prompt(self, question: str, passage: Passage | None) -> str:
        """The generator's input text for one (question, passage) pair."""

    @abstractmethod
    def concat_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        """The input text that reads all ``passages``, numbered [1], [2], ..., before the question (the
        concatenated-context reader)."""

    def widened(self, passages: int) -> Generator:
        """This generator for prompts holding ``passages`` passages at once (a seq2seq encoder's input limit
        grows with them, up to the model's own); the weights are shared."""
        return self

    @abstractmethod
    def _row_logits(self, prompts: list[str], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of each target position for rows (prompt, target): (N, T, V)."""

    @abstractmethod
    def start(self, prompts: list[str]) -> tuple[DecodeState, torch.Tensor]:
        """Read the prompts (N rows); return the decode state and next-token log-probs (N, V)."""

    @abstractmethod
    def advance(self, state: DecodeState, parents: torch.Tensor, tokens: torch.Tensor, top: int | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Continue rows ``parents`` (N',) of ``state`` (rows may repeat: beams share a prefix) with one token
        each, ``tokens`` (N',); the state now holds N' rows. Returns next-token log-probs (N', V), or with
        ``top`` each row's ``top`` best log-probs and their tokens, (N', top) each (:func:`next_logprobs`)."""

    def fork(self, state: DecodeState, rows: torch.Tensor) -> DecodeState:
        """An independent state holding copies of rows ``rows`` (N',) of ``state`` (which is left as is)."""
        if hasattr(state.cache, "self_attention_cache"):  # encoder-decoder: fork both halves
            cache = copy.copy(state.cache)
            cache.self_attention_cache = self._fork_cache(state.cache.self_attention_cache)
            cache.cross_attention_cache = self._fork_cache(state.cache.cross_attention_cache)
            cache.is_updated = dict(state.cache.is_updated)
        else:
            cache = self._fork_cache(state.cache)
        rows = rows.to(state.attention_mask.device)
        cache.reorder_cache(rows)  # index_select: new tensors, the original cache is untouched
        return DecodeState(cache, state.attention_mask[rows],
                           None if state.positions is None else state.positions[rows],
                           None if state.encoder_hidden is None else state.encoder_hidden[rows],
                           None if state.source_rows is None else state.source_rows[rows])

    @staticmethod
    def _fork_cache(cache):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in cache.layers]
        return out

    @abstractmethod
    def _extend(self, state: DecodeState, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (N, T) after each row's cached prefix (padding where ``mask`` is False);
        returns the logits after each fed token, (N, T, V). The state is consumed."""

    def scoring_pass(self, memo: ScoringMemo | None = None) -> PaddedPass:
        """An empty :meth:`continuation_logprobs` pass (after the passes ``memo`` holds), counting the positions
        it computes as targets join it."""
        return PaddedPass()

    def scoring_positions(self, targets: Sequence[tuple[int, Sequence[int]]], memo: ScoringMemo | None = None
                          ) -> int:
        """Positions one :meth:`continuation_logprobs` pass computes for ``targets``, (row, tokens) pairs."""
        plan = self.scoring_pass(memo)
        for row, tokens in targets:
            plan.add(row, tokens)
        return plan.positions

    def continuation_logprobs(self, state: DecodeState, first: torch.Tensor, rows: torch.Tensor,
                              targets: torch.Tensor, mask: torch.Tensor, memo: ScoringMemo | None = None
                              ) -> torch.Tensor:
        """log p_theta(y | prefix) for continuations ``targets`` (N, T) of the cached prefixes ``rows`` of a
        prefill ``state`` whose next-token log-probs were ``first`` (rows, V): (N,). Only the targets' own
        tokens are computed; the prompts are read from the cache. ``memo`` carries what one call computed to
        the next calls over the same ``state``: here a target with a step ``memo`` does not hold is computed
        whole, and its steps' log-probs enter ``memo``; one whose every step it holds is read from it."""
        lp = first[rows].gather(1, targets[:, :1]).squeeze(1)  # (N,) first target token
        lengths = mask.sum(1).tolist()
        ids = [targets[i, :n].tolist() for i, n in enumerate(lengths)]
        todo = [i for i, n in enumerate(lengths) if n > 1 and asked_steps(int(rows[i]), ids[i], memo)]  # (N',)
        for i in set(range(len(ids))) - set(todo):  # every step known (or none to take)
            steps = [memo.logprobs[(int(rows[i]), tuple(ids[i][: t + 1]))] for t in range(1, lengths[i])]
            lp[i] += torch.tensor(steps, dtype=lp.dtype).sum()
        if todo:
            sel = torch.tensor(todo)
            t_, m_ = targets[sel].to(self.device), mask[sel].to(self.device)
            logits = self._extend(self.fork(state, rows[sel]), t_[:, :-1], m_[:, :-1])  # (N', T-1, V)
            steps = logprobs.picked(logits, t_[:, 1:]) * m_[:, 1:]  # (N', T-1)
            lp[sel] += steps.sum(-1).cpu()
            if memo is not None:
                for j, i in enumerate(todo):
                    memo.logprobs.update({(int(rows[i]), tuple(ids[i][: t + 1])): v
                                          for t, v in enumerate(steps[j].tolist()[: lengths[i] - 1], 1)})
        return lp

    def pair_prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]]) -> list[str]:
        """Prompts of every (question, passage) pair, question-major: row b*K + k."""
        check_shapes(questions, passages)
        return [self.prompt(q, z) for q, zs in zip(questions, passages, strict=True) for z in zs]

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]],
              answers: Sequence[str] | Sequence[Sequence[int]]) -> Scored:
        """Full-vocabulary log-probabilities of ``answers[b]`` (text or token ids) given ``questions[b]``
        and each of ``passages[b]`` (K each): for training, where label smoothing needs all V."""
        k = check_shapes(questions, passages, answers)
        target, mask = self._targets(answers)  # (B, T)
        target, mask = target.to(self.device), mask.to(self.device)
        logits = self._row_logits(self.pair_prompts(questions, passages), target.repeat_interleave(k, 0),
                                  mask.repeat_interleave(k, 0))  # (B*K, T, V)
        full = torch.log_softmax(logits.float(), -1)  # with gradient (training): not chunked
        return Scored(full.view(len(questions), k, target.shape[1], -1), target, mask)

    def target_logprobs(self, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]],
                        answers: Sequence[str] | Sequence[Sequence[int]], rows_per_pass: int = 16
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log p_theta(y_t | x, z_k, y_<t) of the answer tokens only, (B, K, T) (0 at padding), with target
        and mask (B, T); computed ``rows_per_pass`` (question, passage) rows at a time, so the (rows, T, V)
        logits stay small whatever the vocabulary."""
        k = check_shapes(questions, passages, answers)
        target, mask = self._targets(answers)
        prompts = self.pair_prompts(questions, passages)
        rep_t, rep_m = target.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)  # (B*K, T)
        out = []
        for lo in range(0, len(prompts), rows_per_pass):
            sl = slice(lo, lo + rows_per_pass)
            t, m = rep_t[sl].to(self.device), rep_m[sl].to(self.device)
            logits = self._row_logits(prompts[sl], t, m)  # (n, T, V)
            out.append((logprobs.picked(logits, t) * m).cpu())
        return torch.cat(out).view(len(questions), k, -1), target, mask

    def _targets(self, answers: Sequence[str] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [list(a) for a in answers] if answers and not isinstance(answers[0], str) else self.target_ids(answers)
        if any(len(row) == 0 for row in ids):
            raise RaglineError("an answer has no tokens", "give non-empty answers")
        t = max(map(len, ids))
        target = torch.full((len(ids), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.bool)
        for b, row in enumerate(ids):
            target[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
        return target, mask  # (B, T) each


def next_logprobs(logits: torch.Tensor, top: int | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A step's next-token log-probs from its logits (N', V), on the CPU: all of them (N', V), or with ``top``
    each row's best ``top`` and their tokens, (N', top) each (beam search ranks no more)."""
    if top is None:
        return logprobs.log_softmax(logits).cpu()
    values, tokens = logprobs.top(logits, top)
    return values.cpu(), tokens.cpu()


def check_shapes(questions: Sequence[str], passages: Sequence[Sequence], answers: Sequence | None = None) -> int:
    """K, the passages per question, after refusing lists of different lengths or uneven passage lists."""
    if not (len(questions) == len(passages) == len(questions if answers is None else answers)) or not questions:
        raise RaglineError("questions, passages and answers must be non-empty lists of one length",
                           "pass one passage list and one answer per question")
    k = len(passages[0])
    if k == 0 or any(len(p) != k for p in passages):
        raise RaglineError("every question needs the same number of passages (k >= 1)",
                           "retrieve the same k for each question; use [None] for closed book")
    return k


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one width on the left or the right: (ids, attention mask), each (N, L)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attn[i, span] = 1
    return ids, attn

