"""Yield points: places in long model work where the task doing it may let another run the model first.

The server decodes a few batches at once, each a task of its one model thread, taking turns on the model
(:mod:`ragline.serve.turns`). A batch's work gives way at :func:`point`: before each decoding step, between the
prefill's packs and between thorough decoding's scoring passes, so no single turn lasts the whole prefill of a
large batch. The serving worker sets the hook for its batch's task (:func:`hooked`); everywhere else (the CLI,
evaluation, training, other tasks and threads) no hook is set and :func:`point` returns at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_hook: ContextVar[Callable[[], None] | None] = ContextVar("ragline_yield_hook", default=None)


def point() -> None:
    """A place where the current thread's work may give way (calls the hook set by :func:`hooked`, if any)."""
    hook = _hook.get()
    if hook is not None:
        hook()


@contextmanager
def hooked(hook: Callable[[], None]) -> Iterator[None]:
    """Within the block (in this thread or task), :func:`point` calls ``hook``."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
