"""Log-space marginalisation over retrieved passages: the RAG-Sequence and RAG-Token likelihoods.

Notation: B questions, K passages each, T target positions, V vocabulary entries.

    p_eta(z|x)     = softmax over the top-K of q(x)·d(z)                       doc_logprobs (B, K)
    RAG-Sequence   log p(y|x) = logsumexp_k [ log p_eta(z_k|x) + sum_t log p_theta(y_t | x, z_k, y_<t) ]
    RAG-Token      log p(y|x) = sum_t logsumexp_k [ log p_eta(z_k|x) + log p_theta(y_t | x, z_k, y_<t) ]

Both are one operation, :func:`marginalize` (logsumexp over the passage axis after adding log p_eta), applied
to per-passage sequence scores (RAG-Sequence) or per-passage token scores (RAG-Token). Everything stays in
log space; no probability is ever multiplied out.

Label smoothing follows Hugging Face's RAG (``get_nll``), so that losses can be compared with it: with
``eps`` > 0 the loss is ``(1 - eps) * nll + eps / V * smooth`` where ``smooth`` replaces the target token's
log-probability by the sum of all V log-probabilities at each position (after the same marginalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def doc_log_probs(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p_eta(z|x) from retrieval scores q(x)·d(z): (B, K) -> (B, K)."""
    return torch.log_softmax(doc_scores.float(), dim=-1)


def marginalize(doc_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """logsumexp_k [ log p_eta(z_k|x) + logprobs[:, k, ...] ]: (B, K), (B, K, *rest) -> (B, *rest)."""
    extra = logprobs.dim() - 2
    return torch.logsumexp(doc_logprobs.view(*doc_logprobs.shape, *([1] * extra)) + logprobs, dim=1)


def gather_targets(logprobs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p_theta(y_t | x, z_k, y_<t) of the target tokens, 0 at padding: (B, K, T, V) -> (B, K, T)."""
    idx = target[:, None, :, None].expand(-1, logprobs.shape[1], -1, 1)  # (B, K, T, 1)
    return logprobs.gather(-1, idx).squeeze(-1) * mask[:, None, :]


def sequence_posterior(doc_logprobs: torch.Tensor, seq_logprobs: torch.Tensor) -> torch.Tensor:
    """RAG-Sequence p(z_k | x, y) = softmax_k [log p_eta(z_k|x) + log p_theta(y | x, z_k)]: (B, K)."""
    return torch.softmax(doc_logprobs + seq_logprobs, dim=-1)


def token_posterior(doc_logprobs: torch.Tensor, token_logprobs: torch.Tensor) -> torch.Tensor:
    """RAG-Token p(z_k | x, y_<t, y_t) for each target token: each token draws its own passage with prior
    p_eta, so its posterior is softmax_k [log p_eta(z_k|x) + log p_theta(y_t | x, z_k, y_<t)].
    (B, K), (B, K, T) -> (B, T, K)."""
    return torch.softmax(doc_logprobs[:, :, None] + token_logprobs, dim=1).transpose(1, 2)


@dataclass
class Likelihood:
    """The marginal likelihood of a batch of answers, its loss and the passage posteriors."""

    loglik: torch.Tensor     # (B,) log p(y|x)
    loss: torch.Tensor       # (B,) label-smoothed negative log-likelihood (= -loglik when eps = 0)
    posterior: torch.Tensor  # (B, K) p(z|x,y) for RAG-Sequence; for RAG-Token the mean over tokens
    token_posterior: torch.Tensor | None = None  # (B, T, K) RAG-Token: p(z | x, y_<t, y_t) per target token


def rag_sequence(logprobs: torch.Tensor, doc_logprobs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 eps: float = 0.0) -> Likelihood:
    """RAG-Sequence: one passage for the whole answer. ``logprobs`` (B, K, T, V)."""
    maskf = mask.to(logprobs.dtype)
    seq = gather_targets(logprobs, target, maskf).sum(-1)  # (B, K) log p_theta(y | x, z_k)
    loglik = marginalize(doc_logprobs, seq)  # (B,)
    loss = -loglik
    if eps:
        v = logprobs.shape[-1]
        smooth_seq = (logprobs.sum(-1) * maskf[:, None, :]).sum(-1)  # (B, K)
        smooth = marginalize(v * doc_logprobs, smooth_seq)  # HF adds doc log-probs to all V entries once
        loss = (1 - eps) * loss - eps / v * smooth
    return Likelihood(loglik, loss, sequence_posterior(doc_logprobs, seq))


def rag_token(logprobs: torch.Tensor, doc_logprobs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              eps: float = 0.0) -> Likelihood:
    """RAG-Token: a passage per token. ``logprobs`` (B, K, T, V)."""
    maskf = mask.to(logprobs.dtype)
    tok = gather_targets(logprobs, target, maskf)  # (B, K, T)
    per_token = marginalize(doc_logprobs, tok)  # (B, T) log p'(y_t | x, y_<t)
    loglik = (per_token * maskf).sum(-1)  # (B,)
    token_post = token_posterior(doc_logprobs, tok)  # (B, T, K)
    loss = -loglik
    if eps:
        v = logprobs.shape[-1]
        smooth = (marginalize(doc_logprobs, logprobs).sum(-1) * maskf).sum(-1)  # (B,)
        loss = (1 - eps) * loss - eps / v * smooth
    denom = maskf.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    posterior = (token_post * maskf[..., None]).sum(1) / denom  # (B, K)
    return Likelihood(loglik, loss, posterior, token_post)
