"""The bundled questions: FanOutQA's dev sub-questions with gold answers and gold Wikipedia pages.

FanOutQA (bundled, package ``fanoutqa``): its dev file decomposes 310 multi-hop questions into single-hop
sub-questions, each with an answer and an evidence page. ``split="dev"`` keeps the sub-questions of
top-level questions whose id starts with 0-7: the only part to develop, tune or train on. ``split="heldout"``
(ids 8-f) is reserved for final evaluation.

Bundled tasks (:data:`BUNDLED_TASKS`): ``fanoutqa-dev``, the dev sub-questions whose evidence page is in the
corpus, and ``fanoutqa-dev-answerable``, those whose answer string also occurs in that page's passages.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from ragline.errors import RaglineError
from ragline.questions.normalise import normalise
from ragline.questions.records import Question, answer_strings, titled

FANOUTQA_SPLITS = {"dev": "01234567", "heldout": "89abcdef"}
DEV, DEV_ANSWERABLE = "fanoutqa-dev", "fanoutqa-dev-answerable"
BUNDLED_TASKS = (DEV, DEV_ANSWERABLE)


def fanoutqa_path() -> Path:
    spec = importlib.util.find_spec("fanoutqa")
    if spec is None or not spec.submodule_search_locations:
        raise RaglineError("the FanOutQA package is not installed",
                           "run `bash scripts/install.sh` (or `pip install --no-deps fanoutqa==1.1.1`)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "fanout-final-dev.json"
    if not path.is_file():
        raise RaglineError(f"{path} is missing", "reinstall fanoutqa==1.1.1")
    return path


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
        out.append(titled(sid, s["question"], answer_strings(s["answer"]), (ev["title"],),
                           {"parent": parent, "answer": s["answer"]}))
    return out


def answerable(questions: list[Question], pages: dict[str, list[str]]) -> list[Question]:
    """The questions whose normalised answer string occurs in the normalised text of their gold page
    (``pages``: title -> passage texts): those a reader of the corpus can answer word for word."""
    out = []
    for q in questions:
        body = f" {normalise(' '.join(t for title in q.gold_titles for t in pages.get(title, [])))} "
        if any(normalise(a) and f" {normalise(a)} " in body for a in q.answers):
            out.append(q)
    return out


def pages_of(titles: list[str], texts: list[str]) -> dict[str, list[str]]:
    """A corpus's pages: title -> the texts of its passages (``titles`` and ``texts``, one per passage)."""
    pages: dict[str, list[str]] = {}
    for t, x in zip(titles, texts, strict=True):
        pages.setdefault(t, []).append(x)
    return pages


def dev_questions(titles: list[str], texts: list[str], answerable_only: bool = False) -> list[Question]:
    """FanOutQA dev sub-questions whose gold page is among a corpus's passages (``titles`` and ``texts``, one
    per passage); with ``answerable_only``, those whose answer string occurs in that page's passages."""
    pages = pages_of(titles, texts)
    questions = load_fanoutqa("dev", set(pages))
    return answerable(questions, pages) if answerable_only else questions


def check_bundled(name: str) -> None:
    """Refuse a ``fanoutqa-*`` name that is not a bundled task (the held-out half above all)."""
    if name.startswith("fanoutqa-") and name not in BUNDLED_TASKS:
        raise RaglineError(f"unknown bundled task {name!r}",
                           f"use {' or '.join(BUNDLED_TASKS)} (the held-out half is for final evaluation only) "
                           "or a task file")
