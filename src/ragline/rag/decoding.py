"""Decoding: RAG-Token greedy and beam search on the marginal; RAG-Sequence thorough and fast decoding.

One search serves both models. It runs G independent *groups*, each with W beams, and asks a callback for
the next-token log-probabilities of every beam, (G, W, V):

* RAG-Token: a group is a question; each beam owns K generator rows (one per passage), and the callback
  returns the marginal  log p'(y_t | x, y_<t) = logsumexp_k [log p_eta(z_k|x) + log p_theta(y_t | x, z_k, y_<t)]
  (:func:`ragline.rag.marginal.marginalize`).
* RAG-Sequence: a group is a (question, passage) pair with one row per beam: plain beam search on
  p_theta(y | x, z). Thorough decoding then scores every candidate y of a question under every passage whose
  beam did not produce it (packed passes over the prompts' cache, candidates that begin alike sharing their
  positions; those that cannot win are never scored) and returns
  argmax_y  sum_z p_eta(z|x) p_theta(y|x,z);  fast decoding takes p_theta(y|x,z) = 0 for those pairs instead.

Beam search follows Hugging Face transformers' (5.x) rules, so that both produce the same tokens: 2W
candidates per step; a candidate ending in a stop token, or reaching the length limit, is finished if it
ranks among the top W; finished scores are sum log-prob / length ** length_penalty; the search stops
when no running beam can beat the worst of W finished hypotheses (HF's ``early_stopping=False``).
All questions are decoded together: generator rows are (question x passage x beam), batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ragline import profile, yielding
from ragline.corpus.passages import Passage
from ragline.models.generator import DecodeState, Generator
from ragline.models.thorough import ScoringMemo, score_missing_pairs
from ragline.rag.marginal import marginalize
from ragline.vocab import DEFAULT_BEAMS, DEFAULT_LENGTH_PENALTY, DEFAULT_MAX_NEW_TOKENS

NEG = -1.0e9

Ranked = tuple[torch.Tensor, torch.Tensor]  # each beam's best log-probs and their tokens, (G', W, n) each
StepFn = Callable[..., torch.Tensor | Ranked]
OnStep = Callable[[list[list[int]]], None]  # after each step: the best running tokens of every group
# step(parents (G, W) or None, tokens (G, W) or None, live (G,) bool or None[, top]) -> log-probs (G', W, V) of
# the next token of each beam of the G' ``live`` groups, in group order; None, None, None on the first call (the
# prompts only, every group). Groups not ``live`` have finished: their rows are not computed. Given ``top``, a
# step may return each beam's ``top`` best log-probs and their tokens instead, best first (Ranked), as
# torch.topk of its full log-probs would: beam search ranks no more.


@dataclass
class Hypothesis:
    """A finished (or best unfinished) beam: its tokens, log-probability and ranking score."""

    tokens: list[int]   # generated tokens, ending with the stop token if the answer finished
    logprob: float      # sum of the step log-probabilities (RAG-Token: marginal; RAG-Sequence: p_theta)
    score: float        # logprob / len ** length_penalty (the beam's ranking score)


def beam_search(step: StepFn, groups: int, beams: int, stop_ids: Sequence[int], max_new_tokens: int,
                length_penalty: float = DEFAULT_LENGTH_PENALTY, on_step: OnStep | None = None,
                record: dict[tuple[int, tuple[int, ...]], float] | None = None) -> list[list[Hypothesis]]:
    """HF-compatible beam search over ``groups`` at once; the W finished hypotheses of each, best first. With
    ``record``, every step's log-probability the search ranked after a running beam's tokens enters it, as
    ``record[(group, tokens + (next,))]`` (thorough decoding's scoring reads them: :class:`ScoringMemo`)."""
    g_idx = torch.arange(groups)
    stop = torch.tensor(list(stop_ids))
    n_keep = max(2, 1 + len(stop_ids)) * beams
    top_mask = torch.arange(n_keep) < beams  # (n_keep,)
    run_scores = torch.full((groups, beams), NEG)
    run_scores[:, 0] = 0.0  # the W beams start as copies: only the first is live
    run_tokens = torch.zeros((groups, beams, 0), dtype=torch.long)
    fin_scores = torch.full((groups, beams), NEG)
    fin_logprob = torch.full((groups, beams), NEG)
    fin_tokens = torch.zeros((groups, beams, 0), dtype=torch.long)
    fin_done = torch.zeros((groups, beams), dtype=torch.bool)
    improvable = torch.ones((groups, 1), dtype=torch.bool)
    parents = torch.zeros((groups, beams), dtype=torch.long)  # (G, W) each beam's parent and last token
    tokens = torch.zeros((groups, beams), dtype=torch.long)
    shown: list[list[int]] = [[] for _ in range(groups)]  # on_step: a finished group keeps its last best
    for t in range(max_new_tokens):
        live = None if t == 0 else improvable[:, 0]
        at = g_idx if live is None else torch.nonzero(live).flatten()  # (G',) the groups still searching
        n = len(at)
        logp = step(None, None, None) if t == 0 else step(parents, tokens, live, n_keep)  # (G', W, V) or Ranked
        # the group's best n_keep of W*V are each among their own beam's best n_keep: rank those only
        if isinstance(logp, tuple):
            beam_top, beam_token = logp  # (G', W, per_beam), ranked by the step
        else:
            beam_top, beam_token = torch.topk(logp, min(n_keep, logp.shape[-1]), -1)  # (G', W, per_beam)
        per_beam = beam_top.shape[-1]
        if record is not None and t > 0:  # each running beam's ranked next tokens (at t = 0 they are the prompt's)
            for i, g in enumerate(at.tolist()):
                for w in torch.nonzero(run_scores[g] > NEG / 2).flatten().tolist():
                    prefix = tuple(run_tokens[g, w].tolist())
                    for v, tok in zip(beam_top[i, w].tolist(), beam_token[i, w].tolist(), strict=True):
                        record[(g, (*prefix, tok))] = v
        acc = (beam_top + run_scores[at][:, :, None]).view(n, -1)  # (G', W*per_beam)
        cand_scores, cand = torch.topk(acc, n_keep)  # (G', n_keep), best first
        cand_parent, cand_token = cand // per_beam, beam_token.view(n, -1).gather(1, cand)
        cand_seq = torch.cat([run_tokens[at[:, None], cand_parent], cand_token[..., None]], -1)  # (G', n_keep, t+1)
        hits = torch.isin(cand_token, stop) | (t + 1 >= max_new_tokens)  # (G', n_keep)
        # finished: top-W candidates that hit a stop, merged with those finished before
        norm = cand_scores / ((t + 1) ** length_penalty) + (~(hits & top_mask)).float() * NEG
        pad = torch.zeros((groups, beams, 1), dtype=torch.long)
        fin_tokens, run_tokens = torch.cat([fin_tokens, pad], -1), torch.cat([run_tokens, pad], -1)  # (G, W, t+1)
        merged_tokens = torch.cat([fin_tokens[at], cand_seq], 1)
        merged_scores = torch.cat([fin_scores[at], norm], 1)
        merged_logprob = torch.cat([fin_logprob[at], cand_scores], 1)
        merged_done = torch.cat([fin_done[at], hits & top_mask], 1)
        keep = torch.topk(merged_scores, beams).indices
        fin_tokens[at] = merged_tokens[torch.arange(n)[:, None], keep]
        fin_scores[at], fin_logprob[at] = merged_scores.gather(1, keep), merged_logprob.gather(1, keep)
        fin_done[at] = merged_done.gather(1, keep)
        # running: the best W candidates that did not stop
        best = torch.topk(cand_scores + hits.float() * NEG, beams).indices  # (G', W)
        run_scores[at] = (cand_scores + hits.float() * NEG).gather(1, best)
        run_tokens[at] = cand_seq[torch.arange(n)[:, None], best]
        parents[at], tokens[at] = cand_parent.gather(1, best), cand_token.gather(1, best)
        if on_step is not None:
            for g in at.tolist():
                shown[g] = run_tokens[g, 0].tolist()
            on_step(shown)
        best_running = run_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not improvable.any() or hits.all():
            break
    out = []
    for g in range(groups):
        hyps = []
        for w in range(beams):
            if fin_done[g, w]:
                toks = fin_tokens[g, w].tolist()
                n = next((i + 1 for i, x in enumerate(toks) if x in stop_ids), len(toks))
                hyps.append(Hypothesis(toks[:n], float(fin_logprob[g, w]), float(fin_scores[g, w])))
        out.append(hyps)
    return out


def greedy(step: StepFn, groups: int, stop_ids: Sequence[int], max_new_tokens: int,
           on_step: OnStep | None = None) -> list[Hypothesis]:
    """Argmax decoding of each group until a stop token or the length limit (HF greedy search)."""
    stop = torch.tensor(list(stop_ids))
    done = torch.zeros(groups, dtype=torch.bool)
    seqs: list[list[int]] = [[] for _ in range(groups)]
    logprob = torch.zeros(groups)
    parents = torch.zeros((groups, 1), dtype=torch.long)
    tokens = None
    for _ in range(max_new_tokens):
        at = torch.nonzero(~done).flatten()  # (G',) the groups still decoding
        logp = step(None if tokens is None else parents, tokens, None if tokens is None else ~done)[:, 0]  # (G', V)
        lp, tok = torch.zeros(groups), torch.zeros(groups, dtype=torch.long)
        lp[at], tok[at] = logp.max(-1)
        for g in at.tolist():
            seqs[g].append(int(tok[g]))
        logprob = logprob + torch.where(done, torch.zeros_like(lp), lp)
        done = done | torch.isin(tok, stop)
        if on_step is not None:
            on_step([list(x) for x in seqs])
        if done.all():
            break
        tokens = tok[:, None]
    return [Hypothesis(s, float(lp), float(lp) / max(len(s), 1)) for s, lp in zip(seqs, logprob, strict=True)]


class RowStepper:
    """The step callback over generator rows: each beam of each group owns ``rows`` consecutive rows;
    ``combine(logp, groups)`` turns the log-probs (G', W, rows, V) of groups ``groups`` (G',) into the beams'
    (G', W, V), or is None where a beam is its one row (RAG-Sequence), which lets a step asked for its ``top``
    return them ranked (no (rows, V) log-probs written out or brought back from the device). The rows of
    groups that have finished leave the batch, and only the groups still searching get log-probs back (no
    vocabulary-sized work for the others). With ``record`` (greedy), it keeps each row's log-prob of every
    chosen token."""

    def __init__(self, generator: Generator, prompts: list[str], groups: int, rows: int, beams: int,
                 combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, keep_prefill: bool = False,
                 record: bool = False) -> None:
        if combine is None and rows != 1:
            raise ValueError("a beam of several rows needs a combine")
        self.ranks = combine is None and not record  # a step may return its beams' best log-probs only
        combine = combine or (lambda logp, _: logp[:, :, 0])  # (G', W, 1, V) -> (G', W, V)
        self.gen, self.groups, self.rows, self.beams, self.combine = generator, groups, rows, beams, combine
        self.prompts, self.state, self.width = prompts, None, 1  # width: live beams per group in the rows
        self.held = torch.arange(groups)  # the groups whose rows the state holds, in order
        self.keep_prefill = keep_prefill
        self.prefill: tuple[DecodeState, torch.Tensor] | None = None  # the prompts' cache, next-token log-probs
        # record (one beam): each step's rows' log-probs of the token chosen, (G, rows) per step (NaN: not held)
        self.record, self.recorded, self._last = record, [], None
        self._final: list[list[int]] | None = None

    def _keep(self, tokens: torch.Tensor) -> None:
        """Record the last step's rows' log-probs of ``tokens`` (G, 1), the tokens the search chose."""
        logp, held = self._last
        out = torch.full((self.groups, self.rows), float("nan"))
        out[held] = logp.view(len(held), self.rows, -1).gather(2, tokens[held][:, :, None].expand(-1, self.rows, 1)
                                                              ).squeeze(2)
        self.recorded.append(out)

    def token_logprobs(self, group: int, tokens: list[int]) -> torch.Tensor:
        """(rows, T): log p_theta(y_t | row's prompt, y_<t) of the decoded ``tokens`` of ``group`` (record)."""
        if self._last is not None:  # the final step's choice
            self._keep(torch.tensor([[t[-1] if t else 0] for t in self._final]))
            self._last = None
        return torch.stack([step[group] for step in self.recorded[: len(tokens)]], 1)

    def finish(self, tokens: list[list[int]]) -> None:
        """The searched tokens of every group, for :meth:`token_logprobs` (record)."""
        self._final = tokens

    @torch.no_grad()
    def __call__(self, parents: torch.Tensor | None, tokens: torch.Tensor | None,
                 live: torch.Tensor | None = None, top: int | None = None) -> torch.Tensor | Ranked:
        if tokens is None:
            with profile.stage(profile.PREFILL):
                self.state, logp = self.gen.start(self.prompts)  # (G*rows, V)
                if self.keep_prefill:  # a copy that the beams' reordering leaves alone
                    self.prefill = (self.gen.fork(self.state, torch.arange(len(self.prompts))), logp)
            if self.record:
                self._last = (logp, self.held)
            logp = self.combine(logp.view(self.groups, 1, self.rows, -1), self.held)  # (G, 1, V)
            return logp.expand(-1, self.beams, -1) if self.beams > 1 else logp
        if self.record:
            self._keep(tokens)
        g, w = parents.shape
        keep = self.held if live is None else self.held[live[self.held]]  # groups computed this step
        if self.width == 1:  # right after the prompts every beam of a group is a copy of the one row
            parents = torch.zeros_like(parents)
        slot = torch.full((g,), -1, dtype=torch.long)
        slot[self.held] = torch.arange(len(self.held))  # each held group's place in the state
        r = torch.arange(self.rows)
        base = (slot[keep][:, None] * self.width + parents[keep]) * self.rows  # (G', W) first row of parent
        rows = (base[:, :, None] + r).reshape(-1)  # (G'*W*rows,)
        profile.count(profile.DECODE_STEPS, 1)
        profile.count(profile.DECODE_ROWS, len(rows))
        yielding.point()  # a server's other batches may take their step first
        ranked = top is not None and self.ranks
        with profile.stage(profile.DECODE):
            logp = self.gen.advance(self.state, rows, tokens[keep][:, :, None].expand(-1, -1, self.rows).reshape(-1),
                                    top if ranked else None)
        self.width, self.held = w, keep
        if ranked:  # (G'*W, top) twice -> (G', W, top)
            return logp[0].view(len(keep), w, -1), logp[1].view(len(keep), w, -1)
        if self.record:
            self._last = (logp, keep)
        return self.combine(logp.view(len(keep), w, self.rows, -1), keep)  # (G', W, V)


def stop_ids(generator: Generator) -> list[int]:
    ids = {getattr(generator, "end_id", None), generator.tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


@dataclass
class Decoded:
    """A question's decoded answer with its log p(y|x), RAG-Sequence's per-passage scores and n-best."""

    tokens: list[int]
    logprob: float                  # log p(y|x) under the model's own marginal
    seq_logprobs: torch.Tensor | None = None  # (K,) RAG-Sequence: log p_theta(y|x,z_k) (-inf: not scored, fast)
    token_logprobs: torch.Tensor | None = None  # (K, T) greedy RAG-Token: log p_theta(y_t|x,z_k,y_<t) as decoded
    alternatives: list[tuple[list[int], float]] = field(default_factory=list)  # n-best (tokens, log p), best first


@torch.no_grad()
def rag_token_decode(generator: Generator, questions: Sequence[str], passages: Sequence[Sequence[Passage | None]],
                     doc_logprobs: torch.Tensor, beams: int = DEFAULT_BEAMS,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, length_penalty: float = DEFAULT_LENGTH_PENALTY,
                     n_best: int = 1, on_step: OnStep | None = None, prompts: list[str] | None = None
                     ) -> list[Decoded]:
    """RAG-Token: greedy (beams=1) or beam search on the marginal next-token distribution; with beams, the
    ``n_best`` (<= beams) finished hypotheses in beam order are kept as alternatives. ``on_step`` receives
    each question's best running tokens after every step (for streaming). ``prompts`` (B*K, question-major)
    replace the (question, passage) prompts: the concatenated reader's one prompt per question, K = 1."""
    b, k = doc_logprobs.shape
    beams_eff = max(beams, 1)

    def combine(logp: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:  # (B', W, K, V) -> (B', W, V)
        n, w = logp.shape[:2]
        doc = doc_logprobs[groups][:, None, :].expand(-1, w, -1).reshape(n * w, k)
        return marginalize(doc, logp.reshape(n * w, k, -1)).view(n, w, -1)

    prompts = generator.pair_prompts(questions, passages) if prompts is None else prompts
    step = RowStepper(generator, prompts, b, k, beams_eff, combine, record=beams <= 1)
    stops = stop_ids(generator)
    if beams <= 1:  # each passage's log-probs of the chosen tokens come with the answer (its token posteriors)
        hyps = greedy(step, b, stops, max_new_tokens, on_step)
        step.finish([h.tokens for h in hyps])
        return [Decoded(h.tokens, h.logprob, alternatives=[(h.tokens, h.logprob)],
                        token_logprobs=step.token_logprobs(g, h.tokens)) for g, h in enumerate(hyps)]
    hyps = beam_search(step, b, beams, stops, max_new_tokens, length_penalty, on_step)
    return [Decoded(h[0].tokens, h[0].logprob, alternatives=[(x.tokens, x.logprob) for x in h[:n_best]])
            for h in hyps]


@torch.no_grad()
def rag_sequence_decode(generator: Generator, questions: Sequence[str],
                        passages: Sequence[Sequence[Passage | None]], doc_logprobs: torch.Tensor,
                        beams: int = DEFAULT_BEAMS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, thorough: bool = True,
                        length_penalty: float = DEFAULT_LENGTH_PENALTY, n_best: int = 1,
                        on_step: OnStep | None = None) -> list[Decoded]:
    """RAG-Sequence: beam search per passage (all questions and passages at once), then the answer that
    maximises sum_z p_eta(z|x) p_theta(y|x,z) over the union of the beams' hypotheses; the ``n_best`` best
    candidates by that marginal are kept as alternatives. ``on_step`` receives, after every step, each
    question's best running tokens under its first (most likely) passage."""
    b, k = doc_logprobs.shape
    groups = b * k
    step = RowStepper(generator, generator.pair_prompts(questions, passages), groups, 1, beams, None,
                      keep_prefill=thorough)  # a beam is its row: steps rank their beams' best tokens
    stops = stop_ids(generator)
    memo = ScoringMemo()  # the steps the beams ranked under each passage, which the scoring reads
    on_first = None if on_step is None else (lambda best: on_step(best[::k]))  # group q*k: passage 1 of q
    if beams <= 1:
        per_pair = [[h] for h in greedy(step, groups, stops, max_new_tokens, on_first)]
    else:
        per_pair = beam_search(step, groups, beams, stops, max_new_tokens, length_penalty, on_first,
                               record=memo.logprobs if thorough else None)
    # candidates per question: the union of its passages' hypotheses, with the scores the beams computed
    cands: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in range(b)]
    for g, hyps in enumerate(per_pair):
        q, z = divmod(g, k)
        for h in hyps:
            cands[q].setdefault(tuple(h.tokens), {})[z] = h.logprob
    if thorough:  # score the (y, z) pairs whose beam did not produce y, over z's cached prompt
        state, first = step.prefill
        with profile.stage(profile.SCORE):
            score_missing_pairs(generator, cands, doc_logprobs, state, first, n_best, memo)
    out = []
    for q in range(b):
        ranked = []
        for y, seen in cands[q].items():
            seq = torch.tensor([seen.get(z, float("-inf")) for z in range(k)])  # (K,)
            ranked.append((float(marginalize(doc_logprobs[q : q + 1], seq[None])[0]), list(y), seq))
        ranked.sort(key=lambda r: -r[0])
        ll, y, seq = ranked[0]
        out.append(Decoded(y, ll, seq, alternatives=[(t, v) for v, t, _ in ranked[:n_best]]))
    return out
