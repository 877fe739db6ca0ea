"""Answer metrics with the standard SQuAD answer normalisation, maximised over the gold answers.

    normalise(s) = lower-case, drop punctuation, drop the articles a / an / the, collapse white space
    EM(pred, golds) = max_g [normalise(pred) == normalise(g)]
    F1(pred, golds) = max_g  2 P R / (P + R) over the bags of normalised tokens (P = |common| / |pred|,
                      R = |common| / |gold|); 0 when nothing is shared; 1 when both are empty
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalise(prediction)
    return float(any(p == normalise(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalise(prediction).split(), normalise(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)
