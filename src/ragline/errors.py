"""One exception type for bad input: its message names the problem and the fix, in one line."""


class RaglineError(Exception):
    """A user-facing error. ``str(err)`` is ``"<problem>; <fix>"`` and fits on one line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
