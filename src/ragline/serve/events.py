"""A queued question's progress, handed from the model worker's thread to the event loop of the request
that streams it: what the native stream, the OpenAI-compatible stream and MCP share."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ragline.serve.budget import Settings
from ragline.serve.worker import Job, ModelWorker

PASSAGES, PARTIAL, END = "passages", "partial", "end"
_LINE_SEPARATORS = {ord("\u2028"): "\\u2028", ord("\u2029"): "\\u2029"}


def event_json(obj: Any) -> str:
    """``obj`` as JSON for one server-sent event's ``data`` line: non-ASCII text as it is, but U+2028 and
    U+2029 escaped (``\\u2028``), which some event parsers and JavaScript's ``.`` take for line breaks (a
    passage holding one would otherwise cut the event short)."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_SEPARATORS)


class JobEvents:
    """Queue ``question`` on ``worker`` now (so a refusal, :class:`TooLarge` or :class:`Busy`, is raised
    before any response starts) and iterate its events: ``(PASSAGES, [Source])`` once retrieved,
    ``(PARTIAL, text)`` after every decoding step (with ``steps``), then ``(END, future)`` holding the answer
    or its error. A consumer that stops before the end (its client went away) abandons the job."""

    def __init__(self, worker: ModelWorker, question: str, settings: Settings, steps: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.job: Job = worker.ask(question, settings, on_step=(lambda t: self._post(PARTIAL, t)) if steps else None,
                                   on_passages=lambda s: self._post(PASSAGES, s))
        self.job.future.add_done_callback(lambda f: self._post(END, f))

    def _post(self, kind: str, data: Any) -> None:  # from the worker thread; a closed loop means the client left
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, data))
        except RuntimeError:
            self.job.abandon()

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        finished = False
        try:
            while True:
                kind, data = await self._queue.get()
                if kind == END:
                    finished = True
                yield kind, data
                if finished:
                    return
        finally:
            if not finished:  # the client left mid-stream: stop decoding for it
                self.job.abandon()


async def result(job: Job) -> Any:
    """The answer of ``job``, awaited; a request cancelled meanwhile (its client left) abandons the job."""
    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.abandon()
        raise

