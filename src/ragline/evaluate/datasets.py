"""Question sets with gold answers and gold Wikipedia pages.

FanOutQA (bundled, package ``fanoutqa``): its dev file decomposes 310 multi-hop questions into single-hop
sub-questions, each with an answer and an evidence page. ``split="dev"`` keeps the sub-questions of
top-level questions whose id starts with 0-7: the only part to develop, tune or train on. ``split="heldout"``
(ids 8-f) is reserved for final evaluation.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragline.errors import RaglineError

FANOUTQA_SPLITS = {"dev": "01234567", "heldout": "89abcdef"}


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...] = ()
    gold_titles: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def fanoutqa_path() -> Path:
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise RaglineError("the FanOutQA package is not installed",
                           "run `bash scripts/install.sh` (or `pip install --no-deps fanoutqa==1.1.1`)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "fanout-final-dev.json"
    if not path.is_file():
        raise RaglineError(f"{path} is missing", "reinstall fanoutqa==1.1.1")
    return path


def _answer_strings(answer: Any) -> tuple[str, ...]:
    if isinstance(answer, list):
        return tuple(s for a in answer for s in _answer_strings(a))
    if isinstance(answer, dict):
        return tuple(s for a in answer.values() for s in _answer_strings(a))
    if isinstance(answer, bool):
        return ("yes" if answer else "no",)
    return (str(answer),)


def load_fanoutqa(split: str = "dev", titles: set[str] | None = None) -> list[Question]:
    """Single-hop FanOutQA sub-questions of ``split``, each once; with ``titles``, only those whose
    evidence page is among them (the questions a corpus can answer).

    Sub-question ids hash the question text, and a few sub-questions ("What is the capital of China?")
    sit under top-level questions of both halves. The dev split leaves those out, so that nothing a
    held-out question asks is ever developed, tuned or trained on.
    """
    if split not in FANOUTQA_SPLITS:
        raise RaglineError(f"unknown FanOutQA split {split!r}", "use split 'dev' (or 'heldout' for final evaluation)")
    with open(fanoutqa_path(), encoding="utf-8") as f:
        data = json.load(f)

    def walk(subs: list[dict]) -> Iterator[dict]:
        for s in subs:
            yield s
            yield from walk(s.get("decomposition") or [])

    by_split: dict[str, dict[str, tuple[str, dict]]] = {name: {} for name in FANOUTQA_SPLITS}
    for top in data:
        name = next(n for n, digits in FANOUTQA_SPLITS.items() if top["id"][0].lower() in digits)
        for s in walk(top.get("decomposition") or []):
            by_split[name].setdefault(s["id"], (top["id"], s))
    held_questions = {s["question"].strip().lower() for _, s in by_split["heldout"].values()}
    out = []
    for sid, (parent, s) in by_split[split].items():
        ev = s.get("evidence")
        if not ev or (titles is not None and ev["title"] not in titles):
            continue
        if split == "dev" and (sid in by_split["heldout"] or s["question"].strip().lower() in held_questions):
            continue
        out.append(Question(sid, s["question"], _answer_strings(s["answer"]), (ev["title"],),
                            {"parent": parent, "answer": s["answer"]}))
    return out


def load_questions(path: str | Path) -> list[Question]:
    """A question file: JSONL with ``question`` (or ``input``), ``answers`` (or ``answer``) and gold pages
    in ``gold_titles`` / ``positive``; or KILT format (``id``, ``input``, ``output[].answer`` and
    ``output[].provenance[].title``)."""
    path = Path(path)
    if not path.is_file():
        raise RaglineError(f"question file {path} does not exist", "check the path")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaglineError(f"{path}:{n}: not valid JSON ({e.msg})", "fix or remove that line") from None
            q = rec.get("question", rec.get("input")) if isinstance(rec, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise RaglineError(f'{path}:{n}: no "question" (or KILT "input") text',
                                   'give each line a non-empty "question"')
            answers: list[str] = []
            titles: list[str] = []
            for o in rec.get("output") or []:  # KILT
                if o.get("answer"):
                    answers.append(str(o["answer"]))
                titles.extend(p["title"] for p in o.get("provenance") or [] if p.get("title"))
            ans = rec.get("answers", rec.get("answer"))
            if ans is not None:
                answers.extend(_answer_strings(ans))
            gold = rec.get("gold_titles", rec.get("positive", []))
            titles.extend([gold] if isinstance(gold, str) else gold)
            out.append(Question(str(rec.get("id", f"line-{n}")), q, tuple(answers), tuple(dict.fromkeys(titles))))
    if not out:
        raise RaglineError(f"question file {path} is empty", "give one JSON question per line")
    return out


def answerable(questions: list[Question], pages: dict[str, list[str]]) -> list[Question]:
    """The questions whose normalised answer string occurs in the normalised text of their gold page
    (``pages``: title -> passage texts): those a reader of the corpus can answer word for word."""
    from ragline.evaluate.metrics import normalise

    out = []
    for q in questions:
        body = f" {normalise(' '.join(t for title in q.gold_titles for t in pages.get(title, [])))} "
        if any(normalise(a) and f" {normalise(a)} " in body for a in q.answers):
            out.append(q)
    return out
