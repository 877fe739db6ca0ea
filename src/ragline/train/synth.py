"""``ragline synth``: training questions synthesised from an index's own passages (as InPars, Promptagator and
sentence-transformers' query generation do), for a corpus that has few or no labelled questions.

For each sampled passage z the generator writes a question x and a short answer y (``Question: ...`` /
``Answer: ...``). A pair is kept only when every chosen filter passes, tried in this order (the first that
fails is the one counted in the statistics):

    format     the reply holds a question and an answer
    span       y is at most ``max_answer_words`` words and, normalised, a run of words of z
    leak       x does not contain y (normalised)
    copy       x is not a near-copy of z: its longest run of words found in z is under COPY_SHARE of x, or
               under COPY_WORDS words (a short question may copy a name and a verb)
    dedup      no earlier question of the file is the same once normalised
    roundtrip  searching x finds z in the top ``roundtrip_k`` (round-trip consistency, as Promptagator filters)
    reader     the reader given z alone answers x with y: the two answers, normalised, are equal or one is a
               run of words of the other ("Zhang Zeduan" and "painter Zhang Zeduan")

The output is JSONL that ``train rag`` and ``train retriever`` read unchanged: ``id`` (``synth-`` + the passage
id, one question per passage), ``question``, ``answers``, ``positive`` (the passage id) and ``title``.

Passages are sampled across documents: the documents in a seeded random order, one passage of each per round
(a seeded random one), so the first N questions come from up to N different documents, not the first pages.

Resumable: ``FILE.synth.json`` records the settings, the passages tried and the file's length after each
batch, written atomically after the batch's lines are flushed to disk. A rerun with the same settings
truncates the file to that length and continues with the next passage; other settings are refused. The
number of questions is a goal, not a setting: a rerun with a larger ``--questions`` adds to the file.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ragline import atomic, vocab
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.questions.normalise import normalise

if TYPE_CHECKING:
    import numpy as np

FORMAT, SPAN, LEAK, COPY, DEDUP, ROUNDTRIP, READER = "format", "span", "leak", "copy", "dedup", "roundtrip", "reader"
FILTERS = (SPAN, LEAK, COPY, DEDUP, ROUNDTRIP, READER)  # what --filter picks; format always applies
COPY_SHARE = 0.75       # a question whose longest run of words copied from its passage is this share of it
COPY_WORDS = 5          # ... and at least this many words is a near-copy
MIN_PASSAGE_WORDS = 20  # shorter passages (a page's last few words) are not asked about
TRIES_PER_QUESTION = 8  # passages tried per question wanted, at most, before giving up
STATE_SUFFIX = ".synth.json"
ID_PREFIX = "synth-"

SYSTEM_PROMPT = ("You write quiz questions. Given a passage, write one factual question that the passage answers "
                 "and its answer, a name, number, date or short phrase of at most five words copied from the "
                 "passage. The question must make sense without the passage. Reply in exactly two lines:\n"
                 "Question: <the question>\nAnswer: <the answer>")
EXAMPLE = Passage("example#0", "example", "Eiffel Tower",
                  "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
                  "Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
EXAMPLE_REPLY = "Question: Whose company designed and built the Eiffel Tower?\nAnswer: Gustave Eiffel"

Generate = Callable[[list[Passage]], list[str]]                    # passages -> the generator's replies
Answer = Callable[[list[str], list[Passage]], list[str]]           # (questions, their passages) -> answers
Search = Callable[[list[str], int], list[list[int]]]               # (questions, k) -> top-k rows of each


@dataclass(frozen=True)
class SynthConfig:
    """The settings that decide what ``ragline synth`` writes (recorded beside the file; a rerun must match)."""

    generator: str = vocab.DEFAULT_GENERATOR
    seed: int = 0
    filters: tuple[str, ...] = FILTERS
    roundtrip_k: int = 5
    mode: str = vocab.DEFAULT_MODE      # the round trip's retrieval
    max_answer_words: int = 5
    max_new_tokens: int = 64
    precision: str = vocab.DEFAULT_PRECISION

    def check(self) -> None:
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown:
            raise RaglineError(f"unknown synth filter {unknown[0]!r}", f"use --filter with {', '.join(FILTERS)}")
        if self.roundtrip_k < 1 or self.max_answer_words < 1 or self.max_new_tokens < 8:
            raise RaglineError("--roundtrip-k and --max-answer-words must be at least 1, --max-new-tokens 8",
                               "pass larger values")


@dataclass
class SynthStats:
    """What a synth run did: the passages tried, the replies generated and each filter's drops."""

    questions: int = 0
    passages_tried: int = 0
    short_passages: int = 0
    generated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {f: 0 for f in (FORMAT, *FILTERS)})
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --- prompts and replies ------------------------------------------------------------------------------------

def question_prompt(generator, passage: Passage) -> str:
    """The generator's input asking for a question about ``passage`` (its chat template with one worked
    example when it has one, else plain text ending in ``Question:``). Passage text is guarded: a special
    token's string in it stays text."""
    title, text = generator.guard(passage.title), generator.guard(passage.text)
    if getattr(generator, "use_chat", False):
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"Passage: {EXAMPLE.title}: {EXAMPLE.text}"},
                    {"role": "assistant", "content": EXAMPLE_REPLY},
                    {"role": "user", "content": f"Passage: {title}: {text}"}]
        return generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{SYSTEM_PROMPT}\n\nPassage: {EXAMPLE.title}: {EXAMPLE.text}\n{EXAMPLE_REPLY}\n\n"
            f"Passage: {title}: {text}\n")


_REPLY = re.compile(r"question\s*:\s*(?P<q>.+?)\s*(?:\n|\s)answer\s*:\s*(?P<a>[^\n]+)", re.IGNORECASE | re.DOTALL)


def parse_reply(reply: str) -> tuple[str, str] | None:
    """(question, answer) from ``Question: ...`` / ``Answer: ...``, or None when the reply holds no such pair."""
    m = _REPLY.search(reply)
    if m is None:
        return None
    question = " ".join(m["q"].split())
    answer = " ".join(m["a"].split()).strip(" .\"'")
    if not question or not answer:
        return None
    return (question if question.endswith("?") else question + "?"), answer


# --- the filters that need no model -------------------------------------------------------------------------

def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def is_span(answer: str, passage: str, max_words: int) -> bool:
    """Whether ``answer`` is at most ``max_words`` words and, normalised, a run of words of ``passage``."""
    words = normalise(answer).split()
    return 0 < len(words) <= max_words and _contains(normalise(passage).split(), words)


def leaks(question: str, answer: str) -> bool:
    """Whether the question contains the answer (normalised)."""
    return _contains(normalise(question).split(), normalise(answer).split())


def agrees(said: str, answer: str) -> bool:
    """Whether the reader's answer ``said`` agrees with ``answer``: normalised, one is a run of words of the other."""
    a, b = normalise(said).split(), normalise(answer).split()
    return _contains(a, b) or _contains(b, a)


def is_copy(question: str, passage: str) -> bool:
    """Whether the question is a near-copy of the passage: its longest run of words (normalised) found in the
    passage is at least COPY_SHARE of it and at least COPY_WORDS words."""
    q, p = normalise(question).split(), normalise(passage).split()
    best = 0
    for i in range(len(q)):  # the longest j - i with q[i:j] in p; questions are short
        for j in range(len(q), i + best, -1):
            if _contains(p, q[i:j]):
                best = j - i
                break
    return best >= COPY_WORDS and best >= COPY_SHARE * len(q)


# --- passage order ------------------------------------------------------------------------------------------

def passage_order(doc_ids: Sequence[str], seed: int, alive: np.ndarray | None = None) -> np.ndarray:
    """Rows in the order passages are tried: documents in a seeded random order, one (random) passage of each
    per round, so consecutive passages come from different documents. Deleted rows (``alive`` False) never."""
    import numpy as np

    rng = np.random.default_rng(seed)
    _, doc = np.unique(np.asarray(doc_ids, dtype=object), return_inverse=True)  # (rows,) document number
    doc_rank = rng.permutation(int(doc.max()) + 1 if len(doc) else 0)[doc]       # (rows,) the document's turn
    priority = rng.random(len(doc))                                              # order within a document
    by_doc = np.lexsort((priority, doc))
    round_of = np.empty(len(doc), dtype=np.int64)  # the passage's place among its document's passages
    starts = np.r_[0, np.flatnonzero(np.diff(doc[by_doc])) + 1]
    round_of[by_doc] = np.arange(len(doc)) - np.repeat(starts, np.diff(np.r_[starts, len(doc)]))
    order = np.lexsort((doc_rank, round_of))
    return order if alive is None else order[alive[order]]


# --- the run ------------------------------------------------------------------------------------------------

class Synthesiser:
    """Synthesises questions into ``out`` from the passages of ``store`` (``len``, ``get(rows)``, ``values``),
    with ``generate`` writing replies, ``search`` for the round trip and ``answer`` for the reader filter
    (each batched; :func:`model_functions` makes them from a generator and a retriever)."""

    def __init__(self, cfg: SynthConfig, out: Path, store, index_fingerprint: str, generate: Generate,
                 search: Search | None, answer: Answer | None, alive: np.ndarray | None = None,
                 batch_size: int = 8) -> None:
        cfg.check()
        if ROUNDTRIP in cfg.filters and search is None:
            raise RaglineError(f"the round-trip filter needs a {cfg.mode} search of the index",
                               "pass --mode with a mode the index has, or drop --filter roundtrip")
        self.cfg, self.out, self.store = cfg, Path(out), store
        self.state_path = self.out.with_name(self.out.name + STATE_SUFFIX)
        self.fingerprint = index_fingerprint
        self.generate, self.search, self.answer = generate, search, answer
        self.alive, self.batch_size = alive, batch_size

    def _settings(self) -> dict:
        return {"config": {**asdict(self.cfg), "filters": list(self.cfg.filters)}, "index": self.fingerprint}

    def _resume(self) -> tuple[SynthStats, int, set[str]]:
        """(stats so far, the file's committed length, the normalised questions in it)."""
        if not self.state_path.exists():
            if self.out.exists():
                raise RaglineError(f"{self.out} exists and was not written by ragline synth "
                                   f"(no {self.state_path.name} beside it)", "pass another --out, or remove the file")
            return SynthStats(), 0, set()
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            recorded = {"config": state["config"], "index": state["index"]}
            stats = SynthStats(**state["stats"])
            length = int(state["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            raise RaglineError(f"{self.state_path} is not a ragline synth record",
                               "remove it and the file beside it to start again") from None
        if recorded != self._settings():
            old, new = recorded["config"], self._settings()["config"]
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            what = ", ".join(diff) if diff else "the index (it changed since)"
            raise RaglineError(f"{self.out} was synthesised with other settings ({what})",
                               "rerun with the settings in " + self.state_path.name + ", or pass another --out")
        if not self.out.exists() or self.out.stat().st_size < length:
            raise RaglineError(f"{self.out} is shorter than its record says", "remove it and its record to start again")
        with open(self.out, "r+b") as f:  # lines of a batch whose record was not written are dropped
            f.truncate(length)
            questions = {normalise(json.loads(line)["question"]) for line in f.read().decode("utf-8").splitlines()}
        return stats, length, questions

    def _commit(self, stats: SynthStats, lines: list[str], length: int) -> int:
        if lines:
            with open(self.out, "ab") as f:
                data = "".join(lines).encode("utf-8")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                length += len(data)
        atomic.write_json(self.state_path, {**self._settings(), "bytes": length, "stats": stats.to_dict()})
        return length

    def run(self, questions: int, progress: bool = True, log: Callable[[str], None] = print) -> SynthStats:
        """Synthesise until the file holds ``questions`` questions or the passages run out (or the tries do:
        TRIES_PER_QUESTION passages a question wanted)."""
        from tqdm import tqdm

        if questions < 1:
            raise RaglineError("--questions must be at least 1", "pass --questions N")
        if len(self.store) == 0:
            raise RaglineError("the index holds no passage", "synthesise from an index with passages")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic.exclusive_lock(self.out.with_name(f".{self.out.name}.lock")):
            stats, length, seen = self._resume()
            order = passage_order(self.store.values("doc_id"), self.cfg.seed, self.alive)
            if not len(order):
                raise RaglineError("the index holds no live passage", "synthesise from an index with passages")
            budget = questions * TRIES_PER_QUESTION
            began = time.perf_counter() - stats.seconds
            with tqdm(total=questions, initial=min(stats.questions, questions), disable=not progress,
                      unit="q") as bar:
                at = stats.passages_tried
                while stats.questions < questions and at < min(len(order), budget):
                    # never more passages than questions still wanted: a batch cannot overshoot, and where each
                    # passage's pair does not depend on its batch, a resumed file equals an uninterrupted one
                    rows = order[at : at + min(self.batch_size, questions - stats.questions)].tolist()
                    at += len(rows)
                    lines = self._batch(rows, self.store.get(rows), stats, seen)
                    stats.passages_tried = at
                    stats.questions += len(lines)
                    stats.seconds = time.perf_counter() - began
                    length = self._commit(stats, lines, length)
                    bar.update(len(lines))
                    bar.set_postfix(tried=at)
        if stats.questions == 0:
            self.out.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
            raise RaglineError(f"the generator {self.cfg.generator} wrote no usable question from "
                               f"{stats.passages_tried} passages (dropped: "
                               + ", ".join(f"{k} {v}" for k, v in stats.dropped.items() if v) + ")",
                               "use a stronger --generator, or fewer --filter checks")
        if stats.questions < questions:
            log(f"only {stats.questions} of {questions} questions after trying {stats.passages_tried} passages; "
                "rerun to try more, or use fewer --filter checks")
        return stats

    def _batch(self, rows: list[int], passages: list[Passage], stats: SynthStats, seen: set[str]) -> list[str]:
        """The JSON lines of the batch's pairs that pass the filters; counts into ``stats``."""
        cfg, on = self.cfg, set(self.cfg.filters)
        long_enough = [i for i, p in enumerate(passages) if len(p.text.split()) >= MIN_PASSAGE_WORDS]
        stats.short_passages += len(passages) - len(long_enough)
        if not long_enough:
            return []
        rows = [rows[i] for i in long_enough]
        passages = [passages[i] for i in long_enough]
        replies = self.generate(passages)
        stats.generated += len(replies)
        pending: list[tuple[int, Passage, str, str]] = []
        batch: set[str] = set()
        for row, p, reply in zip(rows, passages, replies, strict=True):
            pair = parse_reply(reply)
            if pair is None:
                failed = FORMAT
            else:
                q, a = pair
                failed = (SPAN if SPAN in on and not is_span(a, p.text, cfg.max_answer_words) else
                          LEAK if LEAK in on and leaks(q, a) else
                          COPY if COPY in on and is_copy(q, p.text) else
                          DEDUP if DEDUP in on and (normalise(q) in seen or normalise(q) in batch) else None)
            if failed:
                stats.dropped[failed] += 1
                continue
            batch.add(normalise(q))  # a later copy in the same batch is a duplicate too
            pending.append((row, p, q, a))
        if pending and ROUNDTRIP in on:
            found = self.search([q for _, _, q, _ in pending], cfg.roundtrip_k)
            stats.dropped[ROUNDTRIP] += sum(row not in hits for (row, *_), hits in zip(pending, found, strict=True))
            pending = [item for item, hits in zip(pending, found, strict=True) if item[0] in hits]
        if pending and READER in on:
            said = self.answer([q for *_, q, _ in pending], [p for _, p, _, _ in pending])
            ok = [agrees(s, a) for (*_, a), s in zip(pending, said, strict=True)]
            stats.dropped[READER] += ok.count(False)
            pending = [item for item, good in zip(pending, ok, strict=True) if good]
        seen.update(normalise(q) for *_, q, _ in pending)  # the file's questions
        return [json.dumps({"id": ID_PREFIX + p.pid, "question": q, "answers": [a], "positive": [p.pid],
                            "title": p.title}, ensure_ascii=False) + "\n" for _, p, q, a in pending]


def model_functions(generator, retriever, mode: str, max_new_tokens: int) -> tuple[Generate, Search, Answer]:
    """The batched calls a :class:`Synthesiser` makes, on ``generator`` and ``retriever``: replies by greedy
    decoding of :func:`question_prompt` (the answering path: packed prefill, cached steps), the round trip's
    search, and the single-passage reader's greedy answer."""
    import torch

    from ragline.rag.decoding import RowStepper, greedy, rag_token_decode, stop_ids

    stops = stop_ids(generator)

    def text(tokens: list[int]) -> str:
        return generator.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(passages: list[Passage]) -> list[str]:
        prompts = [question_prompt(generator, p) for p in passages]
        step = RowStepper(generator, prompts, len(prompts), 1, 1, None)
        return [text(h.tokens) for h in greedy(step, len(prompts), stops, max_new_tokens)]

    def search(questions: list[str], k: int) -> list[list[int]]:
        return retriever.retrieve(questions, k, mode).rows.tolist()

    def answer(questions: list[str], passages: list[Passage]) -> list[str]:
        decoded = rag_token_decode(generator, questions, [[p] for p in passages], torch.zeros(len(questions), 1),
                                   beams=1, max_new_tokens=vocab.DEFAULT_MAX_NEW_TOKENS)
        return [text(d.tokens) for d in decoded]

    return generate, search, answer
