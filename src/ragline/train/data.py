"""Training examples: (question, answers, optional positive pages), from JSONL, KILT or the FanOutQA dev split,
and the deterministic split into training and validation parts.

JSONL: one object per line with ``question`` (or ``input``), ``answers`` (list or string, or ``answer``) and
optionally ``id`` and ``positive`` (page titles or passage ids). KILT: ``input``, ``output[].answer``,
``output[].provenance[].title``. ``fanoutqa-dev`` converts the bundled dev split (top-level ids 0-7 only;
the held-out half 8-f is never read for training).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ragline import atomic
from ragline.errors import RaglineError
from ragline.questions import detect_format, load_fanoutqa, load_task
from ragline.questions.fanoutqa import DEV


@dataclass(frozen=True)
class Example:
    """One training example: a question, its gold answers and its positive pages (titles or passage ids)."""

    id: str
    question: str
    answers: tuple[str, ...]
    positives: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        """The target the generator is trained to produce: the first gold answer."""
        return self.answers[0]


def read_examples(spec: str, skip_bad: bool = False) -> list[Example]:
    """Examples of a training file (JSONL or KILT) or of ``fanoutqa-dev``."""
    if spec == DEV:
        return [Example(q.id, q.question, q.answers, q.gold_titles) for q in load_fanoutqa("dev")]
    if spec.startswith("fanoutqa-"):
        raise RaglineError(f"{spec} cannot be trained on", "train on fanoutqa-dev; the held-out half is for final "
                                                           "evaluation only")
    path = Path(spec)
    if path.is_file() and path.stat().st_size == 0:
        raise RaglineError(f"training file {path} is empty", "give one JSON example per line")
    fmt = "kilt" if path.is_file() and path.suffix == ".jsonl" and detect_format(path) == "kilt" else "jsonl"
    task = load_task(path, fmt, skip_bad)
    return [Example(q.id, q.question, q.answers, q.gold_titles) for q in task.questions]


def write_examples(path: Path, examples: list[Example]) -> None:
    """JSONL (atomically): the converter's output, readable by :func:`read_examples`."""
    atomic.write_bytes(path, "".join(json.dumps({"id": e.id, "question": e.question, "answers": list(e.answers),
                                                 "positive": list(e.positives)}, ensure_ascii=False) + "\n"
                                     for e in examples).encode())


def split_validation(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(training, validation): an example is held back when the hash of its id falls in the first
    ``fraction`` of the range, so the split is the same on every run and machine, whatever the order."""
    if not 0 <= fraction < 1:
        raise RaglineError(f"validation fraction {fraction} is not in [0, 1)", "pass e.g. --val-fraction 0.1")

    def held(e: Example) -> bool:
        return int.from_bytes(hashlib.blake2b(e.id.encode(), digest_size=8).digest(), "big") < fraction * 2**64

    train = [e for e in examples if not held(e)]
    val = [e for e in examples if held(e)]
    if not train:
        raise RaglineError("no training example left after holding back the validation part",
                           "give more examples or a smaller --val-fraction")
    return train, val
