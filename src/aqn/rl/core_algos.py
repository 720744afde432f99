"""GRPO maths: group advantages, PPO policy loss, KL penalties and truncated importance weights
(the token maths it shares with the rollout engine is in ``aqn.token_math``).

Formulas follow verl (``verl/trainer/ppo/core_algos.py`` and ``rollout_corr_helper.py``)
and keep its metric names; the code is our own.

Conventions: per-token tensors are ``[batch, response_len]``; ``mask`` (float or bool, same
shape) is nonzero on real response tokens. Masked positions never influence a result, even
when they hold ``inf`` or ``nan``: values are selected with ``torch.where``, never multiplied
by the mask.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from aqn.token_math import LOG_RATIO_BOUND, masked_mean, masked_sum

LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# verl's names; k1/k2/k3 alias kl/mse/low_var_kl, and a trailing "+" keeps the estimate's value
# but takes the gradient of k2 (straight through), which is the unbiased KL gradient.
_KL_BASE = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_KINDS: tuple[str, ...] = _KL_BASE + tuple(f"{k}+" for k in _KL_BASE)
IS_LEVELS: tuple[str, ...] = ("token", "sequence")

def zero_advantage_fraction(scores: Tensor, group_ids: Sequence[int | str]) -> float:
    """Fraction of groups (prompts) whose completions all got the same score: GRPO gives
    them zero advantage, so they teach nothing (TRL logs it as ``frac_reward_zero_std``)."""
    by_group: dict[Hashable, set[float]] = defaultdict(set)
    for key, score in zip(group_ids, scores.tolist(), strict=True):
        by_group[key].add(score)
    return sum(len(v) == 1 for v in by_group.values()) / max(1, len(by_group))


def grpo_advantages(
    scores: Tensor,
    group_ids: Sequence[int | str] | Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage, one scalar per sequence: ``(r - mean_g) / (std_g + eps)``.

    ``std_g`` is the unbiased standard deviation of the group's scores; with
    ``norm_by_std=False`` the advantage is ``r - mean_g`` (Dr. GRPO). A group of one has no
    peer to compare with and gets advantage 0. (verl's code uses mean 0 and std 1 there,
    which gives the raw score; we follow docs/reference.md#grpo-advantages, which asks for 0.)
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [batch], got shape {tuple(scores.shape)}")
    keys: list[Hashable] = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(keys) != scores.shape[0]:
        raise ValueError(f"{len(keys)} group ids for {scores.shape[0]} scores")

    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        members[key].append(i)

    scores = scores.detach()
    if not scores.is_floating_point():
        scores = scores.float()
    advantages = torch.zeros_like(scores)
    for rows in members.values():
        if len(rows) == 1:
            continue
        idx = torch.tensor(rows, device=scores.device)
        group = scores[idx]
        centred = group - group.mean()
        advantages[idx] = centred / (group.std() + eps) if norm_by_std else centred
    return advantages


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce per-token losses ``[B, T]`` to a scalar, as verl 0.9's ``agg_loss`` on one rank.

    - ``token-mean``: sum over valid tokens / number of valid tokens (DAPO).
    - ``token-sum``: sum over valid tokens.
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO paper).
    - ``seq-mean-token-sum-norm``: ``seq-mean-token-sum`` / ``mask.shape[-1]`` (Dr. GRPO: the
      padded response length, a constant; verl >= 0.8 divides by the sequences too).

    The ``seq-mean`` modes average over sequences that have at least one valid token.
    """
    if mode not in LOSS_AGG_MODES:
        valid_modes = ", ".join(LOSS_AGG_MODES)
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {valid_modes}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "token-sum":
        return masked_sum(loss_mat, mask)
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    valid = mask.bool()
    per_seq = seq_sums
    if mode == "seq-mean-token-mean":
        per_seq = seq_sums / valid.sum(-1).clamp(min=1)
    loss = masked_mean(per_seq, valid.any(-1))
    return loss / mask.shape[-1] if mode == "seq-mean-token-sum-norm" else loss


def policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    is_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """verl's vanilla PPO clipped policy loss with dual clip.

    ``ratio = exp(clamp(log_prob - old_log_prob, -20, 20))``; per token the loss is
    ``max(-A * ratio, -A * clamp(ratio, 1 - low, 1 + high))``, and for ``A < 0`` it is further
    capped at ``-A * clip_ratio_c`` (dual clip) so a huge ratio cannot blow up the loss.
    ``advantages`` is ``[B]`` (broadcast over tokens) or ``[B, T]``. ``is_weights``
    (truncated importance weights, see ``rollout_is_weights``) scale each token's loss before
    aggregation. Only ``log_prob`` receives gradients: ``old_log_prob``, ``advantages`` and
    ``is_weights`` are constants of the objective and are detached here.

    Returns ``pg_loss`` (scalar with grad) and the detached 0-dim metrics ``pg_clipfrac``
    (share of valid tokens where the ratio clip is active), ``pg_clipfrac_lower`` (share where
    the dual clip is active) and ``ppo_kl`` (mean of ``old_log_prob - log_prob``). Metrics
    stay tensors so a training step does not synchronise with the device per micro-batch.
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for the dual clip, got {clip_ratio_c}")
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)

    log_ratio = torch.clamp(log_prob - old_log_prob.detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip_loss = torch.maximum(unclipped, clipped)
    dual_cap = -advantages * clip_ratio_c
    negative = advantages < 0
    pg_losses = torch.where(negative, torch.minimum(clip_loss, dual_cap), clip_loss)
    if is_weights is not None:
        pg_losses = pg_losses * is_weights.detach()

    with torch.no_grad():
        pg_clipfrac = masked_mean((clipped > unclipped).float(), mask)
        pg_clipfrac_lower = masked_mean((negative & (clip_loss > dual_cap)).float(), mask)
        ppo_kl = masked_mean(-log_ratio, mask)
    return {
        "pg_loss": agg_loss(pg_losses, mask, loss_agg_mode),
        "pg_clipfrac": pg_clipfrac,
        "ppo_kl": ppo_kl,
        "pg_clipfrac_lower": pg_clipfrac_lower,
    }


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate between the policy and the reference model (verl's names).

    ``kl`` / ``k1``: ``logp - ref``; ``abs``: ``|logp - ref|``; ``mse`` / ``k2``:
    ``0.5 (logp - ref)^2``; ``low_var_kl`` / ``k3``: ``exp(ref - logp) - (ref - logp) - 1``,
    with the log-ratio clamped to +-20 and the result to [-10, 10] as verl does (non-negative,
    low variance). ``<kind>+``: the value of ``<kind>`` with the gradient of k2.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    base = kind.removesuffix("+")
    diff = log_prob - ref_log_prob
    if base in ("kl", "k1"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * diff.square()
    else:
        kl = torch.clamp(-diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        value = torch.clamp(torch.exp(kl) - kl - 1.0, -10.0, 10.0)
    if not kind.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


def rollout_is_weights(
    train_log_prob: Tensor,
    rollout_log_prob: Tensor,
    mask: Tensor,
    level: str = "token",
    threshold: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance weights ``min(r, threshold)`` correcting rollout-vs-train mismatch,
    with the metrics verl 0.9 logs for them (``compute_rollout_correction_weights``).

    ``token``: ``r = exp(clamp(train - rollout, -20, 20))`` per token. ``sequence``: the
    product of the sequence's token ratios, ``exp(clamp(sum of log r, -20, 20))``, broadcast
    over its tokens. Weights are detached (they reweight samples, they are not optimised)
    and 0 on masked positions; shape ``[B, T]``, dtype of the inputs.

    Metrics (verl's keys, without the ``rollout_corr/`` prefix): ``rollout_is_mean``, ``_std``
    and ``_eff_sample_size`` of the truncated weights over valid tokens (so a sequence weighs
    by its length at sequence level too); ``rollout_is_max`` / ``_min``: of the truncated
    weights per token, of the untruncated ratio per sequence (an all-masked sequence counts
    as ratio 1 there); ``rollout_is_ratio_fraction_high`` / ``_low``: share above
    ``threshold`` / below ``1 / threshold``; ``rollout_is_seq_*``: of each sequence's mean
    weight.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown IS level {level!r}; valid levels: {', '.join(IS_LEVELS)}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    valid = mask.bool()
    if not valid.any():
        raise ValueError("mask has no valid token")

    log_r = torch.where(valid, train_log_prob - rollout_log_prob, 0.0).detach()
    if level == "token":
        log_r_unit = log_r  # the log-ratio each weight comes from
        raw = log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
    else:
        log_r_unit = log_r.sum(-1, keepdim=True)
        raw = log_r_unit.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp().expand_as(log_r)
    raw = torch.where(valid, raw, 0.0)
    weights = raw.clamp(max=threshold)
    return weights, _is_metrics(weights, raw, log_r_unit, valid, level, threshold)


def _is_metrics(weights: Tensor, raw: Tensor, log_r_unit: Tensor, valid: Tensor, level: str,
                threshold: float) -> dict[str, float]:
    """verl 0.9's ``compute_is_metrics`` for truncated weights (see ``rollout_is_weights``)."""
    lower = 1.0 / threshold
    metrics = {"rollout_is_mean": masked_mean(weights, valid)}
    if level == "sequence":
        log_upper = torch.log(torch.tensor(threshold, device=weights.device))
        log_lower = torch.log(torch.tensor(lower, device=weights.device))
        metrics["rollout_is_max"] = log_r_unit.max().clamp(max=LOG_RATIO_BOUND).exp()
        metrics["rollout_is_min"] = log_r_unit.min().exp()
        metrics["rollout_is_ratio_fraction_high"] = (log_r_unit > log_upper).float().mean()
        metrics["rollout_is_ratio_fraction_low"] = (log_r_unit < log_lower).float().mean()
    else:
        metrics["rollout_is_ratio_fraction_high"] = masked_mean(
            (raw > threshold).float(), valid)
        metrics["rollout_is_ratio_fraction_low"] = masked_mean((raw < lower).float(), valid)
        metrics["rollout_is_max"] = weights.masked_fill(~valid, float("-inf")).max()
        metrics["rollout_is_min"] = weights.masked_fill(~valid, float("inf")).min()
    applied = weights.clamp(min=0.0, max=threshold)
    mean = masked_mean(applied, valid)
    if valid.sum() > 1:
        var = masked_mean(applied.square(), valid) - mean.square()
        metrics["rollout_is_std"] = var.clamp(min=0.0).sqrt()
    else:
        metrics["rollout_is_std"] = 0.0
    normalised = applied / (mean + 1e-8)
    metrics["rollout_is_eff_sample_size"] = 1.0 / masked_mean(
        normalised.square(), valid).item()
    seq_mean = masked_mean(weights, valid, dim=-1)
    raw_seq_mean = masked_mean(raw, valid, dim=-1)
    metrics.update({
        "rollout_is_seq_mean": seq_mean.mean(),
        "rollout_is_seq_std": seq_mean.std() if seq_mean.numel() > 1 else 0.0,
        "rollout_is_seq_max": seq_mean.max(),
        "rollout_is_seq_min": seq_mean.min(),
        "rollout_is_seq_max_deviation": (seq_mean - 1.0).abs().max(),
        "rollout_is_seq_fraction_high": (raw_seq_mean > threshold).float().mean(),
        "rollout_is_seq_fraction_low": (raw_seq_mean < lower).float().mean(),
    })
    return {name: float(value) for name, value in metrics.items()}
