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

from aqn import metric_keys as keys

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


def rollout_mismatch_metrics(
    train_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor
) -> dict[str, float]:
    """Training-vs-rollout mismatch metrics under verl 0.9's names, with verl's formulas
    (``calculate_debug_metrics`` and ``compute_offpolicy_metrics``), in float64.

    With ``log r = train - rollout`` (``r = pi_train / pi_rollout``), over valid tokens:

    - ``training/rollout_probs_diff_{mean,max,std}``: of ``|exp(train) - exp(rollout)|``
      (``torch.std``, so nan with a single valid token), ``_valid`` = 1;
    - ``training/rollout_actor_probs_pearson_corr``: ``torch.corrcoef`` of the two probability
      vectors (nan when one is constant);
    - ``rollout_corr/kl``: ``mean(-log r)``; ``rollout_corr/k3_kl``: ``mean(r - log r - 1)``,
      unclamped (it can overflow to inf, as verl's);
    - per sequence, with ``log_ppl = -mean token log-prob`` (0 for an all-masked row, which
      verl counts): ``rollout_corr/{training,rollout}_ppl`` (mean of ``exp(log_ppl)``),
      ``{training,rollout}_log_ppl``, ``log_ppl_diff`` (``log_ppl_train - log_ppl_rollout``)
      with its ``_max``, ``_min`` and ``log_ppl_abs_diff``, ``ppl_ratio`` (mean of
      ``exp(log_ppl_diff)``);
    - ``rollout_corr/chi2_token``: ``mean(r^2) - 1``; ``chi2_seq``: ``mean((prod r)^2) - 1``
      (``log r`` and its sequence sum clamped to +-20). An estimate: a small batch or a huge
      mismatch can take it below 0, down to -1 (docs/reference.md#mismatch-metrics).

    aqn adds ``rollout_corr/abs_logp_diff_{mean,max}`` (of ``|log r|``), the quantity the
    published mismatch figures use. float64, because metrics of tiny mismatches (k3 ~ 1e-6)
    would drown in float32 rounding; verl's functions fed the same float64 tensors give the
    same values (tests/test_peers.py).
    """
    valid = mask.bool()
    if not valid.any():
        raise ValueError("mask has no valid token")
    train = train_log_prob.detach().double()
    rollout = rollout_log_prob.detach().double()

    probs_train, probs_rollout = train[valid].exp(), rollout[valid].exp()
    probs_diff = (probs_train - probs_rollout).abs()
    pearson = torch.corrcoef(torch.stack([probs_train, probs_rollout]))[0][1]

    log_r = train - rollout
    token = {
        "kl": masked_mean(-log_r, valid),
        "k3_kl": masked_mean(log_r.exp() - log_r - 1, valid),
        "chi2_token": masked_mean(log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp().square(),
                                  valid) - 1.0,
    }
    seq_log_r = masked_sum(log_r, valid, dim=-1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    train_log_ppl = -masked_mean(train, valid, dim=-1)
    rollout_log_ppl = -masked_mean(rollout, valid, dim=-1)
    log_ppl_diff = train_log_ppl - rollout_log_ppl
    seq = {
        "training_ppl": train_log_ppl.exp().mean(),
        "training_log_ppl": train_log_ppl.mean(),
        "rollout_ppl": rollout_log_ppl.exp().mean(),
        "rollout_log_ppl": rollout_log_ppl.mean(),
        "log_ppl_diff": log_ppl_diff.mean(),
        "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "log_ppl_diff_max": log_ppl_diff.max(),
        "log_ppl_diff_min": log_ppl_diff.min(),
        "ppl_ratio": log_ppl_diff.exp().mean(),
        "chi2_seq": (2.0 * seq_log_r).exp().mean() - 1.0,
    }
    abs_log_r = log_r[valid].abs()
    metrics = {
        "training/rollout_probs_diff_valid": 1,
        "training/rollout_probs_diff_max": probs_diff.max(),
        keys.PROBS_DIFF: probs_diff.mean(),
        "training/rollout_probs_diff_std": probs_diff.std(),
        "training/rollout_actor_probs_pearson_corr": pearson,
        **{keys.ROLLOUT_CORR + k: v for k, v in {**token, **seq}.items()},
        keys.ABS_LOGP_DIFF: abs_log_r.mean(),
        keys.ABS_LOGP_DIFF_MAX: abs_log_r.max(),
    }
    return {name: float(value) for name, value in metrics.items()}
