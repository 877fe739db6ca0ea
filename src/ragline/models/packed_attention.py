"""Attention for the packed prefill (:mod:`ragline.models.prefill`): each row's queries read its own keys only.

A packed pass holds several rows' tokens on one axis, and a dense attention over it computes every query
against every key of the pack, masking most of them away: for a pack of S tokens over P cached ones, S x (P + S)
scores per head and layer, where a row's tokens only ever read their own row's (about S / rows). This module
registers an attention implementation with transformers' ``AttentionInterface`` that, when the forward call
carries a :class:`PackedRows` layout under :data:`LAYOUT`, computes each row's attention on its own:

    out[q] = softmax(Q_q K_r^T * scaling + mask_r) V_r      for the queries q that row r computes,

with K_r, V_r the row's keys and values gathered in row order (its blocks read from the cache, computed by an
earlier row of the pack, or its own) and mask_r allowing key position <= query position within the row: the
same keys, values and causal rule as the dense masked pass, so the same result to the float rounding of a
softmax over fewer masked entries. Without a layout (decoding steps, training, any other call) it is exactly
transformers' ``sdpa`` attention, which it replaces only on models that use ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATION = "ragline_packed"  # the name registered with transformers
LAYOUT = "ragline_rows"  # the forward keyword that carries a PackedRows layout down to the attention layers


@dataclass
class PackedRows:
    """Which packed queries each row computes and which keys it reads."""

    queries: list[tuple[int, int]]  # per row: [lo, hi) on the packed (computed) axis, the tokens it owns
    keys: list[torch.Tensor]        # per row: (n_r,) positions on the past + packed axis, in row order
    masks: list[torch.Tensor]       # per row: (hi - lo, n_r) bool, True where the query may read the key


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query (1, H, S, d); key, value (1, KV, P + S, d); returns
    (1, S, H, d). Without ``kwargs[LAYOUT]``: transformers' sdpa attention, unchanged."""
    rows: PackedRows | None = kwargs.pop(LAYOUT, None)
    if rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.empty_like(query)  # (1, H, S, d)
    for (lo, hi), index, mask in zip(rows.queries, rows.keys, rows.masks, strict=True):
        if hi > lo:
            out[:, :, lo:hi] = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, lo:hi], key[:, :, index], value[:, :, index], attn_mask=mask, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1])  # (1, H, hi - lo, d)
    return out.transpose(1, 2).contiguous(), None


def enable(model: torch.nn.Module) -> bool:
    """Switch ``model`` from sdpa to this attention (registering it once); False, leaving the model as it is,
    where it uses another implementation or cannot switch. Calls without a layout compute as before."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == IMPLEMENTATION:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the masks decoding builds stay sdpa's
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except (ValueError, KeyError, ImportError):
        return False
    return config._attn_implementation == IMPLEMENTATION
