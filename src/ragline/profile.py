"""Where an answer's time goes: named stages timed, and counters (prompt tokens computed), when a caller asks.

Off by default: :func:`stage` is then a no-op context and :func:`count` returns at once, so the answer path
pays nothing. ``benchmarks/latency.py`` turns it on around each question::

    with profile.recording() as rec:
        rag.answer([question])
    rec.seconds["prefill"], rec.counts["prompt_tokens"]

Stages nest by name only (a stage's time includes the stages inside it); one recording is active at a time
(the benchmark runs one question at a time, in one thread).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Stage names, stated once (benchmarks/latency.py prints them in this order).
ENCODE, SEARCH, PREFILL, DECODE, SCORE = "question encoding", "retrieval", "prefill", "decoding steps", "scoring"
STAGES = (ENCODE, SEARCH, PREFILL, DECODE, SCORE)
# Counters: real prompt tokens the rows hold; positions the model actually computed in the prefill (padding
# included, cached prefixes excluded); positions served from the prefix / passage cache instead.
PROMPT_TOKENS, COMPUTED_TOKENS, CACHED_TOKENS = "prompt_tokens", "computed_tokens", "cached_tokens"
# Decoding: cached steps taken, and generator rows they computed (summed over the steps).
DECODE_STEPS, DECODE_ROWS = "decode_steps", "decode_rows"


@dataclass
class Recording:
    """Seconds per stage and counts accumulated while :func:`recording` was active."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


_active: Recording | None = None


@contextmanager
def recording() -> Iterator[Recording]:
    """Record stages and counters until the block ends."""
    global _active
    previous, _active = _active, Recording()
    try:
        yield _active
    finally:
        _active = previous


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block under ``name`` when a recording is active."""
    rec = _active
    if rec is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        rec.seconds[name] += time.perf_counter() - t0


def count(name: str, n: int) -> None:
    """Add ``n`` to counter ``name`` when a recording is active."""
    if _active is not None:
        _active.counts[name] += int(n)
