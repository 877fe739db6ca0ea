"""The model worker: one thread owns the RAG model, so model calls never run concurrently, and questions that
arrive together with the same settings are decoded in one batch.

Requests wait in a queue. The worker takes the first, then keeps taking requests with the same settings
(model, decoding, k, retrieval mode, beams, max tokens) that arrive within ``window`` seconds, up to
``max_batch``, and answers them with one ``RagModel.answer`` call (one retrieval, one decoding). Streaming
requests batch like the others: each gets its own passages as soon as they are retrieved, and its own best
answer text after every decoding step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ragline.rag.model import RagModel, Source


@dataclass(frozen=True)
class Settings:
    """What a request asks of the model; requests with equal settings can share a batch."""

    model: str
    decoding: str | None
    k: int
    mode: str
    beams: int
    max_new_tokens: int


@dataclass
class Job:
    """One queued question, the future its answer goes to, and its streaming callbacks."""

    question: str
    settings: Settings
    future: Future = field(default_factory=Future)
    on_step: Callable[[str], None] | None = None  # streaming: best text so far
    on_passages: Callable[[list[Source]], None] | None = None  # streaming: the retrieved passages


class ModelWorker:
    """The thread that owns the model: takes jobs from the queue, batches them, answers them."""

    def __init__(self, rag: RagModel, max_batch: int = 8, window: float = 0.01) -> None:
        self.rag, self.max_batch, self.window = rag, max_batch, window
        self.queue: queue.Queue[Job] = queue.Queue()
        self.batch_count = self.question_count = 0  # since the start
        self._pending: deque[Job] = deque()
        self._thread = threading.Thread(target=self._loop, name="ragline-model", daemon=True)
        self._thread.start()

    def submit(self, question: str, settings: Settings, on_step: Callable[[str], None] | None = None,
               on_passages: Callable[[list[Source]], None] | None = None) -> Future:
        job = Job(question, settings, on_step=on_step, on_passages=on_passages)
        self.queue.put(job)
        return job.future

    def _next(self, timeout: float | None) -> Job | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            batch = [job]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                nxt = self._next(deadline - time.monotonic())
                if nxt is None:
                    break
                if nxt.settings == job.settings:
                    batch.append(nxt)
                else:
                    self._pending.append(nxt)
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        s = batch[0].settings
        self.batch_count += 1
        self.question_count += len(batch)
        streams = [j for j in batch if j.on_step is not None]

        def on_step(texts: list[str]) -> None:
            for j, text in zip(batch, texts, strict=True):
                if j.on_step is not None:
                    j.on_step(text)

        def on_passages(sources: list[list[Source]]) -> None:
            for j, srcs in zip(batch, sources, strict=True):
                if j.on_passages is not None:
                    j.on_passages(srcs)

        self.rag.mode = s.mode  # only this thread uses the model
        try:
            answers: list[Any] = self.rag.answer(
                [j.question for j in batch], model=s.model, decoding=s.decoding, k=s.k, beams=s.beams,
                max_new_tokens=s.max_new_tokens,
                on_step=on_step if streams else None, on_passages=on_passages if streams else None)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error
            for j in batch:
                j.future.set_exception(e)
            return
        for j, a in zip(batch, answers, strict=True):
            j.future.set_result(a)
