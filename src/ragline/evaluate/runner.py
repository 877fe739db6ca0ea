"""Run a question set through a retriever and score the gold pages."""

from __future__ import annotations

from collections.abc import Sequence

from ragline.errors import RaglineError
from ragline.evaluate.datasets import Question, load_fanoutqa, load_questions
from ragline.evaluate.retrieval import mean_metrics, question_metrics
from ragline.index.directory import IndexDir
from ragline.retriever import Retriever


def load_eval_questions(spec: str, index: IndexDir) -> tuple[list[Question], str]:
    """Questions of ``spec`` ('fanoutqa-dev' or a file) whose gold page is in ``index``; and a note saying
    how many were kept."""
    titles = set(index.store.table.column("title").to_pylist())
    if spec.startswith("fanoutqa-"):
        split = spec.split("-", 1)[1]
        everything = load_fanoutqa(split)
        kept = load_fanoutqa(split, titles)
    else:
        everything = [q for q in load_questions(spec) if q.gold_titles]
        kept = [q for q in everything if set(q.gold_titles) & titles]
    note = f"{len(kept)} of {len(everything)} questions with gold pages have a gold page in index {index.name}"
    if not kept:
        raise RaglineError(f"no question of {spec} has its gold page in index {index.name}",
                           "evaluate against an index of the corpus those questions come from")
    return kept, note


def evaluate_retrieval(retriever: Retriever, questions: Sequence[Question], ks: Sequence[int], mode: str,
                       batch_size: int = 64) -> dict[str, float]:
    """Mean page-level recall@k, precision@k and R-precision over ``questions``."""
    depth = min(max(ks), len(retriever.index))
    per_q = []
    for lo in range(0, len(questions), batch_size):
        batch = questions[lo : lo + batch_size]
        hits = retriever.search([q.question for q in batch], k=depth, mode=mode)
        per_q.extend(question_metrics([h.title for h in hs], q.gold_titles, ks) for q, hs in zip(batch, hits, strict=True))
    return mean_metrics(per_q)
