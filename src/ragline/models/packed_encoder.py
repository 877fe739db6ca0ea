"""An encoder-decoder generator's encoder over packed rows: no padding computed.

A padded batch computes every row's encoder to the longest row's length. Packed, the rows' real tokens sit on
one axis, (1, S) with S the sum of their lengths; each token keeps its position within its own row (BART's
learned positions are looked up per row) and each row's queries read only its own keys
(:mod:`ragline.models.packed_attention`, a bidirectional mask within the row):

    h_r = Encoder(x_r)      for each row r, computed together as one sequence of S tokens,

the same result as the padded pass at each real token (to the float rounding of a softmax over fewer masked
entries); the states are then laid out padded again, (N, L, d) with the row mask, for the decoder's
cross-attention, which is a small share of the work (answers are a few tokens). Used to score answers
(training's pass; differentiable, its gradient flows as through the padded pass) and to start decoding them.

Supported where the encoder has a learned position table that takes position ids (BART, mBART and their kin)
and the model runs transformers' sdpa attention; others (T5's relative positions, sinusoidal tables, eager
attention) stay padded: :func:`supports`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch

from ragline.models import packed_attention
from ragline.models.forward_swap import swapped_forward
from ragline.models.packed_attention import LAYOUT, PackedRows


def supports(model: torch.nn.Module) -> bool:
    """Whether ``model``'s encoder can run packed (module docstring); switches it to the packed attention
    (calls without a layout compute as before)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    table = getattr(encoder, "embed_positions", None)
    if table is None or "position_ids" not in inspect.signature(table.forward).parameters:
        return False
    return packed_attention.enable(model)


def encode_packed(model: torch.nn.Module, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden states of ``rows`` (token ids, no padding), computed packed and laid out
    right-padded: ((N, L, d), (N, L) attention mask), L the longest row."""
    encoder = model.get_encoder()
    device = next(model.parameters()).device
    lengths = [len(r) for r in rows]
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)[None]  # (1, S)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)  # (S,) within each row
    bounds, lo = [], 0
    for n in lengths:
        bounds.append((lo, lo + n))
        lo += n
    layout = PackedRows(queries=bounds, keys=[torch.arange(a, b, device=device) for a, b in bounds],
                        masks=[torch.ones((b - a, b - a), dtype=torch.bool, device=device) for a, b in bounds])
    with _row_positions(encoder.embed_positions, positions):
        packed = encoder(input_ids=ids, attention_mask=None, **{LAYOUT: layout}).last_hidden_state[0]  # (S, d)
    width = max(lengths)
    hidden = packed.new_zeros((len(rows), width, packed.shape[-1]))  # (N, L, d)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, (a, b) in enumerate(bounds):
        hidden[r, : b - a] = packed[a:b]
        mask[r, : b - a] = 1
    return hidden, mask


def _row_positions(table: torch.nn.Module, positions: torch.Tensor) -> AbstractContextManager[None]:
    """``table`` (the encoder's position embedding) looks up ``positions`` (S,) for the packed call, whatever
    the encoder passes it (it derives positions 0..S-1 from the input's shape); given back afterwards."""

    def make(real):
        def forward(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            kwargs.pop("position_ids", None)
            return real(input_ids, *args, position_ids=positions, **kwargs)

        return forward

    return swapped_forward(table, make)
