"""The README's Python snippet against `ragline ask`: seconds per answer and the answers themselves.

    python3 benchmarks/front_door.py [--index DIR] [--generator qwen2.5-0.5b] [--limit N]

The questions are latency.py's: the answerable FanOutQA dev sub-questions (ids 0-7), one at a time, with the
defaults both paths share (RAG-Sequence, thorough decoding, k=5, precision auto).

* ``ragline ask``: the command run once per question, as a user runs it (in this process through click's
  runner, so each run loads its models afresh as a new process would). The seconds are those of answering,
  from retrieval to the answer, not of loading.
* ``ragline.open()``: the README's snippet. One system is opened, then ``rag.ask(question)`` is called for
  each question. The "cold" row empties the generator's passage cache before each question, as a fresh
  ``ragline ask`` process starts. The "warm" row keeps the cache, as a notebook does between questions.

Each row prints seconds per question (mean and median) and how many answers equal ``ragline ask``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from click.testing import CliRunner

import ragline
from ragline import paths
from ragline.cli import cli
from ragline.index.registry import open_index
from ragline.questions import dev_questions
from ragline.system import Rag


def timed_asks(seconds: list[float]):
    """Wrap ``Rag.ask`` so that each call's duration is appended to ``seconds``."""
    original = Rag.ask

    def ask(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return out
    return original, ask


def cli_answers(index: Path, generator: str, questions: list[str]) -> tuple[list[str], list[float]]:
    """Each question through ``ragline ask --json``; its answer text and the seconds its ``Rag.ask`` took."""
    seconds: list[float] = []
    original, wrapped = timed_asks(seconds)
    Rag.ask = wrapped
    texts = []
    try:
        for q in questions:
            result = CliRunner().invoke(cli, ["ask", q, "--index", str(index), "--generator", generator, "--json"],
                                        catch_exceptions=False)
            texts.append(json.loads(result.stdout.strip().splitlines()[-1])["text"])
    finally:
        Rag.ask = original
    return texts, seconds


def python_answers(rag: Rag, questions: list[str], cold: bool) -> tuple[list[str], list[float]]:
    """The README's ``rag.ask(question)`` for each question, timed; ``cold`` empties the passage cache first."""
    texts, seconds = [], []
    for q in questions:
        cache = getattr(rag.generator, "kv_cache", None)
        if cold and cache is not None:
            cache.clear()
        t0 = time.perf_counter()
        texts.append(rag.ask(q).text)
        seconds.append(time.perf_counter() - t0)
    return texts, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=paths.default_index_dir())
    ap.add_argument("--generator", default="qwen2.5-0.5b")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    args = ap.parse_args()

    store = open_index(args.index).store
    questions = [q.question for q in dev_questions(store.values("title"), store.values("text"),
                                                   answerable_only=True)[: args.limit]]
    print(f"{len(questions)} answerable dev questions, one at a time; defaults: RAG-Sequence thorough, k=5, "
          "precision auto")
    reference, cli_seconds = cli_answers(args.index, args.generator, questions)
    rag = ragline.open(args.index, args.generator)
    rag.ask(questions[0])  # warm-up: the first call's one-off costs (oneDNN kernels) are not a question's
    rows = [("`ragline ask` (a process per question)", reference, cli_seconds)]
    for name, cold in (("`ragline.open()` then `rag.ask(q)`, cold", True),
                       ("`ragline.open()` then `rag.ask(q)`, warm", False)):
        texts, seconds = python_answers(rag, questions, cold)
        rows.append((name, texts, seconds))
    print("| path | s/question (mean) | median | vs `ragline ask` | answers equal to `ragline ask`'s |")
    print("|---|---|---|---|---|")
    base = statistics.mean(cli_seconds)
    for name, texts, seconds in rows:
        same = sum(a == b for a, b in zip(texts, reference, strict=True))
        print(f"| {name} | {statistics.mean(seconds):.2f} | {statistics.median(seconds):.2f} | "
              f"{statistics.mean(seconds) / base:.2f}x | {same}/{len(questions)} |")


if __name__ == "__main__":
    main()
