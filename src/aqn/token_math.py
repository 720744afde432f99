"""Token maths that the rollout engine and the trainer share: log-probs and entropy from
logits, masked reductions, and the rollout-vs-training mismatch metrics (verl's names).

It sits below both ``aqn.rollout`` and ``aqn.rl`` (docs/architecture.md#layers), so the
engine and the trainer compute these numbers with the same code.

Conventions: per-token tensors are ``[batch, response_len]``; ``mask`` (float or bool, same
shape) is nonzero on real response tokens. Masked positions never influence a result, even
when they hold ``inf`` or ``nan``: values are selected with ``torch.where``, never multiplied
by the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

# exp(+-20) bounds every ratio computed from log-probabilities (as verl), so nothing overflows.
LOG_RATIO_BOUND = 20.0


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set, over ``dim`` (all elements when None)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is set; 0 (not nan) where nothing is valid."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in float32.

    ``H = -sum(p * log_softmax(l))``: log_softmax subtracts the max logit first, so large
    logits neither overflow nor cancel (``logsumexp(l) - sum(p * l)`` loses digits there).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``log_softmax(logits)`` at ``labels``, in float32, shape ``labels.shape``.

    Gathers one logit and subtracts the logsumexp instead of materialising the full
    ``[..., V]`` log-softmax.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors, defined for the degenerate cases.

    Identical inputs give exactly 1.0 (no rounding noise). Two constant vectors are related
    by an exact shift, so 1.0 too; if only one is constant there is no co-variation: 0.0.
    """
    if torch.equal(x, y):
        return 1.0
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = xc.square().sum(), yc.square().sum()
    if sxx == 0 and syy == 0:
        return 1.0
    if sxx == 0 or syy == 0:
        return 0.0
    return float(((xc * yc).sum() / (sxx * syy).sqrt()).clamp(-1.0, 1.0))


def rollout_mismatch_metrics(
    train_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor
) -> dict[str, float]:
    """Training-vs-rollout mismatch metrics with verl's names, over valid tokens only.

    With ``log r = train - rollout`` (``r = pi_train / pi_rollout``):

    - ``training/rollout_probs_diff_{mean,max,std}``: ``|exp(train) - exp(rollout)|``
      (std unbiased as ``torch.std``; 0 with a single valid token);
    - ``training/rollout_actor_probs_pearson_corr``: Pearson correlation of the two
      probability vectors (exactly 1.0 for identical inputs, see ``_pearson``);
    - ``rollout_corr/kl``: ``mean(rollout - train)``;
    - ``rollout_corr/k3_kl``: ``mean(r - log r - 1)``, ``log r`` clamped to +-20;
    - ``rollout_corr/log_ppl_abs_diff``: mean over sequences of
      ``|log_ppl_train - log_ppl_rollout|``, ``log_ppl = -mean token log-prob``;
    - ``rollout_corr/ppl_ratio``: mean over sequences of ``exp(log_ppl_train - log_ppl_rollout)``;
    - ``rollout_corr/chi2_token``: ``mean(r^2) - 1`` (clamped ``log r``);
    - ``rollout_corr/abs_logp_diff_{mean,max}``: of ``|train - rollout|``.

    Sequence means skip sequences without valid tokens. Everything derives from the
    difference ``train - rollout``, which is exactly 0 for identical inputs, so every
    difference metric is then exactly 0 and ``ppl_ratio`` exactly 1.
    """
    valid = mask.bool()
    if not valid.any():
        raise ValueError("mask has no valid token")
    # float64: metrics of tiny mismatches (k3 ~ 1e-6) would drown in float32 rounding
    train = train_log_prob.detach().double()
    rollout = rollout_log_prob.detach().double()

    train_tok, rollout_tok = train[valid], rollout[valid]
    probs_train, probs_rollout = train_tok.exp(), rollout_tok.exp()
    probs_diff = (probs_train - probs_rollout).abs()
    log_r = train_tok - rollout_tok
    safe_log_r = log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = safe_log_r.exp()

    # log_ppl_train - log_ppl_rollout = -mean over the sequence's tokens of log r
    seq_log_r = torch.where(valid, train - rollout, torch.zeros_like(train))
    has_tokens = valid.any(-1)
    log_ppl_diff = -(seq_log_r.sum(-1) / valid.sum(-1).clamp(min=1))[has_tokens]

    metrics = {
        "training/rollout_probs_diff_mean": probs_diff.mean(),
        "training/rollout_probs_diff_max": probs_diff.max(),
        "training/rollout_probs_diff_std": probs_diff.std() if probs_diff.numel() > 1 else 0.0,
        "training/rollout_actor_probs_pearson_corr": _pearson(probs_train, probs_rollout),
        "rollout_corr/kl": (-log_r).mean(),
        "rollout_corr/k3_kl": (ratio - safe_log_r - 1.0).mean(),
        "rollout_corr/log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "rollout_corr/ppl_ratio": log_ppl_diff.exp().mean(),
        "rollout_corr/chi2_token": ratio.square().mean() - 1.0,
        "rollout_corr/abs_logp_diff_mean": log_r.abs().mean(),
        "rollout_corr/abs_logp_diff_max": log_r.abs().max(),
    }
    return {name: float(value) for name, value in metrics.items()}
