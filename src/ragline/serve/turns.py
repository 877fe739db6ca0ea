"""Turns on the model: batches decoded at once run it one at a time, step by step, the least served first.

The serving worker decodes up to a few batches at once, each in its own thread. A batch computes only while it
holds the turn (:meth:`Turns.hold`). At each yield point of its work (:mod:`ragline.yielding`: before every
decoding step, between prefill packs and between scoring passes) it calls :meth:`Turns.give_way`, which hands
the turn on when a waiting batch comes before it. So model calls never run concurrently (two torch jobs on the
same cores slow each other far more than 2x), and a batch that arrives while another decodes starts at the
other's next step or pack instead of after its last.

Who comes first: the batch of least

    priority = seconds it has held the turn - AGING x seconds it has waited since it last held it

(ties: the one that came first). A batch that has just arrived has held the turn for no time, so it goes at
the next yield point, and a short one (a greedy answer, a few steps) finishes before long ones (thorough beam
search) get the turn back: the least-attained-service rule, which needs no estimate of a batch's length and
favours short batches without knowing which they are. Waiting lowers a batch's priority value, so a long
batch behind a stream of new ones still gets its turn: once it has waited 1 / AGING seconds for each second
it has held the turn more than the newcomer. Batches of equal service alternate step by step.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

AGING = 0.5  # how much a second of waiting counts against a second of holding the turn


@dataclass
class _Ticket:
    """A batch's place: its service so far and when it last started waiting or holding."""

    order: int           # arrival: ties go to the oldest
    served: float = 0.0  # seconds it has held the turn, up to ``since`` when it holds it now
    since: float = 0.0   # when it last started waiting (in line) or holding (held)

    def priority(self, now: float, waiting: bool) -> float:
        """The module docstring's priority at ``now``: service so far, less AGING x the wait (waiting), or
        plus the turn held since ``since`` (holding)."""
        return self.served - AGING * (now - self.since) if waiting else self.served + (now - self.since)

    def rank(self) -> tuple[float, int]:
        """While waiting: its priority plus AGING x now, the same for every waiter, so the order of waiters
        does not change as time passes."""
        return self.priority(0.0, waiting=True), self.order


class Turns:
    """One turn on the model: whoever holds it runs the model; the others wait, the least served first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._clock = clock
        self._line: list[_Ticket] = []  # the batches waiting
        self._held: _Ticket | None = None
        self._count = itertools.count()
        self._mine = threading.local()  # the calling thread's ticket, inside hold()
        self.handovers = 0  # times give_way passed the turn to a waiting batch

    def _take(self, ticket: _Ticket) -> None:
        with self._cond:
            ticket.since = self._clock()
            self._line.append(ticket)
            self._cond.wait_for(lambda: self._held is None and min(self._line, key=_Ticket.rank) is ticket)
            self._line.remove(ticket)
            self._held, ticket.since = ticket, self._clock()

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            ticket.served += self._clock() - ticket.since
            self._held = None
            self._cond.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for the turn (waiting batches take it in order of priority: the module docstring), run the
        block, hand the turn on."""
        ticket = _Ticket(next(self._count))
        self._mine.ticket = ticket
        self._take(ticket)
        try:
            yield
        finally:
            self._leave(ticket)
            self._mine.ticket = None

    def give_way(self) -> None:
        """Called by the holder at a yield point: if a waiting batch comes before it (lower priority value:
        the module docstring), let that one run first."""
        ticket: _Ticket | None = getattr(self._mine, "ticket", None)
        with self._cond:
            if not self._line or ticket is None:
                return
            now = self._clock()
            best = min(self._line, key=_Ticket.rank)
            if best.priority(now, waiting=True) >= ticket.priority(now, waiting=False):
                return
            self.handovers += 1
        self._leave(ticket)
        self._take(ticket)

    @property
    def waiting(self) -> int:
        """Threads waiting for the turn."""
        with self._cond:
            return len(self._line)
