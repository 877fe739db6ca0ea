"""Activation checkpointing for a training pass: each transformer layer keeps only its inputs for the backward
pass and computes its activations again there, trading one more forward pass through the layers for the
activations of every layer held at once (benchmarks/training.py measures both).

transformers' own switch (``gradient_checkpointing_enable``) checkpoints a layer only while the layer is in
training mode, and ragline trains in eval mode (no dropout, so a step is a deterministic function of the
weights and the batch, and a resumed run equals an uninterrupted one); turning a layer's training flag on
would turn on the dropout some layers apply themselves (BART's). :func:`checkpointed_layers` instead wraps
each layer's ``forward`` in ``torch.utils.checkpoint`` (non-reentrant) for the span of one forward pass,
leaving every flag alone. The recomputation in the backward pass runs the same function on the same inputs
(no dropout; the autocast state is restored by ``torch.utils.checkpoint``), so losses and gradients equal
those of a pass without it (tests/test_packed_training.py).

A layer that fills a key/value cache cannot be recomputed (it would fill it twice), so, as transformers does,
a checkpointed layer is given no cache: the training passes read logits only (the packed causal pass gives
none in the first place, :func:`ragline.models.prefill.packed_pass` with ``past`` None).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from ragline.errors import RaglineError
from ragline.models.forward_swap import swapped_forward

CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")  # transformers' names for a cache


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of ``model`` (transformers' GradientCheckpointingLayer modules)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed(forward):
    """``forward`` (a layer's, or one a hook library set on the instance) run under checkpointing."""

    def run(*args, **kwargs):
        for name in CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(partial(forward, **kwargs), *args, use_reentrant=False)

    return run


@contextmanager
def checkpointed_layers(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every transformer layer of ``model`` keeps only its inputs and recomputes its
    activations in the backward pass (which may come after the block); yields how many layers that is."""
    if not enabled:
        yield 0
        return
    layers = checkpointable_layers(model)
    if not layers:
        raise RaglineError(f"{type(model).__name__} has no transformer layers to checkpoint",
                           "train without --activation-checkpointing")
    with ExitStack() as stack:
        for m in layers:
            stack.enter_context(swapped_forward(m, _checkpointed))
        yield len(layers)
