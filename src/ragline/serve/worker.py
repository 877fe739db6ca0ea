"""The model worker: one thread owns the RAG model, so model calls never run concurrently, and questions that
arrive together with the same settings are decoded in one batch.

Requests wait in a bounded queue (a full queue refuses new ones: :class:`Busy`, answered 503 with Retry-After).
The worker takes the first, then keeps taking requests with the same settings (model, decoding, k, retrieval
mode, beams, max tokens) that arrive within ``window`` seconds, while the batch stays within ``max_batch``
questions and the :class:`Budget`'s generator tokens, and answers them with one ``RagModel.answer`` call (one
retrieval, one decoding). Streaming requests batch like the others: each gets its own passages as soon as they
are retrieved, and its own best answer text after every decoding step.

A request whose client has gone (:meth:`Job.abandon`) is dropped before it runs, and a batch all of whose
clients have gone stops decoding at the next step; one that leaves a batch others still wait on is decoded to
the end of the batch, its events dropped (``abandoned`` counts all three). The thread survives any exception:
a failing batch fails its own requests only, and a thread that died anyway is started again by the next
request; ``/health`` reports whether it is alive, the queue's depth and the budget.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field
from typing import Any

from ragline.errors import RaglineError
from ragline.rag.model import DecodingStopped, RagModel, Source
from ragline.serve.budget import Budget, Busy, Settings

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
    """The thread that owns the model: takes jobs from the queue, batches them, answers them."""

    def __init__(self, rag: RagModel, max_batch: int = 8, window: float = 0.01, budget: Budget | None = None) -> None:
        self.rag, self.max_batch, self.window = rag, max_batch, window
        self.budget = budget or Budget()
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=self.budget.max_queue)
        self.batch_count = self.question_count = 0  # since the start
        self.abandoned = self.failed_batches = self.restarts = 0
        self.running = 0  # questions in the batch being decoded now
        self._pending: deque[Job] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ragline-model", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        """What /health reports of the worker."""
        return {"alive": self.alive, "queued": self.queue.qsize() + len(self._pending), "running": self.running,
                "abandoned": self.abandoned, "failed_batches": self.failed_batches, "restarts": self.restarts,
                "budget": asdict(self.budget), "max_batch": self.max_batch}

    def ask(self, question: str, settings: Settings, on_step: Callable[[str], None] | None = None,
            on_passages: Callable[[list[Source]], None] | None = None) -> Job:
        """Queue a question after checking its cost against the budget (:class:`TooLarge` when over it): what
        every protocol (native, OpenAI-compatible, MCP) calls; :class:`Busy` when the queue is full."""
        tokens = self.question_tokens(question)
        cost = self.budget.check(settings, tokens)
        return self.submit(question, settings, cost, on_step=on_step, on_passages=on_passages)

    def question_tokens(self, text: str) -> int:
        """Generator tokens of ``text`` (what the budget counts a question in)."""
        return len(self.rag.generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, question: str, settings: Settings, cost: int = 0,
               on_step: Callable[[str], None] | None = None,
               on_passages: Callable[[list[Source]], None] | None = None) -> Job:
        """Queue a question; :class:`Busy` when the queue is full."""
        with self._lock:
            if not self.alive:  # the thread died despite its guard: a new one serves the queue
                self.restarts += 1
                log.error("the model worker thread had stopped; starting a new one")
                self._start()
        job = Job(question, settings, cost, on_step=on_step, on_passages=on_passages)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy: {self.budget.max_queue} requests are already waiting",
                       f"retry in a few seconds (Retry-After: {Busy.retry_after})") from None
        return job

    def _next(self, timeout: float | None) -> Job | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _claim(self, job: Job) -> bool:
        """Mark ``job`` running; False (and dropped) when its client has gone."""
        if job.gone.is_set() or not job.future.set_running_or_notify_cancel():
            self.abandoned += 1
            return False
        return True

    def _loop(self) -> None:
        while True:
            try:
                self._serve_one_batch()
            except BaseException:  # noqa: BLE001 - the worker outlives every failure; each is logged
                log.exception("the model worker caught an error outside a batch")
                self.failed_batches += 1

    def _serve_one_batch(self) -> None:
        job = self._next(None)
        if job is None or not self._claim(job):
            return
        batch, cost = [job], job.cost
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            nxt = self._next(deadline - time.monotonic())
            if nxt is None:
                break
            if nxt.settings != job.settings or cost + nxt.cost > self.budget.max_batch_tokens:
                self._pending.append(nxt)
                break
            if self._claim(nxt):
                batch.append(nxt)
                cost += nxt.cost
        self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        s = batch[0].settings
        self.batch_count += 1
        self.question_count += len(batch)
        self.running = len(batch)
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

        self.rag.mode, self.rag.filters = s.mode, s.filters  # only this thread uses the model
        try:
            answers: list[Any] = self.rag.answer(
                [j.question for j in batch], model=s.model, decoding=s.decoding, k=s.k, beams=s.beams,
                max_new_tokens=s.max_new_tokens, n_best=s.n_best, on_step=on_step if streams else None,
                on_passages=on_passages if streams else None,
                should_stop=lambda: all(j.gone.is_set() for j in batch))
        except DecodingStopped:
            self.abandoned += len(batch)
            for j in batch:
                _settle(j.future, error=DecodingStopped("the request was abandoned by its client"))
            return
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the thread goes on
            if not isinstance(e, RaglineError):
                self.failed_batches += 1
                log.exception("a batch of %d questions failed", len(batch))
            for j in batch:
                _settle(j.future, error=e)
            return
        finally:
            self.running = 0
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
