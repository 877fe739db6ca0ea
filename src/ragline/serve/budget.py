"""What a request asks of the model and the budget that bounds it: torch-free, so the CLI reads its defaults
without loading a model."""

from __future__ import annotations

from dataclasses import dataclass

from ragline import vocab
from ragline.errors import RaglineError

# Bounds on the fields of one request, for every protocol (native, OpenAI-compatible, MCP).
MAX_QUESTION_CHARS = 1000
MAX_K = 20
MAX_BEAMS = 8
MAX_NEW_TOKENS = 128
MAX_BODY_BYTES = 4 * 2**20  # a request body: room for 256 texts to embed, or a long conversation
MAX_FILTERS = 16  # metadata conditions on one request (index/filters.py)
MAX_FILTER_CHARS = 1000


def check_filters(specs: list[str] | None) -> tuple[str, ...]:
    """A request's ``filter`` conditions, checked (:mod:`ragline.index.filters`); ValueError names the bad one."""
    from ragline.index.filters import Condition

    specs = list(specs or [])
    if len(specs) > MAX_FILTERS:
        raise ValueError(f"at most {MAX_FILTERS} filter conditions")
    for s in specs:
        if not isinstance(s, str) or len(s) > MAX_FILTER_CHARS:
            raise ValueError(f"a filter condition is text of at most {MAX_FILTER_CHARS} characters")
        try:
            Condition.parse(s)
        except RaglineError as e:
            raise ValueError(str(e)) from None
    return tuple(specs)


def settings_k(model: str, k: int | None, default_k: int) -> int:
    """The k a request's settings hold: the one asked, else the server's; 1 for closed book (one row, no
    passage), so closed-book requests batch together whatever k they named."""
    return 1 if model == vocab.CLOSED_BOOK else k or default_k


@dataclass(frozen=True)
class Settings:
    """What a request asks of the model; requests with equal settings can share a batch."""

    model: str
    decoding: str | None
    k: int
    mode: str
    beams: int
    max_new_tokens: int
    n_best: int = 1  # answers returned, best first (at most beams)
    filters: tuple[str, ...] = ()  # metadata conditions on the passages retrieved (index/filters.py)

    @property
    def rows(self) -> int:
        """Generator rows decoding runs at once: a beam per passage (RAG-Sequence, RAG-Token), or per question
        (concat, fid, closed book); greedy decoding keeps one."""
        beams = 1 if (self.decoding or vocab.default_decoding(self.model)) == vocab.GREEDY else self.beams
        return beams * (self.k if self.model in vocab.RAG_MODELS else 1)

    @property
    def passages_per_row(self) -> int:
        """Passages one row reads: k for concat and fid, none for closed book, else one."""
        return {vocab.CONCAT: self.k, vocab.FID: self.k, vocab.CLOSED_BOOK: 0}.get(self.model, 1)


class Busy(RaglineError):
    """The queue is full: the request is refused now (503) rather than left to wait without bound."""

    retry_after = 5


class TooLarge(RaglineError):
    """A request whose work exceeds the budget (413)."""


@dataclass(frozen=True)
class Budget:
    """Bounds on the work of one request and of one batch, in generator tokens: rows x (prompt + new tokens),
    with each passage counted as ``passage_tokens`` (a 100-word passage with its title and the template);
    this is what the key/value cache and the activations grow with. At most ``max_running`` batches, each with
    other settings, are decoded at once (their caches held together), taking turns on the model step by step."""

    max_request_tokens: int = 24_576
    max_batch_tokens: int = 98_304
    max_queue: int = 64
    max_running: int = 2  # batches (of different settings) decoded at once, taking turns step by step
    max_question_tokens: int = 256
    passage_tokens: int = 256

    def cost(self, s: Settings, question_tokens: int) -> int:
        return s.rows * (question_tokens + s.passages_per_row * self.passage_tokens + s.max_new_tokens)

    def check(self, s: Settings, question_tokens: int) -> int:
        """The request's cost, or a refusal naming the limit and what to lower."""
        if question_tokens > self.max_question_tokens:
            raise TooLarge(f"the question is {question_tokens} tokens long; this server takes at most "
                           f"{self.max_question_tokens}", "ask a shorter question")
        cost = self.cost(s, question_tokens)
        if cost > self.max_request_tokens:
            raise TooLarge(f"the request needs {s.rows} generator rows x {cost // s.rows} tokens = {cost} tokens; "
                           f"this server takes at most {self.max_request_tokens} per request",
                           "lower k, beams or max_new_tokens (or use greedy decoding)")
        return cost
