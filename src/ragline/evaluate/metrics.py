"""Answer metrics, as KILT's official scoring script (kilt/eval_downstream.py) defines them, each maximised
over the gold answers. ``normalise`` is the SQuAD answer normalisation.

    normalise(s)     = lower-case, drop punctuation, drop the articles a / an / the, collapse white space
    accuracy         = [pred.strip() is one of the golds, character for character]  (KILT; FEVER labels)
    EM(pred, golds)  = max_g [normalise(pred) == normalise(g)]
    F1(pred, golds)  = max_g  2 P R / (P + R) over the bags of normalised tokens (P = |common| / |pred|,
                       R = |common| / |gold|); 0 when nothing is shared (also when both are empty, as KILT)
    ROUGE-L          = max_g  the ``rouge`` package's (1.0.1) ROUGE-L F, on the raw strings, as KILT calls it:
                       sentences split at '.', union-LCS of distinct words, F = 2 P R / (P + R)
    BLEU-1           = BP * clipped unigram precision over normalised tokens, all golds as references
                       (counts clipped by the most in any reference; BP = exp(1 - r/c) when the prediction,
                       c tokens, is shorter than the reference closest in length, r tokens)
    regex match      = max_g [re.match(g, pred, IGNORECASE)]  (CuratedTrec's gold answers are patterns; DrQA)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from ragline.questions.normalise import normalise


def accuracy(prediction: str, golds: Sequence[str]) -> float:
    return float(prediction.strip() in golds)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalise(prediction)
    return float(any(p == normalise(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalise(prediction).split(), normalise(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def _rouge_l(prediction: str, gold: str) -> float:
    from rouge import Rouge

    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(prediction, gold, avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):  # empty hypothesis or reference (KILT scores 0)
        return 0.0


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
    return max((_rouge_l(prediction, g) for g in golds), default=0.0)


def bleu1(prediction: str, golds: Sequence[str]) -> float:
    pred = normalise(prediction).split()
    refs = [normalise(g).split() for g in golds]
    if not pred or not refs:
        return 0.0
    most = Counter()
    for r in refs:
        most |= Counter(r)
    clipped = sum(min(n, most[w]) for w, n in Counter(pred).items())
    c = len(pred)
    r = min((len(x) for x in refs), key=lambda n: (abs(n - c), n))
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * clipped / c


def regex_match(prediction: str, patterns: Sequence[str]) -> float:
    for p in patterns:
        try:
            if re.compile(p, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE).match(prediction) is not None:
                return 1.0
        except re.error:
            continue
    return 0.0
