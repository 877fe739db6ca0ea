"""Prompt prefill for decoder-only generators: no padding computed, shared prefixes computed once, and
passages' key/value states reused across questions. All of it exact.

A causal model's keys and values at a position depend on the tokens up to that position and on nothing
else. Every row (a prompt's token ids) is cut into blocks of ``BLOCK`` tokens; a block is named by a hash of
all the tokens up to its end (a hash chain), so rows whose first j blocks hold the same tokens share those
blocks' keys and values, bit for bit. In RAG's prompts the system prompt and template head open every row
and the passage comes before the question, so a passage's blocks are the same whichever question reads it.
The row's *tail*, what follows its last full block (the end of the passage, the question, the template's
end), is its own; so is its last token, whose logits are needed.

One prefill (:func:`prefill`) runs the model once over a single packed sequence (a batch of one) holding

* every distinct block of the batch that the :class:`PrefixCache` does not hold, once, and
* every row's tail,

each token attending to its row's earlier blocks (read from the cache as past keys and values, or computed in
the same pass) and to the earlier tokens of its own block; position ids are positions within the row. On a
model that uses sdpa attention each row's queries attend to that row's keys alone
(:mod:`ragline.models.packed_attention`); on others one attention over the pack applies this rule as a 4-D
mask. Then each row's keys and values are gathered, in row order, into one left-padded cache for
the cached decoding steps, as a padded prefill would have left them. Blocks computed here enter the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ragline import profile, yielding
from ragline.models import packed_attention
from ragline.models.packed_attention import LAYOUT, PackedRows

BLOCK = 16  # tokens per cached block: the tail each row recomputes is shorter than this plus its question
PACK_TOKENS = 1024  # tokens per packed pass (see prefill)


def block_keys(ids: Sequence[int], block: int = BLOCK, keep_last: int = 1) -> list[bytes]:
    """Hash-chain names of the row's full blocks, leaving out at least its last ``keep_last`` tokens (whose
    logits are wanted): key_j = H(key_{j-1} || tokens of block j)."""
    keys: list[bytes] = []
    digest = b""
    for j in range((len(ids) - keep_last) // block):
        digest = hashlib.blake2b(digest + array("q", ids[j * block : (j + 1) * block]).tobytes(),
                                 digest_size=16).digest()
        keys.append(digest)
    return keys


class PrefixCache:
    """Keys and values of token blocks, keyed by their hash chain (:func:`block_keys`); least recently used
    blocks leave first once the held bytes pass ``max_bytes``. Safe to share between threads.

    A block is a tensor (layers, 2, kv_heads, BLOCK, head_dim) in the model's dtype on its device. The cache
    belongs to one model's weights: :meth:`check_weights` empties it when any parameter has changed in place
    since (an optimiser step), so a trained model never reads the states of its earlier self."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._weights_version: int | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            kv = self._blocks.get(key)
            if kv is None:
                self.misses += 1
                return None
            self.hits += 1
            self._blocks.move_to_end(key)
            return kv

    def put(self, key: bytes, kv: torch.Tensor) -> None:
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return
            self._blocks[key] = kv
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0

    def check_weights(self, model: torch.nn.Module) -> None:
        """Empty the cache if the model's parameters changed since the last call (their in-place versions)."""
        version = sum(p._version for p in model.parameters())
        if version != self._weights_version:
            self.clear()
            self._weights_version = version


def cache_of_mb(mb: float) -> PrefixCache | None:
    """A cache of ``mb`` MiB, or None for 0 (no cache)."""
    return PrefixCache(int(mb * 2**20)) if mb > 0 else None


@dataclass
class _Node:
    """A span of one or more rows' tokens: a shared block (``key``) or a row's tail (``key`` None)."""

    key: bytes | None
    tokens: list[int]
    start: int                  # position of its first token within its rows
    ancestors: list[int]        # node indices before it in its rows, in order
    kv: torch.Tensor | None     # from the cache: (layers, 2, kv_heads, len, head_dim)
    offset: int = 0             # where its tokens sit on the combined past + packed axis


@dataclass
class Prefilled:
    """A prefill's result, laid out as a left-padded batch."""

    cache: object               # DynamicCache, (N, kv_heads, L, head_dim) per layer; None when not asked for
    attention_mask: torch.Tensor  # (N, L) 1 on real tokens
    positions: torch.Tensor     # (N,) the next position id of each row
    logits: torch.Tensor        # (N, T, V): the last ``keep_last[r]`` positions of row r, right-aligned


def prefill(model: torch.nn.Module, rows: Sequence[Sequence[int]], cache: PrefixCache | None = None,
            keep_last: Sequence[int] | None = None, block: int = BLOCK, pack_tokens: int = PACK_TOKENS,
            states: bool = True) -> Prefilled:
    """Run ``model`` over token rows as described in the module docstring; the logits of each row's last
    ``keep_last[r]`` positions (default 1) come back right-aligned in (N, max keep_last, V), zeros before.
    Without ``states`` the rows' keys and values are not gathered into a decoding cache (``cache`` of the
    result is None): what scoring and training need, the logits alone.

    Under autograd (training) the pass is differentiable: a block shared by several rows (the system prompt)
    is computed once and its gradient gathers every row's, as the padded pass's would. Blocks from ``cache``
    hold no gradient, so training passes no cache.

    Rows go in packs of about ``pack_tokens`` tokens, one after another: where the attention over a pack is
    one dense masked pass (pack² per layer, models without sdpa), it stays a small share of the linear
    layers' cost at this size, where one pack of every row would grow quadratically. Blocks a pack computes
    enter the cache before the next pack looks them up."""
    keep = list(keep_last) if keep_last is not None else [1] * len(rows)
    packs: list[list[int]] = [[]]
    held = 0
    for r, ids in enumerate(rows):
        if packs[-1] and held + len(ids) > pack_tokens:
            packs.append([])
            held = 0
        packs[-1].append(r)
        held += len(ids)
    if len(packs) == 1:
        return _prefill_pack(model, rows, cache, keep, block, states)
    parts = []
    for i, p in enumerate(packs):
        if i:
            yielding.point()  # a server's other batches may take their step between packs
        parts.append(_prefill_pack(model, [rows[r] for r in p], cache, [keep[r] for r in p], block, states))
    return _stack(parts)


def _stack(parts: list[Prefilled]) -> Prefilled:
    """Packs' results as one left-padded batch, rows in order."""
    from transformers import DynamicCache

    width = max(p.attention_mask.shape[1] for p in parts)
    t = max(p.logits.shape[1] for p in parts)

    def left(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:  # zeros before, along ``dim``
        pad = list(x.shape)
        pad[dim] = size - x.shape[dim]
        return torch.cat([x.new_zeros(pad), x], dim)

    layers = [] if parts[0].cache is None else [
        (torch.cat([left(p.cache.layers[i].keys, 2, width) for p in parts]),
         torch.cat([left(p.cache.layers[i].values, 2, width) for p in parts]))
        for i in range(len(parts[0].cache.layers))]
    return Prefilled(DynamicCache(ddp_cache_data=layers) if layers else None,
                     torch.cat([left(p.attention_mask, 1, width) for p in parts]),
                     torch.cat([p.positions for p in parts]), torch.cat([left(p.logits, 1, t) for p in parts]))


def _prefill_pack(model: torch.nn.Module, rows: Sequence[Sequence[int]], cache: PrefixCache | None,
                  keep: list[int], block: int, states: bool = True) -> Prefilled:
    """One packed pass over ``rows`` (the module docstring's algorithm)."""
    from transformers import DynamicCache

    nodes: list[_Node] = []
    by_key: dict[bytes, int] = {}
    chains: list[list[int]] = []
    owned: list[range] = []  # the nodes each row adds (first seen there): the ones whose queries it computes
    for ids, k in zip(rows, keep, strict=True):
        ids = list(ids)
        first = len(nodes)
        chain: list[int] = []
        for j, key in enumerate(block_keys(ids, block, k)):
            if key not in by_key:
                kv = cache.get(key) if cache is not None else None
                by_key[key] = len(nodes)
                nodes.append(_Node(key, ids[j * block : (j + 1) * block], j * block, list(chain), kv))
            chain.append(by_key[key])
        start = len(chain) * block
        nodes.append(_Node(None, ids[start:], start, list(chain), None))
        chains.append(chain + [len(nodes) - 1])
        owned.append(range(first, len(nodes)))

    cached = [n for n in nodes if n.kv is not None]
    fresh = [n for n in nodes if n.kv is None]
    past_len = 0
    for n in cached:
        n.offset, past_len = past_len, past_len + len(n.tokens)
    packed_len = past_len
    for n in fresh:
        n.offset, packed_len = packed_len, packed_len + len(n.tokens)
    s = packed_len - past_len  # tokens computed now

    device = next(model.parameters()).device
    spans = [torch.cat([torch.arange(nodes[c].offset, nodes[c].offset + len(nodes[c].tokens)) for c in chain])
             for chain in chains]  # each row's tokens on the past + packed axis, in row order
    allowed = torch.zeros((s, packed_len), dtype=torch.bool)  # (S, past + S)
    for n in fresh:
        rows_ = slice(n.offset - past_len, n.offset - past_len + len(n.tokens))
        for a in n.ancestors:
            allowed[rows_, nodes[a].offset : nodes[a].offset + len(nodes[a].tokens)] = True
        allowed[rows_, n.offset : n.offset + len(n.tokens)] = torch.ones(len(n.tokens), len(n.tokens),
                                                                         dtype=torch.bool).tril()
    ids = torch.tensor([t for n in fresh for t in n.tokens], dtype=torch.long)[None]  # (1, S)
    pos = torch.cat([torch.arange(n.start, n.start + len(n.tokens)) for n in fresh])[None]  # (1, S)
    tails = [nodes[c[-1]] for c in chains]
    want = torch.tensor([t.offset - past_len + len(t.tokens) - k + i
                         for t, k in zip(tails, keep, strict=True) for i in range(k)])  # packed positions
    keep_kv = cache is not None or states  # keys and values wanted back: the prefix cache's, the decoding cache's
    past = DynamicCache() if keep_kv else None  # None: the model keeps no cache (what activation checkpointing needs)
    if cached:
        kv = torch.cat([n.kv for n in cached], 3)  # (layers, 2, kv_heads, P, head_dim)
        past = DynamicCache(ddp_cache_data=[(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])])
    profile.count(profile.PROMPT_TOKENS, sum(len(r) for r in rows))
    profile.count(profile.COMPUTED_TOKENS, s)
    profile.count(profile.CACHED_TOKENS, past_len)
    out = packed_pass(model, ids, pos, past, allowed, lambda: _rows_layout(nodes, owned, spans, past_len, device),
                       logits_to_keep=want.to(device))
    # (1, kv_heads, past + S, d) per layer
    layers = [(layer.keys, layer.values) for layer in output_cache(out).layers] if keep_kv else []

    if cache is not None:  # blocks computed now enter the cache
        for n in fresh:
            if n.key is not None:
                span = slice(n.offset, n.offset + len(n.tokens))
                cache.put(n.key, torch.stack([torch.stack([k[0, :, span], v[0, :, span]]) for k, v in layers]))

    # each row's keys and values, gathered in its own order and left-padded: (N, kv_heads, L, d)
    lengths = [len(r) for r in rows]
    width = max(lengths)
    index = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, span in enumerate(spans):
        index[r, width - len(span) :] = span
        attn[r, width - len(span) :] = 1
    flat = index.flatten().to(device)
    gathered = [(k[0].index_select(1, flat).view(k.shape[1], len(rows), width, -1).transpose(0, 1).contiguous(),
                 v[0].index_select(1, flat).view(v.shape[1], len(rows), width, -1).transpose(0, 1).contiguous())
                for k, v in layers] if states else []
    logits = out.logits[0]  # (sum keep, V)
    t = max(keep)
    right = torch.zeros((len(rows), t, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    at = 0
    for r, k in enumerate(keep):
        right[r, t - k :] = logits[at : at + k]
        at += k
    return Prefilled(DynamicCache(ddp_cache_data=gathered) if states else None, attn.to(device),
                     torch.tensor(lengths, device=device), right)


def packed_pass(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, past: object | None,
                 allowed: torch.Tensor, layout: Callable[[], PackedRows], **kwargs) -> object:
    """The model over one packed sequence, ``ids`` and ``pos`` (1, S), after the past keys and values ``past``:
    each row's queries read its own keys (``layout()``) where the model uses sdpa
    (:mod:`ragline.models.packed_attention`), else one attention masked by ``allowed`` (S, past + S). With
    ``past`` None the model keeps no cache (``use_cache=False``)."""
    dtype, device = _dtype(model), next(model.parameters()).device
    mask = torch.zeros((1, 1, *allowed.shape), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    rows = {LAYOUT: layout()} if packed_attention.enable(model) else {}
    return model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                 **cache_kwarg(model, past), use_cache=past is not None, **rows, **kwargs)


def _rows_layout(nodes: list[_Node], owned: list[range], spans: list[torch.Tensor], past_len: int,
                 device: torch.device) -> PackedRows:
    """Each row's queries (the fresh nodes it adds, contiguous on the packed axis), its keys (``spans``) and
    the causal rule between them by position within the row (:mod:`ragline.models.packed_attention`)."""
    queries, keys, masks = [], [], []
    for mine, span in zip(owned, spans, strict=True):
        fresh = [nodes[i] for i in mine if nodes[i].kv is None]  # consecutive on the packed axis
        lo, hi = fresh[0].offset - past_len, fresh[-1].offset + len(fresh[-1].tokens) - past_len
        q_pos = torch.cat([torch.arange(n.start, n.start + len(n.tokens)) for n in fresh])  # (hi - lo,)
        queries.append((lo, hi))
        keys.append(span.to(device))
        masks.append((torch.arange(len(span))[None, :] <= q_pos[:, None]).to(device))  # (hi - lo, n_r)
    return PackedRows(queries, keys, masks)


def cache_kwarg(model: torch.nn.Module, cache: object) -> dict:
    """``{name: cache}`` under the name the model's forward takes its key/value cache by: ``cache`` in newer
    transformers 5 releases (which warn about the old name), ``past_key_values`` before."""
    # a peft wrapper passes its keyword arguments on: the wrapped model's name counts (and is what is cached,
    # since one wrapper class wraps models of any architecture)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(inner)
    name = _CACHE_NAMES.get(kind)
    if name is None:
        params = inspect.signature(inner.forward).parameters
        name = _CACHE_NAMES[kind] = "cache" if "cache" in params else "past_key_values"
    return {name: cache}


_CACHE_NAMES: dict[type, str] = {}


def output_cache(out: object) -> object:
    """The key/value cache a forward pass returned (``cache`` in newer transformers 5 releases)."""
    return out["cache"] if "cache" in out else out.past_key_values  # noqa: SIM401 - reading it warns


def _dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype activations run in: the first floating parameter's (an int8-quantised model keeps fp32)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
