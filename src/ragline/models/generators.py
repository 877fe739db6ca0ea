"""Generators p_theta(y | x, z): score target sequences for (question, passage) pairs.

Two back ends share one interface, :meth:`Generator.score`, returning full-vocabulary log-probabilities
of each target token, shape (B, K, T, V), for B questions, K passages each, T target positions:

* :class:`CausalGenerator` (decoder-only, ``AutoModelForCausalLM``): the prompt holds the passage and the
  question (the tokenizer's chat template when it has one); the answer is scored after it. Prompts are
  left-padded, so the answer occupies the same last positions in every row and only those positions'
  logits are computed.
* :class:`Seq2SeqGenerator` (encoder-decoder, ``AutoModelForSeq2SeqLM``, BART in the paper): the encoder
  reads Hugging Face RAG's ``prefix + title + title_sep + text + doc_sep + question`` (``" / "`` and
  ``" // "`` unless a RAG checkpoint says otherwise) and the decoder scores the answer.

A passage of ``None`` gives the closed-book prompt (the question alone).
"""

from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ragline import profile
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.models import device as devices
from ragline.models import logprobs
from ragline.models.catalog import generator_path
from ragline.models.decode_cache import decode_cache, is_decode_cache, reorder_tail
from ragline.models.prefill import (
    Node,
    PrefixStates,
    cache_kwarg,
    cache_of_mb,
    continuation_logits,
    continuation_nodes,
    output_cache,
    prefill,
)
from ragline.vocab import DEFAULT_GENERATOR, DEFAULT_KV_CACHE_MB

SYSTEM_PROMPT = "Answer the question using the passage. Reply with the answer only, as briefly as possible."
CLOSED_BOOK_SYSTEM_PROMPT = "Answer the question. Reply with the answer only, as briefly as possible."
CONCAT_SYSTEM_PROMPT = "Answer the question using the passages. Reply with the answer only, as briefly as possible."


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


class PaddedPass:
    """The positions one padded :meth:`Generator.continuation_logprobs` pass computes, counted as (row,
    target) pairs join it: rows x the longest target."""

    def __init__(self) -> None:
        self.rows = self.longest = 0

    @property
    def positions(self) -> int:
        return self.rows * self.longest

    def positions_with(self, row: int, target: Sequence[int]) -> int:
        """The pass's positions if ``target`` (tokens) of ``row`` joined it."""
        return (self.rows + 1) * max(self.longest, len(target))

    def add(self, row: int, target: Sequence[int]) -> None:
        self.rows, self.longest = self.rows + 1, max(self.longest, len(target))

    @staticmethod
    def order(row: int, target: Sequence[int]) -> tuple:
        """The sort key that fills passes best: targets of similar lengths together (little padding)."""
        return (len(target),)


@dataclass
class ScoringMemo:
    """What earlier :meth:`Generator.continuation_logprobs` passes over one prefill state computed, for later
    passes over it: each step's log-probability log p_theta(next | row's prompt, prefix), by (row, prefix +
    (next,)), and the positions' keys and values (:class:`ragline.models.prefill.PrefixStates`)."""

    logprobs: dict[Node, float] = field(default_factory=dict)
    states: PrefixStates = field(default_factory=PrefixStates)


def _asked(row: int, target: Sequence[int], memo: ScoringMemo | None) -> list[int]:
    """The steps t (1 <= t < len) of ``target`` whose log-probability, after its first t tokens, a packed pass
    computes: those ``memo`` does not hold."""
    return [t for t in range(1, len(target)) if memo is None or (row, tuple(target[: t + 1])) not in memo.logprobs]


class PackedPass(PaddedPass):
    """A packed pass (:meth:`CausalGenerator.continuation_logprobs`): the positions after which a target's
    steps are not in ``memo`` are computed, with the earlier ones of theirs that ``memo`` does not hold, each
    distinct (row, prefix) once (:func:`ragline.models.prefill.continuation_nodes`)."""

    def __init__(self, memo: ScoringMemo | None = None) -> None:
        super().__init__()
        self.memo, self.nodes = memo, set()
        self._last: tuple[tuple[int, tuple[int, ...]], set[Node]] | None = None  # positions_with's, for add

    def _new(self, row: int, target: Sequence[int]) -> set[Node]:
        """The nodes ``target`` of ``row`` would add to the pass (worked out once for positions_with, then
        add: the planner asks both of each item)."""
        key = (row, tuple(target))
        if self._last is None or self._last[0] != key:
            prefixes = [target[:t] for t in _asked(row, target, self.memo)]
            states = None if self.memo is None else self.memo.states
            self._last = key, continuation_nodes(row, prefixes, states) - self.nodes
        return self._last[1]

    @property
    def positions(self) -> int:
        return len(self.nodes)

    def positions_with(self, row: int, target: Sequence[int]) -> int:
        return len(self.nodes) + len(self._new(row, target))

    def add(self, row: int, target: Sequence[int]) -> None:
        self.nodes |= self._new(row, target)
        self._last = None  # the pass has grown: what the next target adds is worked out afresh

    @staticmethod
    def order(row: int, target: Sequence[int]) -> tuple:
        """Each row's targets together, in token order: those that begin alike are next to each other."""
        return (row, tuple(target))


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
        text = text.replace(USER_OPEN, "").replace(USER_CLOSE, "")
        if any(tok in text for tok in _added_tokens(self.tokenizer)):
            return f"{USER_OPEN}{text}{USER_CLOSE}"
        return text

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Ids of a prompt whose guarded parts (:meth:`guard`) are tokenised as plain text: a special token's
        string there is its characters, never the token (no chat role can be injected)."""
        ids: list[int] = []
        for i, part in enumerate(re.split(f"[{USER_OPEN}{USER_CLOSE}]", prompt)):
            if part:
                ids += self.tokenizer(part, add_special_tokens=False, split_special_tokens=i % 2 == 1)["input_ids"]
        return ids

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
        ``top`` each row's ``top`` best log-probs and their tokens, (N', top) each (:func:`_next_logprobs`)."""

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
        todo = [i for i, n in enumerate(lengths) if n > 1 and _asked(int(rows[i]), ids[i], memo)]  # (N',)
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
        _check_shapes(questions, passages)
        return [self.prompt(q, z) for q, zs in zip(questions, passages, strict=True) for z in zs]

    def score(self, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]],
              answers: Sequence[str] | Sequence[Sequence[int]]) -> Scored:
        """Full-vocabulary log-probabilities of ``answers[b]`` (text or token ids) given ``questions[b]``
        and each of ``passages[b]`` (K each): for training, where label smoothing needs all V."""
        k = _check_shapes(questions, passages, answers)
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
        k = _check_shapes(questions, passages, answers)
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


def _next_logprobs(logits: torch.Tensor, top: int | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A step's next-token log-probs from its logits (N', V), on the CPU: all of them (N', V), or with ``top``
    each row's best ``top`` and their tokens, (N', top) each (beam search ranks no more)."""
    if top is None:
        return logprobs.log_softmax(logits).cpu()
    values, tokens = logprobs.top(logits, top)
    return values.cpu(), tokens.cpu()


def _check_shapes(questions: Sequence[str], passages: Sequence[Sequence], answers: Sequence | None = None) -> int:
    if not (len(questions) == len(passages) == len(questions if answers is None else answers)) or not questions:
        raise RaglineError("questions, passages and answers must be non-empty lists of one length",
                           "pass one passage list and one answer per question")
    k = len(passages[0])
    if k == 0 or any(len(p) != k for p in passages):
        raise RaglineError("every question needs the same number of passages (k >= 1)",
                           "retrieve the same k for each question; use [None] for closed book")
    return k


USER_OPEN, USER_CLOSE = "\ue000", "\ue001"  # private-use marks around guarded user text (never in output)


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one width on the left or the right: (ids, attention mask), each (N, L)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attn[i, span] = 1
    return ids, attn


def _rag_title(title: str) -> str:
    """A title as Hugging Face RAG puts it in a prompt: without a surrounding pair of double quotes."""
    return title.removeprefix('"').removesuffix('"')


def _source_limit(model: torch.nn.Module, tokenizer) -> int:
    """The longest input an encoder takes: its position table (BART), else the tokenizer's limit (T5's relative
    positions have none; 4096 caps a tokenizer that names no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 4096
    return int(min(positions, limit) if positions else limit)


def _added_tokens(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer reads as single special or added tokens."""
    cached = getattr(tokenizer, "_ragline_added", None)
    if cached is None:
        cached = tuple(t for t in set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens) if t)
        tokenizer._ragline_added = cached
    return cached


def _ensure_pad_token(tokenizer, name: str) -> None:
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
        _ensure_pad_token(tokenizer, name)
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
        question = self.guard(question)
        title, text = (self.guard(passage.title), self.guard(passage.text)) if passage is not None else ("", "")
        if not self.use_chat:
            ctx = f"{title} / {text} // " if passage is not None else ""
            return f"{ctx}{question}\nAnswer:"
        user = f"Question: {question}" if passage is None else f"Passage: {title}: {text}\nQuestion: {question}"
        system = SYSTEM_PROMPT if passage is not None else CLOSED_BOOK_SYSTEM_PROMPT
        return self.tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": user}],
                                                  tokenize=False, add_generation_prompt=True)

    def concat_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        question = self.guard(question)
        blocks = "\n".join(f"[{i}] {self.guard(z.title)}: {self.guard(z.text)}" for i, z in enumerate(passages, 1))
        if not self.use_chat:
            return f"{blocks}\n// {question}\nAnswer:"
        user = f"Passages:\n{blocks}\nQuestion: {question}"
        return self.tokenizer.apply_chat_template([{"role": "system", "content": CONCAT_SYSTEM_PROMPT},
                                                   {"role": "user", "content": user}],
                                                  tokenize=False, add_generation_prompt=True)

    def target_ids(self, answers: Sequence[str]) -> list[list[int]]:
        lead = "" if self.use_chat else " "
        return [self.tokenizer(lead + a.strip(), add_special_tokens=False)["input_ids"] + [self.end_id]
                for a in answers]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, (N, L) each."""
        return _pad(self.prompt_ids(prompts), self.pad_id, left=True)  # as the tokenizer pads

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's token ids (guarded parts as plain text, :meth:`tokenize_prompt`)."""
        if not any(USER_OPEN in p for p in prompts):
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
        (row, prefix) once, less what ``memo`` holds (:func:`ragline.models.prefill.continuation_logits`)."""
        return PackedPass(memo) if self._packed() else super().scoring_pass(memo)

    def continuation_logprobs(self, state: DecodeState, first: torch.Tensor, rows: torch.Tensor,
                              targets: torch.Tensor, mask: torch.Tensor, memo: ScoringMemo | None = None
                              ) -> torch.Tensor:
        """As :meth:`Generator.continuation_logprobs`; packed, the continuations go in one pass without
        padding (:func:`ragline.models.prefill.continuation_logits`): targets that begin alike under one row
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
            for t in _asked(row, y, memo):
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
        return _next_logprobs(out.logits[:, -1], top)  # (N', V), or (N', top) twice


@dataclass(frozen=True)
class Seq2SeqPrompt:
    """How a seq2seq generator's input is laid out: Hugging Face RAG's ``RagConfig`` fields (its defaults
    unless a RAG checkpoint gives its own) and the generator config's ``prefix``."""

    title_sep: str = " / "
    doc_sep: str = " // "
    prefix: str = ""
    max_combined_length: int = 300


PROMPT_FILE = "ragline_generator.json"  # beside a saved seq2seq generator: its Seq2SeqPrompt
QUESTION_TOKENIZER = "question_tokenizer"  # ... and the question encoder's tokenizer it reads questions through


class Seq2SeqGenerator(Generator):
    """Encoder-decoder generator (BART/T5 family), as in the paper.

    ``question_tokenizer``, when given (a RAG checkpoint's question encoder tokenizer), rewrites each question
    as Hugging Face's ``RagRetriever`` hands it to the generator: tokenised by the question encoder's tokenizer
    and decoded back (BERT uncased lower-cases it), which is the text RAG checkpoints were trained on."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "seq2seq", layout: Seq2SeqPrompt | None = None,
                 question_tokenizer=None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.layout = layout or Seq2SeqPrompt(prefix=getattr(model.config, "prefix", None) or "")
        self.question_tokenizer = question_tokenizer

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
        """Hugging Face RAG's ``prefix + title + title_sep + text + doc_sep + question`` with double spaces made
        single and the title's surrounding quotes dropped, as its ``RagRetriever`` builds it (user and corpus
        text guarded); closed book reads ``prefix + question``."""
        lay = self.layout
        question = self.guard(self.question_text(question))
        if passage is None:
            return (lay.prefix + question).replace("  ", " ")
        return (lay.prefix + self.guard(_rag_title(passage.title)) + lay.title_sep + self.guard(passage.text)
                + lay.doc_sep + question).replace("  ", " ")

    def concat_prompt(self, question: str, passages: Sequence[Passage]) -> str:
        """``prefix + [1] title title_sep text [2] ... doc_sep question``: Hugging Face RAG's layout with the
        passages numbered one after another."""
        lay = self.layout
        question = self.guard(self.question_text(question))
        docs = " ".join(f"[{i}] {self.guard(_rag_title(z.title))}{lay.title_sep}{self.guard(z.text)}"
                        for i, z in enumerate(passages, 1))
        return (lay.prefix + docs + lay.doc_sep + question).replace("  ", " ")

    def widened(self, passages: int) -> Seq2SeqGenerator:
        limit = min(self.layout.max_combined_length * passages, _source_limit(self.model, self.tokenizer))
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
        if not any(USER_OPEN in p for p in prompts):
            return dict(self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_source_length,
                                       return_tensors="pt"))
        head, tail = self._special_frame()
        keep = self.max_source_length - len(head) - len(tail)
        rows = [head + self.tokenize_prompt(p)[:keep] + tail for p in prompts]
        ids, attn = _pad(rows, self.pad_id, left=False)  # right padding, as the tokenizer pads for an encoder
        return {"input_ids": ids, "attention_mask": attn}

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text (BART: ``<s>`` and ``</s>``)."""
        inner = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        outer = self.tokenizer("x")["input_ids"]
        for i in range(len(outer) - len(inner) + 1):
            if outer[i : i + len(inner)] == inner:
                return outer[:i], outer[i + len(inner) :]
        return [], []

    def _row_logits(self, prompts: list[str], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self._encode(prompts)
        decoder_inputs = self.model.prepare_decoder_input_ids_from_labels(labels=target.masked_fill(~mask, -100))
        return self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          decoder_input_ids=decoder_inputs).logits  # (N, T, V)

    def start(self, prompts: list[str]) -> tuple[DecodeState, torch.Tensor]:
        enc = self._encode(prompts)
        hidden = self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        first = torch.full((len(prompts), 1), self.model.config.decoder_start_token_id, dtype=torch.long,
                           device=self.device)
        out = self.model(encoder_outputs=(hidden,), attention_mask=enc["attention_mask"], decoder_input_ids=first,
                         use_cache=True)
        state = DecodeState(output_cache(out), enc["attention_mask"], None, hidden,
                            torch.arange(len(prompts), device=self.device))
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
        return _next_logprobs(out.logits[:, -1], top)
