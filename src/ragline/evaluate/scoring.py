"""Scoring KILT-format predictions as KILT's official scripts do (``kilt/eval_downstream.py`` for answers and
KILT scores, ``kilt/eval_retrieval.py`` for provenance), for ``ragline eval`` runs and ``ragline score``.

One question has gold answers A (stripped, blank ones dropped) and gold evidence sets E_1..E_m (one per gold
output that gives provenance). A guess has one output: an answer a (stripped) and provenance pages, read in
order with duplicates dropped: g_1, g_2, ...

    answer metrics   (see :mod:`ragline.evaluate.metrics`, each maximised over A; all 0 when a is empty)
                       qa, label: accuracy, em, f1, rouge_l     free: those and bleu1     regex: em
    r_precision      max_j |{g_1..g_Rj} ∩ E_j| / R_j,  R_j = |E_j|  (0 for an empty set)
    rank             the guess pages in order, each appending one entry: a page of evidence set E_j removes
                     itself from E_j and E_j's earlier entry, then appends True if E_j is now complete, else
                     a point for E_j; a page of no set appends False
    precision@k      count(True in rank[:k]) / k
    recall@k         count(True in rank[:k]) / (number of distinct evidence sets)
    success_rate@k   [True in rank[:k]]
    kilt_<metric>    the answer metric where r_precision = 1, else 0 (KILT-EM, KILT-F1, ...)

Every mean is over all questions, as KILT divides (a question without provenance scores 0 on retrieval and
KILT metrics); retrieval and KILT metrics are reported only for tasks that give provenance at all. KILT prints
recall@k and success_rate@k for k > 1 only; the same formula gives them at k = 1 here.

Pages are compared by ``wikipedia_id`` where the gold and the guess both carry ids, and by title otherwise
(KILT uses ids; gold data converted from title-only sources, such as FanOutQA, have titles only). A
provenance entry lacking the key compared is left out, as KILT leaves it out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ragline.errors import RaglineError
from ragline.evaluate import metrics as m
from ragline.questions import Page, Question, load_task
from ragline.vocab import RETRIEVAL_KS

KILT_ANSWER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "accuracy": m.accuracy, "em": m.exact_match, "f1": m.token_f1, "rouge_l": m.rouge_l}
ANSWER_METRICS: dict[str, dict[str, Callable[[str, Sequence[str]], float]]] = {
    "qa": KILT_ANSWER_METRICS,
    "label": KILT_ANSWER_METRICS,
    "free": {**KILT_ANSWER_METRICS, "bleu1": m.bleu1},
    "regex": {"em": m.regex_match},
}
WIKIPEDIA_ID, TITLE = "wikipedia_id", "title"


def guess_pages(prediction: dict | None) -> tuple[str, list[Page]]:
    """The answer (stripped) and provenance pages of a KILT prediction record (None: no prediction)."""
    output = ((prediction or {}).get("output") or [{}])[0]
    pages = [Page.from_kilt(p) for p in output.get("provenance") or [] if isinstance(p, dict)]
    return str(output.get("answer") if output.get("answer") is not None else "").strip(), pages


def rank_key(gold: Sequence[Sequence[Page]], guess: Sequence[Page]) -> str:
    """``wikipedia_id`` when both sides carry Wikipedia ids, else ``title``."""
    ids = any(p.wikipedia_id for s in gold for p in s) and any(p.wikipedia_id for p in guess)
    return WIKIPEDIA_ID if ids else TITLE


def _ids(pages: Sequence[Page], key: str) -> list[str]:
    """The pages' keys in order, duplicates and pages lacking the key left out (KILT's _get_ids_list)."""
    return list(dict.fromkeys(getattr(p, key) for p in pages if getattr(p, key) is not None))


def r_precision(guess: Sequence[str], gold_sets: Sequence[Sequence[str]]) -> float:
    """max over evidence sets S of |guess[:|S|] ∩ S| / |S| (0 for an empty S, and with no set)."""
    return max((sum(g in s for g in guess[: len(s)]) / len(s) if s else 0.0 for s in gold_sets), default=0.0)


def evidence_rank(guess: Sequence[str], gold_sets: Sequence[Sequence[str]]) -> tuple[list[bool | str], int]:
    """KILT's rank of the guess pages against the distinct evidence sets, and how many sets there are (no
    guess page: an empty rank and no set, as KILT counts it)."""
    if not guess:
        return [], 0
    sets: list[set[str]] = []
    for s in gold_sets:
        if set(s) not in sets:
            sets.append(set(s))
    rank: list[bool | str] = []
    for page in guess:
        found = False
        for j, s in enumerate(sets):
            if page in s:
                found = True
                point = f"evidence_set:{j}"
                if point in rank:
                    rank.remove(point)
                s.remove(page)
                rank.append(True if not s else point)
        if not found:
            rank.append(False)
    return rank, len(sets)


def retrieval_metrics(guess: Sequence[Page], gold: Sequence[Sequence[Page]], ks: Sequence[int]) -> dict[str, float]:
    """r_precision, precision@k, recall@k and success_rate@k of one question's ranked pages."""
    key = rank_key(gold, guess)
    guess_ids = _ids(guess, key)
    out = {"r_precision": r_precision(guess_ids, [_ids(s, key) for s in gold])}
    # KILT's evidence sets keep an entry lacking the key as an empty string (it can never be matched)
    rank, n_sets = evidence_rank(guess_ids, [[getattr(p, key) or "" for p in s] for s in gold])
    for k in ks:
        hits = rank[:k].count(True)
        out[f"precision@{k}"] = hits / k if n_sets else 0.0
        out[f"recall@{k}"] = hits / n_sets if n_sets else 0.0
        out[f"success_rate@{k}"] = float(True in rank[:k]) if n_sets else 0.0
    return out


def score_question(q: Question, kind: str, prediction: dict | None, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one question; ``prediction`` is a KILT-format record (None when missing: scores 0)."""
    answer, pages = guess_pages(prediction)
    fns = ANSWER_METRICS[kind]
    out = dict.fromkeys(fns, 0.0)
    if answer:
        if not q.answers:
            raise RaglineError(f"gold question {q.id!r} has no answer to score {answer!r} against",
                               "give every gold record a non-empty answer (KILT's script fails on it too)")
        out.update({name: fn(answer, q.answers) for name, fn in fns.items()})
    out.update(retrieval_metrics(pages, q.provenance, ks))
    for name in fns:
        out[f"kilt_{name}"] = out[name] if out["r_precision"] == 1.0 else 0.0
    return out


def score_run(questions: Sequence[Question], kind: str, predictions: dict[str, dict],
              ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Mean metrics over all ``questions`` (KILT's denominators); retrieval and KILT metrics only where the
    task gives provenance."""
    per_q = [score_question(q, kind, predictions.get(q.id), ks) for q in questions]
    keys = list(dict.fromkeys(k for row in per_q for k in row))
    if not any(q.provenance for q in questions):
        keys = [k for k in keys if k in ANSWER_METRICS[kind]]
    means = {key: sum(row[key] for row in per_q) / len(per_q) if per_q else 0.0 for key in keys}
    means["questions"] = float(len(per_q))
    means["answered"] = float(sum(q.id in predictions for q in questions))
    return means


def read_guesses(path: Path) -> dict[str, dict]:
    """A KILT prediction file by id, refused as KILT's script refuses it: duplicate ids, or a record without
    exactly one output with an answer."""
    path = Path(path)
    if not path.is_file():
        raise RaglineError(f"prediction file {path} does not exist", "check the --guess path")
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaglineError(f"{path}:{n}: not valid JSON ({e.msg})", "fix or remove that line") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise RaglineError(f"{path}:{n}: not a KILT prediction (no id)", "give each line an id and an output")
            qid = str(rec["id"]).strip()
            if qid in out:
                raise RaglineError(f"{path}:{n}: prediction id {qid!r} appears twice",
                                   "give one prediction per id (KILT's script refuses duplicates)")
            output = rec.get("output")
            if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict) \
                    or "answer" not in output[0]:
                raise RaglineError(f"{path}:{n}: prediction {qid!r} must have exactly one output with an answer",
                                   'write "output": [{"answer": ..., "provenance": [...]}]')
            out[qid] = rec
    return out


def score_files(gold: Path, guess: Path, ks: Sequence[int] = RETRIEVAL_KS) -> dict:
    """``ragline score``: a KILT gold file against a KILT prediction file; every gold id needs a prediction
    (predictions of other ids are ignored, as KILT's script ignores them)."""
    task = load_task(gold, "kilt", require_answers=False)
    guesses = read_guesses(guess)
    missing = [q.id for q in task.questions if q.id not in guesses]
    if missing:
        raise RaglineError(f"{len(missing)} gold ids have no prediction in {guess} (first: {missing[0]!r})",
                           "predict every question of the gold file")
    return {"gold": str(gold), "guess": str(guess), "kind": task.kind,
            "ignored_predictions": len(guesses) - len(task.questions),
            "metrics": score_run(task.questions, task.kind, guesses, ks)}
