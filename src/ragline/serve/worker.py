"""The model worker: questions that arrive together with the same settings are decoded in one batch, and up to
``max_running`` batches of different settings are decoded at once, taking turns on the model step by step.

Requests wait in a bounded line (a full line refuses new ones: :class:`Busy`, answered 503 with Retry-After).
The worker's thread starts a batch with the oldest waiting request whose settings (model, decoding, k, retrieval
mode, beams, max tokens, filters) no decoding batch has, while fewer than ``max_running`` batches decode: it
takes every waiting request with those settings, and those arriving within ``window`` seconds, while the batch
stays within ``max_batch`` questions and the :class:`Budget`'s generator tokens, and hands the batch to the
model thread (:mod:`ragline.serve.turns`), which runs all model work of the server. There the batch is answered
with one ``RagModel.answer`` call (one retrieval, one decoding) when it gets the turn; at every yield point of
its work (:mod:`ragline.yielding`: before each decoding step, between prefill packs and scoring passes) the
turn passes to a waiting batch that comes first: the least served, with waiting counted in, so a new or short
batch goes before long ones; a batch that waited for its turn takes in the requests of its settings that
arrived meanwhile. So a question never waits for the whole of a batch with other settings (a RAG-Token
question behind eight RAG-Sequence ones), while questions with the settings of a decoding batch wait for it to
end and are then decoded together (measured: a second batch of the same settings decoding alongside the first
makes both smaller and the server slower; benchmarks/serving.py).
Streaming requests batch like the others: each gets its own passages as soon as they are retrieved, and its own
best answer text after every decoding step.

A request whose client has gone (:meth:`Job.abandon`) is dropped before it runs (until its batch gets the turn),
and a batch all of whose clients have gone stops decoding at the next step; one that leaves a batch others
still wait on is decoded to the end of the batch, its events dropped (``abandoned`` counts all three). The
threads survive any exception: a failing batch fails its own requests only, and a worker or model thread that
died anyway is started again by the next request; ``/health`` reports whether they are alive, the line's length,
the questions decoding and the budget.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field
from typing import Any

from ragline import yielding
from ragline.errors import RaglineError
from ragline.rag.model import DecodingStopped, RagModel, Source
from ragline.serve.budget import Budget, Busy, Settings
from ragline.serve.supervised import Supervised
from ragline.serve.turns import Turns

log = logging.getLogger("ragline.serve")


@dataclass
class Job:
    """One queued question, the future its answer goes to, and its streaming callbacks."""

    question: str
    settings: Settings
    cost: int = 0
    future: Future = field(default_factory=Future)
    on_step: Callable[[str], None] | None = None  # streaming: best text so far
    on_passages: Callable[[list[Source]], None] | None = None  # streaming: the retrieved passages
    gone: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        """The client has gone: drop the job if it has not started, stop its decoding if it has."""
        self.gone.set()
        self.future.cancel()


class ModelWorker:
    """Takes jobs from the line, batches them, and answers each batch on the model thread, the batches taking
    turns on the model step by step (at most ``budget.max_running`` of them at once, each with other settings).
    For full speed, ``rag`` is loaded on that thread: ``turns = Turns(); rag = turns.call(load)``, then
    ``ModelWorker(rag, turns=turns)`` (a model loaded on a thread that lives on, the main one, leaves a second
    OpenMP pool that slows every torch operation: :mod:`ragline.serve.turns`)."""

    def __init__(self, rag: RagModel, max_batch: int = 8, window: float = 0.01, budget: Budget | None = None,
                 turns: Turns | None = None) -> None:
        self.rag, self.max_batch, self.window = rag, max_batch, window
        self.budget = budget or Budget()
        self.batch_count = self.question_count = 0  # since the start
        self.abandoned = self.failed_batches = 0
        self.running = 0  # questions in the batches being decoded now
        self.calls = 0  # searches and embeddings waiting for or running on the model thread
        self._cond = threading.Condition()  # guards the line, the decoding batches' settings and the counts
        self._line: deque[Job] = deque()  # the requests waiting, oldest first
        self._decoding: list[Settings] = []  # the settings of the batches decoding now
        self.turns = turns or Turns()  # the model thread: one decoding batch at a time, step by step
        self._thread = Supervised(self._loop, "ragline-batches")  # the thread that starts batches
        self._thread.ensure()

    @property
    def alive(self) -> bool:
        """Whether the thread that starts batches and the model thread run."""
        return self._thread.alive and self.turns.alive

    def status(self) -> dict[str, Any]:
        """What /health reports of the worker."""
        return {"alive": self.alive, "queued": len(self._line), "calls": self.calls, "running": self.running,
                "abandoned": self.abandoned, "failed_batches": self.failed_batches,
                "restarts": self._thread.restarts + self.turns.restarts,
                "handovers": self.turns.handovers, "budget": asdict(self.budget), "max_batch": self.max_batch}

    def ask(self, question: str, settings: Settings, on_step: Callable[[str], None] | None = None,
            on_passages: Callable[[list[Source]], None] | None = None) -> Job:
        """Queue a question after checking its cost against the budget (:class:`TooLarge` when over it): what
        every protocol (native, OpenAI-compatible, MCP) calls; :class:`Busy` when the line is full."""
        tokens = self.question_tokens(question)
        cost = self.budget.check(settings, tokens)
        return self.submit(question, settings, cost, on_step=on_step, on_passages=on_passages)

    def question_tokens(self, text: str) -> int:
        """Generator tokens of ``text`` (what the budget counts a question in)."""
        return len(self.rag.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, question: str, settings: Settings, cost: int = 0,
               on_step: Callable[[str], None] | None = None,
               on_passages: Callable[[list[Source]], None] | None = None) -> Job:
        """Queue a question; :class:`Busy` when the line is full."""
        with self._cond:
            # a batching thread that died despite its guard is started again to serve the line (a model thread
            # that died is started again by the next batch: Turns.start)
            self._thread.ensure()
            if len(self._line) + self.calls >= self.budget.max_queue:
                raise Busy(f"the server is busy: {self.budget.max_queue} requests are already waiting",
                           f"retry in a few seconds (Retry-After: {Busy.retry_after})")
            job = Job(question, settings, cost, on_step=on_step, on_passages=on_passages)
            self._line.append(job)
            self._cond.notify_all()
        return job

    def call(self, work: Callable[[], Any]) -> Future:
        """Run ``work`` (a search, an embedding) on the model thread, counted with the waiting questions against
        the line's bound (:class:`Busy` when it is full); the future of its result. A request awaits it without
        holding a thread, so waiting searches never take the threads other routes (``/health``) need."""
        with self._cond:
            if len(self._line) + self.calls >= self.budget.max_queue:
                raise Busy(f"the server is busy: {self.budget.max_queue} requests are already waiting",
                           f"retry in a few seconds (Retry-After: {Busy.retry_after})")
            self.calls += 1
        try:
            future = self.turns.start(work)
        except BaseException:
            self._call_done()
            raise
        future.add_done_callback(lambda _: self._call_done())
        return future

    def _call_done(self) -> None:
        with self._cond:
            self.calls -= 1

    def _claim(self, job: Job) -> bool:
        """Mark ``job`` running; False (and dropped) when its client has gone."""
        if job.gone.is_set() or not job.future.set_running_or_notify_cancel():
            with self._cond:
                self.abandoned += 1
            return False
        return True

    def _loop(self) -> None:
        while True:
            try:
                self._start_one_batch()
            except BaseException:  # noqa: BLE001 - the worker outlives every failure; each is logged
                log.exception("the model worker caught an error outside a batch")
                with self._cond:
                    self.failed_batches += 1

    def _startable(self) -> Job | None:
        """(Holding the condition.) The oldest waiting request a new batch may start with, if any: its
        settings are no decoding batch's, and fewer than ``max_running`` batches decode. Requests whose clients
        have gone leave the line here."""
        for job in [j for j in self._line if j.gone.is_set() or j.future.cancelled()]:
            self._line.remove(job)
            self.abandoned += 1
        if len(self._decoding) >= self.budget.max_running:
            return None
        return next((j for j in self._line if j.settings not in self._decoding), None)

    def _start_one_batch(self) -> None:
        """Wait for a request that may start a batch, gather the batch and hand it to the model thread."""
        with self._cond:
            first = self._cond.wait_for(self._startable)  # the predicate's value: the request to start with
            self._line.remove(first)
            batch = [first]
            deadline = time.monotonic() + self.window
            while True:  # the waiting requests with its settings, then those arriving within the window
                self._join(batch)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or not self._cond.wait(left):
                    break
            self._decoding.append(first.settings)
        try:
            self.turns.start(lambda: self._decode(batch))
        except BaseException:
            self._done(first.settings)
            raise

    def _join(self, batch: list[Job]) -> None:
        """(Holding the condition.) Move the waiting requests with ``batch``'s settings into it, oldest first,
        while it stays within ``max_batch`` questions and the budget's batch tokens."""
        cost = sum(j.cost for j in batch)
        for job in [j for j in self._line if j.settings == batch[0].settings]:
            if len(batch) >= self.max_batch or cost + job.cost > self.budget.max_batch_tokens:
                return
            self._line.remove(job)
            batch.append(job)
            cost += job.cost

    def _done(self, settings: Settings) -> None:
        with self._cond:
            self._decoding.remove(settings)
            self._cond.notify_all()

    def _decode(self, batch: list[Job]) -> None:
        """A batch's task on the model thread, run when it gets the turn: take in the requests of its settings
        that arrived meanwhile (while another batch ran its step, nothing is lost by waiting for them), drop
        those whose clients left, and answer the rest."""
        try:
            with self._cond:
                self._join(batch)
            claimed = [j for j in batch if self._claim(j)]
            if claimed:
                self._run(claimed)
        except BaseException:  # noqa: BLE001 - a failure outside the model call: logged, the worker goes on
            log.exception("a batch's task caught an error outside its model call")
            with self._cond:
                self.failed_batches += 1
            for j in batch:
                _settle(j.future, error=RaglineError("the batch failed", "try again"))
        finally:
            self._done(batch[0].settings)

    def _run(self, batch: list[Job]) -> None:
        s = batch[0].settings
        with self._cond:
            self.batch_count += 1
            self.question_count += len(batch)
            self.running += len(batch)
        streams = [j for j in batch if j.on_step is not None]

        def tell(j: Job, callback: Callable[[Any], None] | None, value: Any) -> None:
            """One stream's callback; a failing one (its client gone) ends that stream, not the batch."""
            if callback is None or j.gone.is_set():
                return
            try:
                callback(value)
            except Exception:  # noqa: BLE001 - the other questions of the batch go on
                log.exception("a stream's callback failed; the stream is dropped")
                j.abandon()

        def on_step(texts: list[str]) -> None:
            for j, text in zip(batch, texts, strict=True):
                tell(j, j.on_step, text)

        def on_passages(sources: list[list[Source]]) -> None:
            for j, srcs in zip(batch, sources, strict=True):
                tell(j, j.on_passages, srcs)

        try:
            with yielding.hooked(self.turns.give_way):  # at each yield point, a less served batch goes first
                answers: list[Any] = self.rag.answer(
                    [j.question for j in batch], model=s.model, decoding=s.decoding, k=s.k, beams=s.beams,
                    max_new_tokens=s.max_new_tokens, n_best=s.n_best, on_step=on_step if streams else None,
                    on_passages=on_passages if streams else None,
                    should_stop=lambda: all(j.gone.is_set() for j in batch), mode=s.mode, filters=s.filters)
        except DecodingStopped:
            with self._cond:
                self.abandoned += len(batch)
            for j in batch:
                _settle(j.future, error=DecodingStopped("the request was abandoned by its client"))
            return
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the thread goes on
            if not isinstance(e, RaglineError):
                with self._cond:
                    self.failed_batches += 1
                log.exception("a batch of %d questions failed", len(batch))
            for j in batch:
                _settle(j.future, error=e)
            return
        finally:
            with self._cond:
                self.running -= len(batch)
        with self._cond:
            self.abandoned += sum(j.gone.is_set() for j in batch)  # left while their batch went on for the others
        for j, a in zip(batch, answers, strict=True):
            _settle(j.future, result=a)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its result or error; a future its client cancelled meanwhile is left as it is (setting
    it would raise InvalidStateError in the worker thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
