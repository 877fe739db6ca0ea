"""RagModel: retriever + generator. Answers questions with RAG-Sequence, RAG-Token, the concatenated-context
reader, Fusion-in-Decoder or closed book, and says where each answer came from; computes the training
likelihood with gradient to the question encoder.

Output per question (:class:`Answer`): the answer and log p(y|x) under the chosen model; the top-k passages
with their prior p_eta(z|x) and a posterior; for RAG-Token and FiD a distribution over the passages for every
answer token (which passage produced which words). The posteriors by reader:

* RAG-Sequence (and concat, which decodes from one prompt holding the k passages numbered [1]..[k], scoring
  its answer under each passage alone): p(z | x, y) = p_eta(z|x) p_theta(y|x,z) / sum_z' p_eta(z'|x) p_theta(y|x,z');
  the passage numbers a concat answer cites are taken out of its text into ``cited``;
* RAG-Token: p(z | x, y_<t, y_t) per token, and its mean over the answer's tokens;
* FiD: the decoder's cross-attention mass per passage per token (:mod:`ragline.rag.fid`), and its mean.

Every answer that read passages also carries ``citations``: its text cut into runs, each with the passages it
cites (:mod:`ragline.rag.citations`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ragline import profile, vocab
from ragline.corpus.passages import Passage
from ragline.errors import RaglineError
from ragline.index import manifest as mf
from ragline.models.generator import Generator
from ragline.rag import citations as cite
from ragline.rag import fid, marginal
from ragline.rag.decoding import Decoded, rag_sequence_decode, rag_token_decode, stop_ids
from ragline.retriever import Retriever


@dataclass
class Source:
    """A passage an answer read: its retrieval score, prior p_eta(z|x) and posterior p(z|x,y)."""

    rank: int
    pid: str
    doc_id: str
    title: str
    text: str
    score: float      # q(x)·d(z)
    prior: float      # p_eta(z|x)
    posterior: float | None  # p(z|x,y); None before the answer is decoded (the streaming 'passages' event)
    meta: dict = field(default_factory=dict)  # source, page or section, the document's metadata


@dataclass
class Answer:
    """A decoded answer with its log-probability, sources and (RAG-Token) per-token passage posteriors."""

    question: str
    text: str
    logprob: float                     # log p(y|x) under the model used
    model: str
    decoding: str
    tokens: list[int] = field(repr=False)
    sources: list[Source] = field(default_factory=list)
    token_sources: list[tuple[str, list[float]]] | None = None  # RAG-Token: (token text, p(z_k|x,y_<t,y_t))
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # n-best (text, log p), best first
    cited: list[int] | None = None     # concat: the passage numbers [n] the answer cited (taken out of its text)
    citations: list[cite.Citation] = field(default_factory=list)  # the text in runs, each with the passages it cites

    def to_dict(self) -> dict:
        return asdict(self)


class DecodingStopped(RaglineError):
    """Decoding ended early because the caller asked it to (``should_stop``): its client has gone."""


class RagModel:
    """Retriever + generator: answers (:meth:`answer`) and the training likelihood (:meth:`likelihood`).

    ``prior_scale`` s sets p_eta(z|x) = softmax_k(s · q(x)·d(z)). DPR's unnormalised inner products need
    s = 1 (the paper); all-MiniLM-L6-v2 gives cosines in [-1, 1] and was trained contrastively with scale 20,
    so softmax(20 · cos) is its own distribution over passages, while s = 1 leaves the prior nearly uniform
    over the top k (0.18-0.28 for five passages in practice) and lets unrelated passages vote as much as
    the right one. ``None`` (the default) takes the scale the index records for its encoder, from the same
    snapshot as the passages (:func:`ragline.index.manifest.prior_scale`)."""

    def __init__(self, retriever: Retriever | None, generator: Generator, k: int = vocab.DEFAULT_K,
                 mode: str = vocab.DEFAULT_MODE, prior_scale: float | None = None) -> None:
        """``k`` and ``mode`` are the defaults of calls that give none; a call's own retrieval settings (mode,
        filters) travel with it, so one model serves requests with different settings."""
        self.retriever, self.generator, self.k, self.mode = retriever, generator, k, mode
        self.prior_scale = prior_scale

    def retrieve(self, questions: Sequence[str], k: int, grad: bool = False, mode: str | None = None,
                 filters: Sequence[str] = ()) -> tuple[list[list[Passage]], torch.Tensor, float]:
        """Top-k passages per question (``mode`` retrieval, default the model's; among those that pass
        ``filters``), their retrieval scores q(x)·d(z), (B, K), and the prior scale s for them: with ``grad`` the
        scores are recomputed from the stored d(z) with gradient to the question encoder."""
        if self.retriever is None:
            raise RaglineError("this model has no retriever", "open it with an index, or use --model closed-book")
        mode = mode or self.mode
        filters = tuple(filters or ())
        res = self.retriever.retrieve(list(questions), k=k, mode=mode, with_vectors=True, filters=filters)
        if (res.rows < 0).any():
            where = f", filter {' '.join(filters)}" if filters else ""
            raise RaglineError(f"fewer than k={k} passages matched a question ({mode} retrieval{where})",
                               "use dense or hybrid retrieval, a smaller -k" + (", or wider filters" if where else ""))
        flat = res.index.store.get(res.rows.reshape(-1))  # one fetch for the batch: (B * K) passages
        passages = [flat[b * k : (b + 1) * k] for b in range(len(res.rows))]
        if res.question_vectors is None:  # BM25-only index: no q(x)·d(z); a uniform prior
            return passages, torch.zeros(res.rows.shape), 1.0
        # q(x) from the encoder that searched (same snapshot as the index); recomputed only for its gradient
        q = res.encoder.embed(list(questions)) if grad else torch.from_numpy(res.question_vectors)
        scale = self.prior_scale if self.prior_scale is not None else mf.prior_scale(res.index.manifest)
        return passages, self.retriever.doc_scores(q, res.rows, res.index), scale

    def likelihood(self, questions: Sequence[str], answers: Sequence[str], model: str = vocab.RAG_SEQUENCE,
                   k: int | None = None, eps: float = 0.0) -> marginal.Likelihood:
        """Marginal likelihood of ``answers`` with gradient to the generator and the question encoder."""
        vocab.check(model, None)
        if model not in (*vocab.TRAINABLE_MODELS, vocab.CLOSED_BOOK):
            raise RaglineError(f"{model} has no training likelihood here",
                               f"use {' or '.join(vocab.TRAINABLE_MODELS)}")
        if model == vocab.CLOSED_BOOK:
            passages, scores, scale = [[None]] * len(questions), torch.zeros(len(questions), 1), 1.0
        else:
            passages, scores, scale = self.retrieve(questions, k or self.k, grad=True)
        if model == vocab.FID:
            return fid.likelihood(fid.FusedReader(self.generator, len(passages[0])), questions, passages, answers,
                                  marginal.doc_log_probs(scale * scores), eps=eps)
        s = self.generator.score(questions, passages, answers)
        fn = marginal.rag_token if model == vocab.RAG_TOKEN else marginal.rag_sequence
        doc = marginal.doc_log_probs(scale * scores).to(s.logprobs.device)  # (B, K), where the generator runs
        return fn(s.logprobs, doc, s.target, s.mask, eps=eps)

    @torch.no_grad()
    def answer(self, questions: Sequence[str], model: str = vocab.DEFAULT_MODEL, decoding: str | None = None,
               k: int | None = None, beams: int = vocab.DEFAULT_BEAMS,
               max_new_tokens: int = vocab.DEFAULT_MAX_NEW_TOKENS,
               length_penalty: float = vocab.DEFAULT_LENGTH_PENALTY, n_best: int = 1,
               on_step: Callable[[list[str]], None] | None = None,
               on_passages: Callable[[list[list[Source]]], None] | None = None,
               should_stop: Callable[[], bool] | None = None, mode: str | None = None,
               filters: Sequence[str] = ()) -> list[Answer]:
        """Decode an answer per question from the passages ``mode`` retrieval (default: the model's) finds
        among those that pass ``filters``. ``length_penalty`` ranks finished beams by
        log p / len ** length_penalty (0.0, the default, ranks by log p; 1.0, HF's default, favours longer
        answers).
        ``on_passages`` receives each question's retrieved passages with their prior (posterior None) before
        decoding starts; ``on_step`` each question's best answer text so far after every decoding step;
        ``should_stop`` is asked after every step, and True ends decoding with :class:`DecodingStopped`."""
        vocab.check(model, None)
        decoding = decoding or vocab.default_decoding(model)
        vocab.check(model, decoding)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RaglineError(f"max_new_tokens={max_new_tokens} leaves no room for an answer",
                               "give max_new_tokens of 1 or more")
        if not isinstance(beams, int) or beams < 1:
            raise RaglineError(f"beams={beams} is not a positive number", "give beams of 1 or more")
        k = k or self.k
        if model == vocab.CLOSED_BOOK:
            passages, scores, scale = [[None] for _ in questions], torch.zeros(len(questions), 1), 1.0
        else:
            passages, scores, scale = self.retrieve(questions, k, mode=mode, filters=filters)
        doc = marginal.doc_log_probs(scale * scores)  # (B, K) log p_eta(z|x)
        if on_passages is not None:
            on_passages([_sources(zs, scores[b], doc[b]) for b, zs in enumerate(passages)])
        def each_step(best: list[list[int]]) -> None:
            if should_stop is not None and should_stop():
                raise DecodingStopped("decoding was stopped")
            if on_step is not None:
                on_step([self._text(t) for t in best])

        texts = each_step if on_step is not None or should_stop is not None else None
        if model == vocab.RAG_SEQUENCE:
            decoded = rag_sequence_decode(self.generator, questions, passages, doc, beams=beams,
                                          max_new_tokens=max_new_tokens, thorough=decoding == vocab.THOROUGH,
                                          length_penalty=length_penalty, n_best=n_best, on_step=texts)
        elif model == vocab.FID:  # one decoder row per question over the k passages' fused encoder states
            decoded = rag_token_decode(fid.FusedReader(self.generator, k), questions, [[None]] * len(questions),
                                       torch.zeros(len(questions), 1), beams=1 if decoding == vocab.GREEDY else beams,
                                       max_new_tokens=max_new_tokens, length_penalty=length_penalty, n_best=n_best,
                                       on_step=texts, prompts=self.generator.pair_prompts(questions, passages))
        elif model == vocab.CONCAT:  # one row per question reading all k passages: no marginal (K = 1)
            gen = self.generator.widened(k)
            decoded = rag_token_decode(gen, questions, [[None]] * len(questions), torch.zeros(len(questions), 1),
                                       beams=1 if decoding == vocab.GREEDY else beams, max_new_tokens=max_new_tokens,
                                       length_penalty=length_penalty, n_best=n_best, on_step=texts,
                                       prompts=[gen.concat_prompt(q, zs) for q, zs in zip(questions, passages,
                                                                                        strict=True)])
        else:
            decoded = rag_token_decode(self.generator, questions, passages, doc,
                                       beams=1 if decoding == vocab.GREEDY else beams, max_new_tokens=max_new_tokens,
                                       length_penalty=length_penalty, n_best=n_best, on_step=texts)
        with profile.stage(profile.SCORE):
            return [self._explain(q, d, zs, scores[b], doc[b], model, decoding)
                    for b, (q, d, zs) in enumerate(zip(questions, decoded, passages, strict=True))]

    def _text(self, tokens: list[int]) -> str:
        stops = set(stop_ids(self.generator))
        return self.generator.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()

    def _explain(self, question: str, d: Decoded, passages: list[Passage | None], scores: torch.Tensor,
                 doc: torch.Tensor, model: str, decoding: str) -> Answer:
        ans = Answer(question, self._text(d.tokens), d.logprob, model, decoding, d.tokens,
                     alternatives=[(self._text(t), lp) for t, lp in d.alternatives])
        if passages[0] is None:
            return ans
        if model == vocab.RAG_SEQUENCE:
            posterior = marginal.sequence_posterior(doc[None], d.seq_logprobs[None])[0]
        elif model == vocab.FID:  # the decoder's cross-attention mass per passage, per answer token
            _, _, _, mass = fid.FusedReader(self.generator, len(passages)).forward([question], [passages], [d.tokens],
                                                                                   attentions=True)
            posterior = self._token_sources(ans, d.tokens, mass[0].cpu())
        elif model == vocab.CONCAT:  # the answer scored under each passage alone: RAG-Sequence's posterior of y
            lp, _, _ = self.generator.target_logprobs([question], [passages], [d.tokens])  # (1, K, T)
            posterior = marginal.sequence_posterior(doc[None], lp.sum(-1))[0]
            ans.text, ans.cited, runs = cite.from_marks(ans.text, len(passages))
        else:  # RAG-Token: p(z | x, y_<t, y_t) per token, and its mean over the answer's tokens
            lp = d.token_logprobs[None] if d.token_logprobs is not None else \
                self.generator.target_logprobs([question], [passages], [d.tokens])[0]  # (1, K, T)
            posterior = self._token_sources(ans, d.tokens, marginal.token_posterior(doc[None], lp)[0])
        ans.sources = _sources(passages, scores, doc, posterior)
        if model == vocab.CONCAT and ans.cited:
            ans.citations = runs
        else:
            ans.citations = (ans.token_sources and cite.per_token(ans.text, ans.token_sources)) or \
                cite.whole_answer(ans.text, posterior.tolist())
        return ans

    def _token_sources(self, ans: Answer, tokens: list[int], per_token: torch.Tensor) -> torch.Tensor:
        """Set ``ans.token_sources`` from a distribution over the passages per answer token, (T, K), stop
        tokens left out; returns its mean over those tokens, (K,)."""
        stops = set(stop_ids(self.generator))
        keep = [i for i, t in enumerate(tokens) if t not in stops]
        ans.token_sources = [(self.generator.tokenizer.decode([tokens[i]]), per_token[i].tolist()) for i in keep]
        return per_token[keep].mean(0) if keep else per_token.mean(0)


def _sources(passages: list[Passage | None], scores: torch.Tensor, doc: torch.Tensor,
             posterior: torch.Tensor | None = None) -> list[Source]:
    """One question's passages as :class:`Source` rows; ``doc`` (K,) is log p_eta(z|x), ``posterior`` (K,)."""
    if passages[0] is None:  # closed book
        return []
    prior = doc.exp()
    return [Source(i + 1, z.pid, z.doc_id, z.title, z.text, float(scores[i]), float(prior[i]),
                   None if posterior is None else float(posterior[i]), z.meta) for i, z in enumerate(passages)]

