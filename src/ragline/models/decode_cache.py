"""A decoding cache that does not copy itself at every step.

transformers' ``DynamicCache`` grows each layer by concatenation (``torch.cat``: the whole cache is copied to
add one token) and follows the beams by ``index_select`` (the whole cache is copied again). At decoding time
a row's cache is its prompt's keys and values, then one column per generated token; beam search reorders
rows only among the beams of one prompt, whose prompt columns are the same. So here each layer keeps its keys
and values in buffers with room for more columns (``reserve``):

* a step writes its token's column in place (no copy of what is there);
* rows that follow beams of their own prompts (the row a beam continues reads the same prompt) gather their
  generated columns only (:meth:`DecodeLayer.reorder_tail`, in place), not the prompt's;
* any other change of rows (rows leaving the batch, the first step's copies of a prompt for each beam) copies
  the rows (:meth:`DecodeLayer.reorder_cache`, as ``DynamicCache``).

The attention reads the same keys and values, as a view of the buffer (the first ``length`` columns): the
same values, so the same result as the concatenated cache, bit for bit.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

RESERVE = 32  # columns a buffer keeps free for the tokens to come (the default answer limit, 32, fits)


class DecodeLayer(DynamicLayer):
    """One layer's keys and values, (N, kv_heads, length, head_dim), in buffers with ``reserve`` more columns
    free for the steps to come (``self.keys``/``self.values`` view the first ``length``)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompt: int, reserve: int | None = None) -> None:
        super().__init__()
        self.prompt = prompt  # columns [0, prompt) depend only on the row's prompt
        self.reserve = RESERVE if reserve is None else reserve
        self.device, self.is_initialized = keys.device, True
        self._set(keys, values)

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Buffers holding ``keys``/``values`` (N, H, length, d) with ``reserve`` free columns after them."""
        n, h, length, d = keys.shape
        self._k = keys.new_empty((n, h, length + self.reserve, d))
        self._v = values.new_empty((n, h, length + self.reserve, values.shape[-1]))
        self._k[:, :, :length], self._v[:, :, :length] = keys, values
        self._view(length)

    def _view(self, length: int) -> None:
        self.length = length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]  # what attention reads

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` (N, H, s, d) in place; the buffers grow (one copy, with
        ``reserve`` more free columns) only when they are full."""
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:
            self._set(self.keys, self.values)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self._view(end)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows ``beam_idx`` (N',) of the cache, copied into new buffers (any change of rows)."""
        idx = beam_idx.to(self.device)
        self._set(self.keys.index_select(0, idx), self.values.index_select(0, idx))

    def reorder_tail(self, beam_idx: torch.LongTensor) -> None:
        """Rows ``beam_idx`` (N,) where row i and row ``beam_idx[i]`` read the same prompt: only the generated
        columns move, in place."""
        if self.length > self.prompt:
            idx = beam_idx.to(self.device)
            tail = slice(self.prompt, self.length)
            self._k[:, :, tail] = self._k[idx, :, tail]  # (N, H, generated, d): gathered, then written
            self._v[:, :, tail] = self._v[idx, :, tail]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.arange(self.keys.shape[0], device=self.device)[indices])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # checks the argument, then views fewer columns
        self._view(self.keys.shape[-2])


def decode_cache(cache: object, rows: torch.Tensor, reserve: int | None = None) -> DynamicCache | None:
    """A copy of ``cache``'s rows ``rows`` (N',) in :class:`DecodeLayer` buffers, whose columns so far are the
    prompts'; None where a layer is not a plain ``DynamicLayer`` (a sliding window's, say), which keeps its
    own cache. ``cache`` is left as it is."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    out = DynamicCache()
    out.layers = [DecodeLayer(layer.keys.index_select(0, rows.to(layer.keys.device)),
                              layer.values.index_select(0, rows.to(layer.values.device)),
                              layer.keys.shape[-2], reserve) for layer in layers]
    return out


def is_decode_cache(cache: object) -> bool:
    """Whether ``cache`` holds :class:`DecodeLayer` buffers (made by :func:`decode_cache`)."""
    return all(isinstance(layer, DecodeLayer) for layer in getattr(cache, "layers", None) or [None])


def reorder_tail(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Every layer's :meth:`DecodeLayer.reorder_tail`: rows ``rows`` (N,), each reading its own row's prompt."""
    for layer in cache.layers:
        layer.reorder_tail(rows)
