"""What every question reader produces: questions with gold answers and gold provenance, grouped in a task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Page:
    """One provenance entry: a Wikipedia page by id and/or title (KILT's ``wikipedia_id`` and ``title``)."""

    wikipedia_id: str | None = None
    title: str | None = None

    @classmethod
    def from_kilt(cls, provenance: dict) -> Page:
        """A KILT provenance object's page, its fields as KILT compares them (``str(value).strip()``; None when
        absent)."""
        def field(key: str) -> str | None:
            return None if provenance.get(key) is None else str(provenance[key]).strip()

        return cls(field("wikipedia_id"), field("title"))


@dataclass(frozen=True)
class Question:
    """A question with its gold answers and provenance.

    ``provenance`` holds one evidence set per gold output that gives provenance (KILT: each output's
    ``provenance`` list); ``gold_titles`` are the distinct titles over all sets (what retrieval evaluation
    and retriever training look for in a corpus).
    """

    id: str
    question: str
    answers: tuple[str, ...] = ()
    gold_titles: tuple[str, ...] = ()
    provenance: tuple[tuple[Page, ...], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def titled(qid: str, question: str, answers: tuple[str, ...], titles: tuple[str, ...] | list[str],
           meta: dict[str, Any] | None = None) -> Question:
    """A question whose provenance is one evidence set of pages known by title (duplicates dropped)."""
    titles = tuple(dict.fromkeys(titles))
    return Question(qid, question, answers, titles, (tuple(Page(title=t) for t in titles),) if titles else (),
                    meta or {})


@dataclass
class Task:
    """The questions of one task file (or bundled split), the kind of answer that decides the metrics, and
    the malformed records skipped (``--skip-bad``)."""

    name: str
    format: str
    kind: str                     # qa | regex | label | free: which metrics are primary
    questions: list[Question]
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: problem" of each skipped record


class BadRecord(ValueError):
    """A malformed record of a question file: reported with its place, skipped only with ``--skip-bad``."""


def answer_strings(answer: Any) -> tuple[str, ...]:
    """Gold answers as strings, from a string, number, boolean, list or dict of them; blank ones dropped and
    the rest stripped (as KILT keeps its gold answers)."""
    if isinstance(answer, list | tuple):
        return tuple(s for a in answer for s in answer_strings(a))
    if isinstance(answer, dict):
        return tuple(s for a in answer.values() for s in answer_strings(a))
    if isinstance(answer, bool):
        return ("yes" if answer else "no",)
    if answer is None:
        return ()
    text = str(answer).strip()
    return (text,) if text else ()
