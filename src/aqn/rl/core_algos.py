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
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_KINDS: tuple[str, ...] = ("kl", "abs", "mse", "low_var_kl")
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
    """Reduce per-token losses ``[B, T]`` to a scalar.

    - ``token-mean``: sum over valid tokens / number of valid tokens (DAPO).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO paper).
    - ``seq-mean-token-sum-norm``: sum of all valid token losses / ``mask.shape[-1]``
      (Dr. GRPO, as verl: the divisor is the padded response length, a constant, and the
      result is *not* divided by the number of sequences).

    The two ``seq-mean`` modes average over sequences that have at least one valid token.
    """
    if mode not in LOSS_AGG_MODES:
        valid_modes = ", ".join(LOSS_AGG_MODES)
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {valid_modes}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-sum-norm":
        return seq_sums.sum() / mask.shape[-1]
    valid = mask.bool()
    per_seq = seq_sums
    if mode == "seq-mean-token-mean":
        per_seq = seq_sums / valid.sum(-1).clamp(min=1)
    return masked_mean(per_seq, valid.any(-1))


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
    """Per-token KL estimate between the policy and the reference model.

    ``kl``: ``logp - ref`` (k1); ``abs``: ``|logp - ref|``; ``mse``: ``0.5 (logp - ref)^2``
    (k2); ``low_var_kl``: k3 = ``exp(ref - logp) - (ref - logp) - 1``, with the log-ratio
    clamped to +-20 and the result to [-10, 10] as verl does (non-negative, low variance).
    """
    diff = log_prob - ref_log_prob
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "low_var_kl":
        kl = torch.clamp(-diff, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return torch.clamp(torch.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown kl kind {kind!r}; valid kinds: {', '.join(KL_KINDS)}")


def rollout_is_weights(
    train_log_prob: Tensor,
    rollout_log_prob: Tensor,
    mask: Tensor,
    level: str = "token",
    threshold: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance weights ``min(r, threshold)`` correcting rollout-vs-train mismatch.

    ``token``: ``r = exp(clamp(train - rollout, -20, 20))`` per token. ``sequence``: the
    product of the sequence's token ratios, ``exp(clamp(sum of log r, -20, 20))``, broadcast
    over its tokens. Weights are detached (they reweight samples, they are not optimised)
    and 0 on masked positions; shape ``[B, T]``, dtype of the inputs.

    Metrics, over valid tokens (``token``) or sequences with a valid token (``sequence``):
    ``rollout_is_mean`` and ``rollout_is_max`` of the weights *before* truncation (as verl
    logs them, so the size of the mismatch stays visible), ``rollout_is_truncated_frac``
    (share above ``threshold``), and ``rollout_is_eff_sample_size`` =
    ``(sum w)^2 / (N sum w^2)`` of the truncated weights actually applied, in (0, 1], 1 when
    all weights are equal.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown IS level {level!r}; valid levels: {', '.join(IS_LEVELS)}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    valid = mask.bool()
    if not valid.any():
        raise ValueError("mask has no valid token")

    diff = (train_log_prob - rollout_log_prob).detach()
    log_r = torch.where(valid, diff, torch.zeros_like(diff))
    if level == "token":
        raw = log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        per_unit = raw[valid]
    else:
        seq_ratio = log_r.sum(-1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        raw = seq_ratio.unsqueeze(-1).expand_as(log_r)
        per_unit = seq_ratio[valid.any(-1)]
    weights = torch.where(valid, raw.clamp(max=threshold), torch.zeros_like(raw))

    applied = per_unit.clamp(max=threshold)
    ess = applied.sum().square() / (applied.numel() * applied.square().sum())
    metrics = {
        "rollout_is_mean": per_unit.mean(),
        "rollout_is_max": per_unit.max(),
        "rollout_is_truncated_frac": (per_unit > threshold).float().mean(),
        "rollout_is_eff_sample_size": ess,
    }
    return weights, {name: float(value) for name, value in metrics.items()}
