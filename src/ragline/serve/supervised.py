"""A daemon thread that is started again when it has died: the server's batching thread and model thread.

Each loops forever and guards itself against every error its work raises; should one die anyway (an error in
the guard itself, a thread killed from outside), the next request that needs it starts a new one
(:meth:`Supervised.ensure`), and ``/health`` counts the restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ragline.serve")


class Supervised:
    """A daemon thread named ``name`` running ``target``, started by :meth:`ensure` when it is not running:
    the first time, and again after it died (counted in ``restarts``). Callers serialise :meth:`ensure`."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target, self.name = target, name
        self.thread: threading.Thread | None = None
        self.restarts = 0  # threads started again after one had stopped

    @property
    def started(self) -> bool:
        """Whether a thread was ever started (a model thread starts with the first task)."""
        return self.thread is not None

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self.thread is not None and self.thread.is_alive()

    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        return self.thread is not None and threading.current_thread() is self.thread

    def ensure(self) -> None:
        """Start the thread unless it runs; a thread that had died is logged and counted."""
        if self.alive:
            return
        if self.thread is not None:
            self.restarts += 1
            log.error("the %s thread had stopped; starting a new one", self.name)
        self.thread = threading.Thread(target=self._target, name=self.name, daemon=True)
        self.thread.start()
