"""Turns on the model: batches decoded at once run it one at a time, step by step, first come first served.

The serving worker decodes up to a few batches at once, each in its own thread. A batch computes only while it
holds the turn (:meth:`Turns.hold`). At each yield point of its work (:mod:`ragline.yielding`: before every
decoding step, between prefill packs and between scoring passes) it calls :meth:`Turns.give_way`, which hands
the turn to the batch that has waited longest, if any, and queues for it again. So model calls never run
concurrently (two torch jobs on the same cores slow each other far more than 2x), and a batch that arrives while
another decodes starts at the other's next step or pack instead of after its last.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Turns:
    """A first-come-first-served turn: whoever holds it runs the model; the others wait in line."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: deque[object] = deque()  # tickets of the threads waiting, oldest first
        self._held = False
        self.handovers = 0  # times give_way passed the turn to a waiting batch

    def _take(self) -> None:
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            self._cond.wait_for(lambda: not self._held and self._line[0] is ticket)
            self._line.popleft()
            self._held = True

    def _leave(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for the turn (behind every thread already waiting), run the block, hand the turn on."""
        self._take()
        try:
            yield
        finally:
            self._leave()

    def give_way(self) -> None:
        """Called by the holder at a yield point: if another thread waits, let it run its part first."""
        with self._cond:
            if not self._line:
                return
            self.handovers += 1
        self._leave()
        self._take()

    @property
    def waiting(self) -> int:
        """Threads waiting for the turn."""
        with self._cond:
            return len(self._line)
