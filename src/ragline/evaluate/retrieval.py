"""``ragline eval-retrieval``: how well an index ranks the gold pages of a question set.

Each question's ranked passages are read as KILT provenance (their pages, duplicates dropped) and scored by
:func:`ragline.evaluate.scoring.retrieval_metrics`: R-precision, precision@k, recall@k and success_rate@k,
as KILT's ``eval_retrieval.py`` defines them, averaged over the questions whose gold page is in the index.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.evaluate.scoring import retrieval_metrics
from ragline.index.protocol import Index
from ragline.questions import Page, Question, load_task
from ragline.questions.fanoutqa import check_bundled, load_fanoutqa
from ragline.rag.model import Source
from ragline.retriever import Hit, Retriever


def cites_wikipedia_ids(index: Index) -> bool:
    """Whether the index's document ids are Wikipedia page ids (a KILT knowledge source), so that its
    passages can be cited by ``wikipedia_id`` as well as by title."""
    return index.manifest.get("corpus", {}).get("format") == "kilt"


def cited_pages(index: Index, passages: Sequence[Passage | Hit | Source]) -> list[Page]:
    """The pages of ``passages`` (anything with a ``doc_id`` and a ``title``) as KILT provenance entries."""
    ids = cites_wikipedia_ids(index)
    return [Page(p.doc_id if ids else None, p.title) for p in passages]


def load_retrieval_questions(spec: str, index: Index, skip_bad: bool = False) -> tuple[list[Question], str]:
    """Questions of ``spec`` (``fanoutqa-dev`` or a question file with gold pages) whose gold page is in
    ``index``; and a note saying how many were kept."""
    titles = set(index.store.values("title"))
    if spec.startswith("fanoutqa-"):
        check_bundled(spec)
        everything = load_fanoutqa("dev")
        kept = load_fanoutqa("dev", titles)
    else:
        everything = load_task(spec, skip_bad=skip_bad, require_answers=False, require_pages=True).questions
        kept = [q for q in everything if set(q.gold_titles) & titles]
    note = f"{len(kept)} of {len(everything)} questions with gold pages have a gold page in index {index.name}"
    if not kept:
        raise RaglineError(f"no question of {spec} has its gold page in index {index.name}",
                           "evaluate against an index of the corpus those questions come from")
    return kept, note


def evaluate_retrieval(retriever: Retriever, questions: Sequence[Question], ks: Sequence[int], mode: str,
                       batch_size: int = 64) -> dict[str, float]:
    """Mean R-precision, precision@k, recall@k and success_rate@k over ``questions``."""
    depth = min(max(ks), len(retriever.index))
    per_q = []
    for lo in range(0, len(questions), batch_size):
        batch = questions[lo : lo + batch_size]
        hits = retriever.search([q.question for q in batch], k=depth, mode=mode)
        for q, hs in zip(batch, hits, strict=True):
            per_q.append(retrieval_metrics(cited_pages(retriever.index, hs), q.provenance, ks))
    return {key: sum(m[key] for m in per_q) / len(per_q) for key in per_q[0]} if per_q else {}
