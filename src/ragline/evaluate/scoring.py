"""Score KILT-format predictions against a task, as KILT's eval_downstream / eval_retrieval do.

Per question (averaged over every question of the task; a missing or empty answer scores 0, as in KILT):

    answer metrics     by the task's kind (see :mod:`ragline.evaluate.metrics`):
                         qa: accuracy, em, f1, rouge_l     regex: em (the gold answers are patterns)
                         label: accuracy, em               free: rouge_l, bleu1, em, f1
    r_precision        max over the gold provenance sets S of |P[:|S|] ∩ S| / |S|, P = the predicted
                       provenance's distinct pages in rank order
    recall@k, precision@k   page level over the first k provenance passages (ragline.evaluate.retrieval)
    kilt_<metric>      the answer metric, counted only when r_precision = 1 (KILT-EM, KILT-F1, ...)

Retrieval and KILT metrics are averaged over the questions that have gold provenance.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragline.evaluate import metrics as m
from ragline.evaluate.datasets import Question
from ragline.evaluate.retrieval import page_ranking, question_metrics

ANSWER_METRICS = {
    "qa": {"accuracy": m.accuracy, "em": m.exact_match, "f1": m.token_f1, "rouge_l": m.rouge_l},
    "regex": {"em": m.regex_match},
    "label": {"accuracy": m.accuracy, "em": m.exact_match},
    "free": {"rouge_l": m.rouge_l, "bleu1": m.bleu1, "em": m.exact_match, "f1": m.token_f1},
}


def r_precision(pages: Sequence[str], gold_sets: Sequence[Sequence[str]]) -> float:
    ranking = page_ranking(pages)
    return max((len(set(ranking[: len(s)]) & set(s)) / len(s) for s in gold_sets if s), default=0.0)


def score_question(q: Question, kind: str, prediction: dict | None, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one question; ``prediction`` is a KILT-format record (or None when missing)."""
    out = dict.fromkeys(ANSWER_METRICS[kind], 0.0)
    output = (prediction or {}).get("output") or [{}]
    answer = str(output[0].get("answer") or "").strip()
    if answer:
        out.update({name: fn(answer, q.answers) for name, fn in ANSWER_METRICS[kind].items()})
    gold_sets = q.meta.get("provenance") or ([q.gold_titles] if q.gold_titles else [])
    if gold_sets:
        pages = [p.get("title", "") for p in output[0].get("provenance") or []]
        rprec = r_precision(pages, gold_sets)
        out["r_precision"] = rprec
        if pages:  # closed book cites nothing: no recall / precision, and KILT metrics of 0
            for name, v in question_metrics(pages, [t for s in gold_sets for t in s], ks).items():
                if name != "r_precision":
                    out[name] = v
        for name in ANSWER_METRICS[kind]:
            out[f"kilt_{name}"] = out[name] if rprec == 1.0 else 0.0
    return out


def score_run(questions: Sequence[Question], kind: str, predictions: dict[str, dict],
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean metrics over ``questions``; retrieval and KILT metrics over those with gold provenance."""
    per_q = [score_question(q, kind, predictions.get(q.id), ks) for q in questions]
    keys = dict.fromkeys(k for row in per_q for k in row)
    means = {}
    for key in keys:
        rows = [row[key] for row in per_q if key in row]
        denominator = len(per_q) if key in ANSWER_METRICS[kind] else len(rows)
        means[key] = sum(rows) / denominator if denominator else 0.0
    means["questions"] = float(len(per_q))
    means["answered"] = float(sum(q.id in predictions for q in questions))
    return means
