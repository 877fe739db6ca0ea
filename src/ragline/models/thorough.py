"""Thorough decoding of RAG-Sequence: every candidate answer scored under every passage, exactly, at the cost
of the positions nothing computed before.

RAG-Sequence answers  argmax_y  sum_z p_eta(z|x) p_theta(y|x,z)  over the union of the candidates each
passage's beam search produced (:func:`ragline.rag.decoding.rag_sequence_decode`). A candidate y that passage
z's beams did not produce needs p_theta(y|x,z): a *missing pair*. Everything that scores them is here, in the
order a reader follows it:

* **the bound** (:func:`score_missing_pairs`): branch and bound over the missing pairs, highest upper bound
  first, so that candidates that cannot be among the answers are never scored (the answers equal scoring
  every pair);
* **the memo** (:class:`ScoringMemo`): what the beams ranked and what earlier passes computed, each step's
  log-probability and each position's keys and values, read instead of computed again;
* **the planners** (:class:`PaddedPass`, :class:`PackedPass`): how many positions a scoring pass computes as
  candidates join it, which cuts the passes to a memory budget;
* **the continuation tree** (:func:`continuation_logits`): a decoder-only generator's packed pass over the
  prompts' cache, candidates that begin alike under one passage sharing their positions.

The generators (:meth:`ragline.models.generator.Generator.continuation_logprobs`) run the passes these plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ragline import yielding
from ragline.models.packed_attention import PackedRows
from ragline.models.prefill import output_cache, packed_pass

SCORING_BYTES = 2**27  # thorough decoding scores missing pairs in passes of at most 128 MB of logits


# --- the bound ----------------------------------------------------------------------------------------------

class Scorer(Protocol):
    """What the bound asks of a generator (:class:`ragline.models.generator.Generator` is one)."""

    model: torch.nn.Module
    vocab_size: int
    pad_id: int

    def scoring_pass(self, memo: ScoringMemo | None = None) -> PaddedPass: ...

    def continuation_logprobs(self, state: object, first: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                              mask: torch.Tensor, memo: ScoringMemo | None = None) -> torch.Tensor: ...


def scoring_passes(items: list[tuple[int, tuple[int, ...], int]], k: int, budget: int,
                    new_pass: Callable[[], PaddedPass]) -> list[list[tuple[int, tuple[int, ...], int]]]:
    """Consecutive runs of (question, tokens, passage) items whose scoring pass computes at most ``budget``
    positions, as ``new_pass()`` counts them (row question x ``k`` + passage; a run holds at least one item)."""
    chunks: list[list] = [[]]
    plan = new_pass()
    for q, y, z in items:
        if chunks[-1] and plan.positions_with(q * k + z, y) > max(budget, 1):
            chunks.append([])
            plan = new_pass()
        plan.add(q * k + z, y)
        chunks[-1].append((q, y, z))
    return chunks if chunks[0] else []


def logsumexp(xs: Sequence[float]) -> float:
    """log sum_i exp(x_i) of a few floats (a candidate's marginal over passages), -inf when all are."""
    top = max(xs)
    return top if top == float("-inf") else top + math.log(sum(math.exp(x - top) for x in xs))


def score_missing_pairs(generator: Scorer, cands: list[dict[tuple[int, ...], dict[int, float]]],
                         doc_logprobs: torch.Tensor, state: object, first: torch.Tensor, n_best: int,
                         memo: ScoringMemo | None = None) -> None:
    """Thorough decoding's extra passes, fill ``cands[q][y][z] = log p_theta(y|x_q,z)`` where needed.

    Branch and bound, exact: a candidate y of question x with passages M not yet scored has marginal

        log p(y|x) <= log( sum_{z not in M} p_eta(z|x) p_theta(y|x,z) + sum_{z in M} p_eta(z|x) p_theta(y_<=t|x,z) )

    for any prefix y_<=t of y, because each further token's probability is at most 1. The prefill holds
    every first token's (``first``, (B*K, V)); where z's beams ranked y's next steps during decoding, or
    earlier passes computed them for candidates that begin like y (``memo``, :class:`ScoringMemo`), the
    bound takes y's longest prefix known, and a candidate whose every step is known is not computed.
    Rounds score the candidates of highest bound first (1, 2, 4, ... per question, all questions in one
    batch); a candidate whose bound is below its question's ``n_best``-th best fully scored marginal cannot be
    among the answers and is never scored. The answers and their scores equal scoring every pair.

    A pass computes each (passage, prefix) of its candidates once, and reads the keys and values of the
    positions earlier passes computed (:meth:`Scorer.continuation_logprobs` with the memo): the beams of
    one passage share their first tokens, and later rounds' candidates extend earlier ones'."""
    k = doc_logprobs.shape[1]
    doc = doc_logprobs.tolist()
    memo = memo or ScoringMemo()

    def prefix(row: int, y: tuple[int, ...]) -> float:
        """log p_theta(y_<=t | x, z) of y's longest prefix known: its first token's, then its steps that the
        beams ranked or earlier passes computed."""
        lp, t = float(first[row, y[0]]), 1
        while t < len(y) and (row, y[: t + 1]) in memo.logprobs:
            lp, t = lp + memo.logprobs[(row, y[: t + 1])], t + 1
        return lp

    def bound(q: int, y: tuple[int, ...], seen: dict[int, float]) -> float:
        return logsumexp([doc[q][z] + (seen[z] if z in seen else prefix(q * k + z, y)) for z in range(k)])

    itemsize = getattr(generator.model, "dtype", torch.float32).itemsize  # bytes per logit
    budget = SCORING_BYTES // (generator.vocab_size * itemsize)  # positions per pass
    per_round = 1
    while True:
        todo = []
        for q, cq in enumerate(cands):
            done = sorted((logsumexp([doc[q][z] + v for z, v in seen.items()])
                           for seen in cq.values() if len(seen) == k), reverse=True)
            bar = done[n_best - 1] - 1e-4 if len(done) >= n_best else float("-inf")  # margin: float32 rounding
            open_ = sorted(((bound(q, y, seen), y) for y, seen in cq.items() if len(seen) < k), reverse=True)
            todo += [(q, y, z) for ub, y in open_[:per_round] if ub >= bar for z in range(k) if z not in cq[y]]
        if not todo:
            return
        order = generator.scoring_pass().order  # what shares a pass best: similar lengths, or common prefixes
        todo.sort(key=lambda m: order(m[0] * k + m[2], m[1]))
        for chunk in scoring_passes(todo, k, budget, lambda: generator.scoring_pass(memo)):
            yielding.point()
            t = max(len(y) for _, y, _ in chunk)
            targets = torch.tensor([list(y) + [generator.pad_id] * (t - len(y)) for _, y, _ in chunk])  # (n, T)
            mask = torch.tensor([[i < len(y) for i in range(t)] for _, y, _ in chunk])
            rows = torch.tensor([q * k + z for q, _, z in chunk])
            lp = generator.continuation_logprobs(state, first, rows, targets, mask, memo)  # (n,)
            for (q, y, z), v in zip(chunk, lp.tolist(), strict=True):
                cands[q][y][z] = v
        per_round *= 2


# --- the continuation tree ---------------------------------------------------------------------------------

Node = tuple[int, tuple[int, ...]]  # a continuation position: (row, the continuation's tokens up to it)


class PrefixStates:
    """Keys and values of continuation positions that earlier :func:`continuation_logits` passes over one
    decoding cache computed, by node: a later pass over the same cache reads them instead of computing those
    positions again (thorough decoding's scoring rounds). Held for one such series of passes."""

    def __init__(self) -> None:
        self._at: dict[Node, tuple[int, int]] = {}  # node -> (pass, column)
        self._passes: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per pass, per layer: (kv_heads, S, d)

    def __contains__(self, node: Node) -> bool:
        return node in self._at

    def __len__(self) -> int:
        return len(self._at)

    def keep(self, nodes: Sequence[Node], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold ``layers``' keys and values (kv_heads, len(nodes), d) per layer, column i being ``nodes[i]``'s."""
        for i, node in enumerate(nodes):
            self._at.setdefault(node, (len(self._passes), i))
        self._passes.append(layers)

    def gather(self, nodes: Sequence[Node]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values of ``nodes`` (all held), in that order: (1, kv_heads, len(nodes), d)."""
        at = [self._at[n] for n in nodes]
        by_pass = sorted(set(p for p, _ in at))
        grouped = sorted(range(len(at)), key=lambda i: at[i])  # the nodes pass by pass
        columns = [torch.tensor([at[i][1] for i in grouped if at[i][0] == p]) for p in by_pass]
        device = self._passes[0][0][0].device
        back = torch.empty(len(at), dtype=torch.long)
        back[torch.tensor(grouped)] = torch.arange(len(at))  # each node's place among the grouped
        back = back.to(device)
        return [tuple(torch.cat([self._passes[p][layer][i].index_select(1, c.to(device))
                                 for p, c in zip(by_pass, columns, strict=True)], 1).index_select(1, back)[None]
                      for i in range(2))
                for layer in range(len(self._passes[0]))]


def continuation_nodes(row: int, prefixes: Sequence[Sequence[int]], states: PrefixStates | None = None
                       ) -> set[Node]:
    """The positions a :func:`continuation_logits` pass computes for the continuations ``prefixes`` of
    ``row``: each one's last position (whose logits are asked for), and the earlier positions that
    ``states`` does not hold; each distinct (row, prefix) once."""
    out: set[Node] = set()
    for toks in prefixes:
        out.add((row, tuple(toks)))
        out.update((row, tuple(toks[:j])) for j in range(1, len(toks)) if states is None or
                   (row, tuple(toks[:j])) not in states)
    return out


@dataclass
class Continued:
    """What :func:`continuation_logits` computed: each position it computed once."""

    logits: torch.Tensor  # (S, V) after each computed position, on the packed axis
    where: torch.Tensor   # (N,) the logits row after each continuation's last token


def continuation_logits(model: torch.nn.Module, cache: object, attention_mask: torch.Tensor,
                        positions: torch.Tensor, rows: Sequence[int], tokens: Sequence[Sequence[int]],
                        states: PrefixStates | None = None) -> Continued:
    """Logits after the last token of each continuation ``tokens[i]`` of row ``rows[i]`` of a left-padded
    decoding cache (``cache``: (N, kv_heads, L, head_dim) per layer, ``attention_mask`` (N, L), next
    ``positions`` (N,)), in one packed pass. Every continuation needs one token or more.

    A causal model's state after a token depends only on the tokens up to it, so continuations of one row
    that begin alike share their first positions: the pass computes each distinct (row, prefix) once, a
    prefix tree per row (thorough decoding's candidates under one passage often share their first tokens:
    the beams of one passage diverge late), and reads the keys and values of earlier positions that
    ``states`` holds from there (each continuation's last position is computed: its logits are asked for);
    the positions it computes enter ``states``. Each position attends to its row's prompt, read from
    ``cache`` (left as it is; each row's once, however many continuations read it), and to its prefix's
    earlier positions, at its position within the row: the causal rule of a padded pass over
    ``[prompt][continuation][padding]``, without computing the padding or a shared position twice (the last
    feed-forward and output layer included), as the packed prefill lays rows out (the module docstring)."""
    from transformers import DynamicCache

    device = attention_mask.device
    if min((len(t) for t in tokens), default=0) < 1:
        raise ValueError("every continuation needs at least one token")
    order = list(dict.fromkeys(rows))  # distinct rows, first seen first
    asked: dict[int, list[Sequence[int]]] = {r: [] for r in order}
    for r, toks in zip(rows, tokens, strict=True):
        asked[r].append(toks)
    fresh = {r: sorted(continuation_nodes(r, asked[r], states), key=lambda n: (len(n[1]), n[1])) for r in order}
    column = {node: i for r in order for i, node in enumerate(fresh[r])}  # within the row's computed positions
    held = {r: sorted({(r, node[1][:j]) for node in fresh[r] for j in range(1, len(node[1]))} - set(column))
            for r in order}  # earlier positions read from ``states``
    read = [node for r in order for node in held[r]]
    sel = torch.tensor(order, dtype=torch.long, device=device)
    n, width = len(order), attention_mask.shape[1]
    prompt = attention_mask[sel].sum(1).tolist()  # real (left-padded) prompt tokens per row
    start = positions[sel].tolist()  # each row's first continuation position id
    s, past_len = sum(len(fresh[r]) for r in order), n * width + len(read)
    # past: the rows' caches side by side on one axis, then the positions read from ``states``:
    # (1, kv_heads, n * L + read, d); padding never read
    stored = states.gather(read) if read else None
    past = DynamicCache(ddp_cache_data=[
        tuple(torch.cat([x.index_select(0, sel).transpose(0, 1).reshape(1, x.shape[1], n * width, -1),
                         *([stored[layer][i]] if stored else [])], 2) for i, x in enumerate((lay.keys, lay.values)))
        for layer, lay in enumerate(cache.layers)])
    queries, keys, masks, ids, pos, first = [], [], [], [], [], {}
    allowed = torch.zeros((s, past_len + s), dtype=torch.bool)  # (S, past + S), for the dense fallback
    lo, at_read = 0, n * width
    for i, (r, p) in enumerate(zip(order, prompt, strict=True)):
        nodes, olds, m = fresh[r], held[r], len(fresh[r])
        first[r] = lo
        old_col = {node: j for j, node in enumerate(olds)}
        rule = torch.zeros((m, p + len(olds) + m), dtype=torch.bool)  # the row's keys: prompt, read, computed
        rule[:, :p] = True
        for a, (_, toks) in enumerate(nodes):
            for j in range(1, len(toks) + 1):  # its prefix's positions, itself included
                node = (r, toks[:j])
                rule[a, p + len(olds) + column[node] if node in column else p + old_col[node]] = True
            ids.append(toks[-1])
            pos.append(start[i] + len(toks) - 1)
        mine = torch.cat([torch.arange((i + 1) * width - p, (i + 1) * width),
                          torch.arange(at_read, at_read + len(olds)),
                          torch.arange(past_len + lo, past_len + lo + m)])  # (p + read + m,) the row's keys
        allowed[lo : lo + m, mine] = rule
        queries.append((lo, lo + m))
        keys.append(mine.to(device))
        masks.append(rule.to(device))
        lo, at_read = lo + m, at_read + len(olds)
    out = packed_pass(model, torch.tensor([ids]), torch.tensor([pos]), past, allowed,
                       lambda: PackedRows(queries, keys, masks))
    if states is not None:
        states.keep([node for r in order for node in fresh[r]],
                    [(lay.keys[0, :, past_len:].clone(), lay.values[0, :, past_len:].clone())
                     for lay in output_cache(out).layers])
    where = torch.tensor([first[r] + column[(r, tuple(toks))] for r, toks in zip(rows, tokens, strict=True)],
                         dtype=torch.long)
    return Continued(out.logits[0], where)  # (S, V), (N,)


# --- the memo and the planners ---------------------------------------------------------------------------

class PaddedPass:
    """The positions one padded pass (:meth:`ragline.models.generator.Generator.continuation_logprobs`)
    computes, counted as (row, target) pairs join it: rows x the longest target."""

    def __init__(self) -> None:
        self.rows = self.longest = 0

    @property
    def positions(self) -> int:
        return self.rows * self.longest

    def positions_with(self, row: int, target: Sequence[int]) -> int:
        """The pass's positions if ``target`` (tokens) of ``row`` joined it."""
        return (self.rows + 1) * max(self.longest, len(target))

    def add(self, row: int, target: Sequence[int]) -> None:
        self.rows, self.longest = self.rows + 1, max(self.longest, len(target))

    @staticmethod
    def order(row: int, target: Sequence[int]) -> tuple:
        """The sort key that fills passes best: targets of similar lengths together (little padding)."""
        return (len(target),)


@dataclass
class ScoringMemo:
    """What earlier scoring passes (:meth:`ragline.models.generator.Generator.continuation_logprobs`) over one
    prefill state computed, for later passes over it: each step's log-probability log p_theta(next | row's
    prompt, prefix), by (row, prefix + (next,)), and the positions' keys and values (:class:`PrefixStates`)."""

    logprobs: dict[Node, float] = field(default_factory=dict)
    states: PrefixStates = field(default_factory=PrefixStates)


def asked_steps(row: int, target: Sequence[int], memo: ScoringMemo | None) -> list[int]:
    """The steps t (1 <= t < len) of ``target`` whose log-probability, after its first t tokens, a packed pass
    computes: those ``memo`` does not hold."""
    return [t for t in range(1, len(target)) if memo is None or (row, tuple(target[: t + 1])) not in memo.logprobs]


class PackedPass(PaddedPass):
    """A packed pass (:meth:`ragline.models.causal.CausalGenerator.continuation_logprobs`): the positions after
    which a target's steps are not in ``memo`` are computed, with the earlier ones of theirs that ``memo`` does
    not hold, each distinct (row, prefix) once (:func:`continuation_nodes`)."""

    def __init__(self, memo: ScoringMemo | None = None) -> None:
        super().__init__()
        self.memo, self.nodes = memo, set()
        self._last: tuple[tuple[int, tuple[int, ...]], set[Node]] | None = None  # positions_with's, for add

    def _new(self, row: int, target: Sequence[int]) -> set[Node]:
        """The nodes ``target`` of ``row`` would add to the pass (worked out once for positions_with, then
        add: the planner asks both of each item)."""
        key = (row, tuple(target))
        if self._last is None or self._last[0] != key:
            prefixes = [target[:t] for t in asked_steps(row, target, self.memo)]
            states = None if self.memo is None else self.memo.states
            self._last = key, continuation_nodes(row, prefixes, states) - self.nodes
        return self._last[1]

    @property
    def positions(self) -> int:
        return len(self.nodes)

    def positions_with(self, row: int, target: Sequence[int]) -> int:
        return len(self.nodes) + len(self._new(row, target))

    def add(self, row: int, target: Sequence[int]) -> None:
        self.nodes |= self._new(row, target)
        self._last = None  # the pass has grown: what the next target adds is worked out afresh

    @staticmethod
    def order(row: int, target: Sequence[int]) -> tuple:
        """Each row's targets together, in token order: those that begin alike are next to each other."""
        return (row, tuple(target))
