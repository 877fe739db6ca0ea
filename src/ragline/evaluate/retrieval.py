"""Page-level retrieval metrics, as KILT scores provenance.

For one question with gold pages G (|G| = R) and retrieved passages ranked z_1..z_n, let pages(k) be the
distinct pages of z_1..z_k and P = the distinct pages of the whole ranking, in order of first appearance.

    recall@k       = |pages(k) ∩ G| / |G|        (k counts passages: what the reader is given)
    precision@k    = |pages(k) ∩ G| / |pages(k)|
    R-precision    = |P[:R] ∩ G| / R

Each is averaged over questions that have at least one gold page.
"""

from __future__ import annotations

from collections.abc import Sequence


def page_ranking(titles: Sequence[str]) -> list[str]:
    """Distinct pages in order of first appearance."""
    return list(dict.fromkeys(titles))


def question_metrics(retrieved_titles: Sequence[str], gold: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    gold_set = set(gold)
    if not gold_set:
        raise ValueError("question has no gold page")
    out = {}
    for k in ks:
        pages = set(retrieved_titles[:k])
        out[f"recall@{k}"] = len(pages & gold_set) / len(gold_set)
        out[f"precision@{k}"] = len(pages & gold_set) / len(pages) if pages else 0.0
    ranking = page_ranking(retrieved_titles)
    out["r_precision"] = len(set(ranking[: len(gold_set)]) & gold_set) / len(gold_set)
    return out


def mean_metrics(per_question: Sequence[dict[str, float]]) -> dict[str, float]:
    if not per_question:
        return {}
    return {key: sum(m[key] for m in per_question) / len(per_question) for key in per_question[0]}
