"""Citation marks: which of an answer's passages it cites, and after which words.

An answer is cut into runs of text (:class:`Citation`), each followed by the numbers [n] (1-based ranks) of
the passages it rests on:

* per-token readers (RAG-Token, FiD): consecutive words whose most probable passage (the argmax of their
  tokens' mean p(z | x, y_<t, y_t)) is the same form a run, cited to that passage;
* whole-answer readers (RAG-Sequence): one run, cited to the fewest passages, by posterior p(z | x, y)
  from the largest, whose posteriors sum to at least :data:`ragline.vocab.CITATION_MASS`;
* concat: the marks the model wrote itself, where it wrote them (taken out of the answer's text); the
  whole-answer rule over its posterior when it wrote none;
* closed book: no passage, no marks.

:func:`marked` writes the text with its marks, ``"Stanley Kubrick [2]"``: what the OpenAI-compatible route
returns when asked for citations, and what the page links to the passages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ragline import vocab

_MARK = re.compile(r"\s*\[(\d+)\]")


@dataclass
class Citation:
    """A run of an answer's text and the passage numbers cited after it (empty: not cited)."""

    text: str
    passages: list[int]
    tokens: list[int] | None = None  # per-token readers: [start, end) into the answer's token_sources


def from_marks(text: str, k: int) -> tuple[str, list[int], list[Citation]]:
    """A concat answer's ``text`` without its marks [n] (n in 1..k; others are kept as text), the numbers it
    cited in order of first mention, and its runs, each cited to the marks written right after it."""
    runs: list[Citation] = []
    at = 0
    for m in _MARK.finditer(text):
        n = int(m.group(1))
        if not 1 <= n <= k:
            continue
        if m.start() > at or not runs:
            runs.append(Citation(text[at:m.start()], []))
        if n not in runs[-1].passages:
            runs[-1].passages.append(n)
        at = m.end()
    if at < len(text) or not runs:
        runs.append(Citation(text[at:], []))
    cited = list(dict.fromkeys(n for r in runs for n in r.passages))  # marks before any text count too
    runs = _strip(runs)
    return "".join(r.text for r in runs), cited, runs


def per_token(text: str, token_sources: Sequence[tuple[str, Sequence[float]]]) -> list[Citation] | None:
    """Runs of whole words with the same most probable passage, each cited to it: a word (its tokens up to
    the next that starts with a space) goes to the argmax of its tokens' mean p(z | x, y_<t, y_t), so no
    mark falls inside a word. None when the tokens, decoded one by one, do not spell ``text`` (a character
    split over tokens), so the caller cites the whole answer."""
    words: list[list[int]] = []  # token indices of each word
    for i, (tok, _) in enumerate(token_sources):
        if not words or tok[:1].isspace() or token_sources[i - 1][0][-1:].isspace():
            words.append([])
        words[-1].append(i)
    runs: list[Citation] = []
    for word in words:
        k = len(token_sources[word[0]][1])
        mean = [sum(token_sources[i][1][z] for i in word) / len(word) for z in range(k)]
        best = max(range(k), key=mean.__getitem__) + 1
        piece = "".join(token_sources[i][0] for i in word)
        if runs and runs[-1].passages == [best]:
            runs[-1].text += piece
            runs[-1].tokens[1] = word[-1] + 1
        else:
            runs.append(Citation(piece, [best], [word[0], word[-1] + 1]))
    runs = _strip(runs)
    return runs if "".join(r.text for r in runs) == text else None


def whole_answer(text: str, posterior: Sequence[float]) -> list[Citation]:
    """One run cited to the fewest passages, largest posterior first, holding CITATION_MASS of it."""
    order = sorted(range(len(posterior)), key=lambda i: -posterior[i])
    cited, mass = [], 0.0
    for i in order:
        if mass >= vocab.CITATION_MASS:
            break
        cited.append(i + 1)
        mass += posterior[i]
    return [Citation(text, cited)] if text else []


def marked(runs: Sequence[Citation]) -> str:
    """The answer's text with the marks after each run: ``"Paris [2], and Lyon [1][3]"``."""
    return "".join(r.text + (" " + "".join(f"[{n}]" for n in r.passages) if r.passages else "") for r in runs)


def _strip(runs: list[Citation]) -> list[Citation]:
    """``runs`` with the whitespace around the whole answer removed, and runs left empty dropped."""
    if runs:
        runs[0].text = runs[0].text.lstrip()
        runs[-1].text = runs[-1].text.rstrip()
    return [r for r in runs if r.text]
