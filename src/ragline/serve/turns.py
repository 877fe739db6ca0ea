"""Turns on the model: all of a server's model work runs on one thread, batches taking turns step by step, the
least served first.

**One thread.** torch computes on OpenMP threads, and OpenMP keeps a pool of them for each thread that calls
into it. While a second such thread lives (the one that loaded the model, a batch's own thread, a request
thread that encoded a question), GNU OpenMP, finding more of its threads than cores, stops its idle threads
spinning, and every parallel region then waits for a thread to wake: on this project's 2-core machine each
torch operation took 10-40 us longer, and a RAG-Sequence answer 1.97 s against 1.41 s
(``benchmarks/serving.py``, README "Answer latency"). So :class:`Turns` runs every task it is given on one
thread of its own, the *model thread*: the server loads its model there (:meth:`Turns.call`), answers each
batch there (:meth:`Turns.start`) and encodes the questions of ``/search`` and ``/v1/embeddings`` there.

**Turns.** Each task runs in a greenlet of the model thread, so tasks take turns without threads: at each
yield point of its work (:mod:`ragline.yielding`: before every decoding step, between prefill packs and between
scoring passes) a batch calls :meth:`Turns.give_way`, which switches to a waiting task that comes before it.
Model calls never run concurrently (two torch jobs on the same cores slow each other far more than 2x), and a
batch that arrives while another decodes starts at the other's next step or pack instead of after its last.

Who comes first: the task of least

    priority = seconds it has held the turn - AGING x seconds it has waited since it last held it

(ties: the one that came first). A task that has just arrived has held the turn for no time, so it goes at
the next yield point, and a short one (a greedy answer, a few steps) finishes before long ones (thorough beam
search) get the turn back: the least-attained-service rule, which needs no estimate of a batch's length and
favours short batches without knowing which they are. Waiting lowers a task's priority value, so a long
batch behind a stream of new ones still gets its turn: once it has waited 1 / AGING seconds for each second
it has held the turn more than the newcomer. Batches of equal service alternate step by step.

torch's gradient mode is per thread; a task's is kept across its turns, and each starts in the thread's own.
Tasks must not block on each other (they share one thread): a task waits for another's result only through
:meth:`Turns.call`, which runs a call made on the model thread at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import greenlet
import torch

from ragline.serve.supervised import Supervised

AGING = 0.5  # how much a second of waiting counts against a second of holding the turn

log = logging.getLogger("ragline.serve")


@dataclass
class _Task:
    """A task's work, its result, its service so far and when it last started waiting or holding."""

    order: int           # arrival: ties go to the oldest
    work: Callable[[], Any]
    future: Future = field(default_factory=Future)
    served: float = 0.0  # seconds it has held the turn, up to ``since`` when it holds it now
    since: float = 0.0   # when it last started waiting (in line) or holding (held)
    runner: greenlet.greenlet | None = None  # its greenlet, once it has started
    grad: bool = False   # torch's gradient mode when it gave way

    def priority(self, now: float, waiting: bool) -> float:
        """The module docstring's priority at ``now``: service so far, less AGING x the wait (waiting), or
        plus the turn held since ``since`` (holding)."""
        return self.served - AGING * (now - self.since) if waiting else self.served + (now - self.since)

    def rank(self) -> tuple[float, int]:
        """While waiting: its priority plus AGING x now, the same for every waiter, so the order of waiters
        does not change as time passes."""
        return self.priority(0.0, waiting=True), self.order


class Turns:
    """The model thread and its turns: whoever holds the turn runs the model; the others wait, the least served
    first (module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()  # guards the line and the thread
        self._clock = clock
        self._line: list[_Task] = []  # the tasks waiting: new ones, and those that gave way
        self._count = itertools.count()
        self._held: _Task | None = None  # the task running now (set and read on the model thread)
        self._thread = Supervised(self._loop, "ragline-model")  # started by the first task
        self._hub: greenlet.greenlet | None = None  # the model thread's own greenlet, which picks the next task
        self.handovers = 0  # times give_way passed the turn to a waiting task

    @property
    def alive(self) -> bool:
        """Whether the model thread runs (or has not been needed yet)."""
        return not self._thread.started or self._thread.alive

    @property
    def restarts(self) -> int:
        """Model threads started again after one had stopped."""
        return self._thread.restarts

    @property
    def waiting(self) -> int:
        """Tasks waiting for the turn."""
        with self._cond:
            return len(self._line)

    def on_model_thread(self) -> bool:
        """Whether the caller runs on the model thread (inside a task)."""
        return self._thread.is_current()

    def start(self, work: Callable[[], Any]) -> Future:
        """Run ``work()`` on the model thread when it gets the turn (a new task goes at the running one's next
        yield point); the future gets its result or its exception."""
        with self._cond:
            task = _Task(next(self._count), work, since=self._clock())
            self._line.append(task)
            self._thread.ensure()  # started by the first task, and again if it died
            self._cond.notify_all()
        return task.future

    def call(self, work: Callable[[], Any]) -> Any:
        """``work()`` run on the model thread (at once when called there), its result returned or its exception
        raised here."""
        if self.on_model_thread():
            return work()
        return self.start(work).result()

    def give_way(self) -> None:
        """Called by the running task at a yield point: if a waiting task comes before it (lower priority value:
        the module docstring), let that one run first; this returns when the turn comes back."""
        task = self._held
        if task is None or greenlet.getcurrent() is not task.runner:  # not inside the running task
            return
        with self._cond:
            if not self._line:
                return
            now = self._clock()
            if min(self._line, key=_Task.rank).priority(now, waiting=True) >= task.priority(now, waiting=False):
                return
            self.handovers += 1
            task.served += now - task.since
            task.since = now
            self._line.append(task)
        task.grad = torch.is_grad_enabled()
        self._hub.switch()  # back to _loop; it switches here again when this task's turn comes
        torch.set_grad_enabled(task.grad)

    def _loop(self) -> None:
        """The model thread: give the turn to the first waiting task until it ends or gives way, then again.
        Every task starts, and every turn ends, in the thread's own gradient mode."""
        self._hub = greenlet.getcurrent()
        base = torch.is_grad_enabled()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._line)
                task = min(self._line, key=_Task.rank)
                self._line.remove(task)
                task.since = self._clock()
            if task.runner is None and not task.future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            self._held = task
            try:
                if task.runner is None:
                    task.runner = greenlet.greenlet(lambda t=task: self._run(t), parent=self._hub)
                task.runner.switch()
            except BaseException:  # noqa: BLE001 - _run settles every error; this is a failure of the switch
                log.exception("a task on the model thread failed outside its work")
                if not task.future.done():
                    task.future.set_exception(RuntimeError("the model thread failed to run this task"))
            finally:
                self._held = None
                torch.set_grad_enabled(base)  # what a task set (no_grad) does not leak into the next one's start

    def _run(self, task: _Task) -> None:
        """A task's greenlet: its work, then its result or error into its future."""
        try:
            task.future.set_result(task.work())
        except BaseException as e:  # noqa: BLE001 - the caller gets it; the model thread goes on
            task.future.set_exception(e)
        finally:
            task.served += self._clock() - task.since
