"""A module's ``forward`` replaced for a block and given back after, leaving the module otherwise untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch


@contextmanager
def swapped_forward(module: torch.nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Within the block, ``module`` runs ``make(forward)``, ``forward`` being the one it runs now (its class's,
    or one a hook library set on the instance). Set as an instance attribute, which ``nn.Module.__call__``
    finds before the class's; afterwards the instance's own forward is back, or none."""
    own = module.__dict__.get("forward")
    module.forward = make(own or partial(type(module).forward, module))  # the class's, bound as a partial
    try:
        yield
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own
