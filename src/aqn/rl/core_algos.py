"""GRPO maths: group advantages, PPO policy loss, KL penalties and rollout correction
(importance weights and rejection sampling); the token maths it shares with the rollout
engine is in ``aqn.token_math``.

Formulas follow verl (``verl/trainer/ppo/core_algos.py`` and ``rollout_corr_helper.py``)
and keep its metric names; the code is our own.

Conventions: per-token tensors are ``[batch, response_len]``; ``mask`` (float or bool, same
shape) is nonzero on real response tokens. Masked positions never influence a result, even
when they hold ``inf`` or ``nan``: values are selected with ``torch.where``, never multiplied
by the mask.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from aqn import metric_keys as keys
from aqn.config.rollout_correction import (
    IS_LEVELS,
    RolloutCorrectionConfig,
    parse_is_threshold,
    parse_rs_options,
    parse_rs_thresholds,
)
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


POLICY_LOSS_METRICS = ("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")  # actor/<name>


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
    threshold: float | str = 2.0,
    batch_normalize: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Importance weights correcting rollout-vs-train mismatch, with the metrics verl 0.9
    logs for them (``compute_rollout_correction_weights``).

    ``token``: ``r = exp(clamp(train - rollout, -20, 20))`` per token. ``sequence``: the
    product of the sequence's token ratios, ``exp(clamp(sum of log r, -20, 20))``, broadcast
    over its tokens. ``threshold``: a number ``C`` truncates, ``min(r, C)`` (TIS); a string
    ``"lower_upper"`` zeroes the weights outside ``[lower, upper]`` (IcePop).
    ``batch_normalize``: the weights divided by their mean over valid tokens (token level) or
    over sequences with a valid token (sequence level), when that mean is > 1e-8. Weights
    are detached (they reweight samples, they are not optimised) and 0 on masked positions;
    shape ``[B, T]``, dtype of the inputs.

    Metrics (verl's keys, without the ``rollout_corr/`` prefix; all before the batch
    normalization): ``rollout_is_mean``, ``_std`` and ``_eff_sample_size`` of the weights
    over valid tokens (so a sequence weighs by its length at sequence level too);
    ``rollout_is_max`` / ``_min``: of the weights per token, of the untruncated ratio per
    sequence (an all-masked sequence counts as ratio 1 there); ``rollout_is_ratio_fraction_high``
    / ``_low``: share above ``upper`` / below ``lower`` (``1 / C`` for TIS);
    ``rollout_is_seq_*``: of each sequence's mean weight; with IcePop ``rollout_is_oob_ratio``
    (share of valid tokens zeroed), with ``batch_normalize`` ``rollout_is_batch_norm_factor``.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown IS level {level!r}; valid levels: {', '.join(IS_LEVELS)}")
    upper, lower = parse_is_threshold(threshold)
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
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    metrics = _is_metrics(weights, raw, log_r_unit, valid, level, upper, lower)
    if lower is not None:
        metrics["rollout_is_oob_ratio"] = float(masked_mean(
            ((raw < lower) | (raw > upper)).float(), valid))
    if batch_normalize:
        if level == "token":
            mean = masked_mean(weights, valid)
        else:  # over sequences, each counted once
            seq_valid = valid.any(-1).to(weights.dtype)
            mean = (masked_mean(weights, valid, dim=-1) * seq_valid).sum() / \
                seq_valid.sum().clamp_min(1e-8)
        metrics["rollout_is_batch_norm_factor"] = float(mean) if mean > 1e-8 else 1.0
        if mean > 1e-8:
            weights = weights / mean
    return weights, metrics


def _is_metrics(weights: Tensor, raw: Tensor, log_r_unit: Tensor, valid: Tensor, level: str,
                threshold: float, lower: float | None = None) -> dict[str, float]:
    """verl 0.9's ``compute_is_metrics`` (see ``rollout_is_weights``)."""
    lower = 1.0 / threshold if lower is None else lower
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
    second_moment = masked_mean(normalised.square(), valid).item()
    # 0 when IcePop zeroed every weight (verl divides by zero there: ZeroDivisionError)
    metrics["rollout_is_eff_sample_size"] = 1.0 / second_moment if second_moment else 0.0
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


def rollout_rejection_mask(
    train_log_prob: Tensor,
    rollout_log_prob: Tensor,
    mask: Tensor,
    rollout_rs: str,
    threshold: float | str,
) -> tuple[Tensor, dict[str, float]]:
    """Rejection sampling (masked IS) against rollout-vs-train mismatch: ``mask`` with the
    tokens, or whole sequences, set to 0 whose divergence lies out of bounds (verl 0.9's
    ``compute_rollout_rejection_mask``), and verl's metrics for it.

    With ``log r = clamp(train - rollout, -20, 20)`` per token: ``k1 = -log r``,
    ``k2 = (log r)^2 / 2``, ``k3 = r - 1 - log r``. ``token_kN`` bounds each token's value,
    ``seq_sum_kN`` / ``seq_mean_kN`` / ``seq_max_kN`` the sum / mean / max over each sequence's
    valid tokens (a sequence out of bounds loses every token). k1 options keep
    ``log(lower) <= k1 <= log(upper)``, k2 / k3 options ``kN <= upper``. ``rollout_rs`` chains
    options with commas (a token stays only if every option keeps it); ``threshold`` gives
    one bound spec for all or one per option (``aqn.config.rollout_correction``).

    Metrics (verl's keys, without the ``rollout_corr/`` prefix): per option
    ``rollout_rs_<option>_{mean,max,min,std,fraction_high,fraction_low,seq_mean,seq_std,
    seq_max,seq_min,seq_max_deviation,seq_fraction_high,masked_fraction,seq_masked_fraction}``
    (``seq_fraction_low`` for k1 options), and over all options
    ``rollout_rs_masked_fraction`` (share of valid tokens rejected) and
    ``rollout_rs_seq_masked_fraction`` (share of all sequences, verl's denominator, with a
    rejected token). The returned mask has ``mask``'s dtype.
    """
    options = parse_rs_options(rollout_rs)
    bounds = parse_rs_thresholds(options, threshold)
    if train_log_prob.shape[0] == 0:
        return mask, {}
    valid = mask.bool()
    log_r = torch.where(valid, train_log_prob - rollout_log_prob, 0.0).detach()
    log_r = log_r.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    dtype = log_r.dtype
    token_stat = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.exp(log_r) - 1.0 - log_r}
    seq_valid = valid.any(-1)
    keep_all = torch.ones_like(log_r, dtype=dtype)
    metrics: dict[str, float] = {}
    for option in options:
        lower, upper = bounds[option]
        k1 = option.endswith("k1")
        if k1:
            assert lower is not None
            lower, upper = math.log(lower), math.log(upper)
        values = token_stat[option[-2:]]
        level = "token" if option.startswith("token") else "sequence"
        seq_stat = None
        if level == "token":
            stat = values
        else:
            if option.startswith("seq_sum"):
                seq_stat = masked_sum(values, valid, dim=-1)
            elif option.startswith("seq_mean"):
                seq_stat = masked_mean(values, valid, dim=-1)
            else:  # seq_max; 0 for a sequence with no valid token
                seq_stat = values.masked_fill(~valid, float("-inf")).amax(dim=-1)
                seq_stat = torch.where(seq_stat == float("-inf"),
                                       torch.zeros_like(seq_stat), seq_stat)
            stat = seq_stat.unsqueeze(-1).expand_as(values)
        keep = (stat >= lower) & (stat <= upper) if k1 else stat <= upper
        keep_float = keep.to(dtype)
        keep_all = keep_all * keep_float
        metrics.update(_rs_metrics(option, stat, seq_stat, valid, seq_valid, level, upper,
                                   lower if k1 else 0.0, k1))
        seq_kept = (~(~keep & valid)).all(dim=-1)
        seq_valid_float = seq_valid.float()
        metrics[f"rollout_rs_{option}_masked_fraction"] = masked_mean(1 - keep_float,
                                                                      valid).item()
        metrics[f"rollout_rs_{option}_seq_masked_fraction"] = (
            ((1.0 - seq_kept.to(dtype)) * seq_valid_float).sum() / seq_valid_float.sum()
        ).item()
    metrics["rollout_rs_masked_fraction"] = masked_mean(1 - keep_all, valid).item()
    rejected = ~((keep_all > 0.5) & valid) & valid
    metrics["rollout_rs_seq_masked_fraction"] = rejected.any(dim=-1).float().mean().item()
    return (mask * keep_all).to(mask.dtype), metrics


def _rs_metrics(option: str, stat: Tensor, seq_stat: Tensor | None, valid: Tensor,
                seq_valid: Tensor, level: str, upper: float, lower: float,
                has_lower: bool) -> dict[str, float]:
    """verl 0.9's ``compute_rs_metrics`` for one option (see ``rollout_rejection_mask``):
    ``upper`` / ``lower`` in the statistic's units (logs for k1)."""
    if not valid.any():
        raise ValueError("mask has no valid token")
    prefix = f"rollout_rs_{option}"
    seq_values = masked_mean(stat, valid, dim=-1) if seq_stat is None else seq_stat
    seq_values = seq_values[seq_valid]  # never empty: some token is valid
    if level == "sequence":
        high, low = seq_values > upper, seq_values < lower
        out = {"max": seq_values.max(), "min": seq_values.min(), "fraction_high":
               high.float().mean(), "fraction_low": low.float().mean() if has_lower else 0.0}
    else:
        out = {"max": stat.masked_fill(~valid, float("-inf")).max(),
               "min": stat.masked_fill(~valid, float("inf")).min(),
               "fraction_high": masked_mean((stat > upper).float(), valid),
               "fraction_low": masked_mean((stat < lower).float(), valid)
               if has_lower else 0.0}
    out = {"mean": masked_mean(stat, valid), **out}
    if valid.sum() > 1:
        clamped = stat.clamp(min=lower if has_lower else 0.0, max=upper)
        mean = masked_mean(clamped, valid)
        out["std"] = torch.sqrt(torch.clamp(masked_mean(clamped.square(), valid)
                                            - mean.square(), min=0.0))
    else:
        out["std"] = 0.0
    out.update({
        "seq_mean": seq_values.mean(),
        "seq_std": seq_values.std() if seq_values.numel() > 1 else 0.0,
        "seq_max": seq_values.max(),
        "seq_min": seq_values.min(),
        "seq_max_deviation": (seq_values - 0.0).abs().max(),
        "seq_fraction_high": (seq_values > upper).float().mean(),
    })
    if has_lower:
        out["seq_fraction_low"] = (seq_values < lower).float().mean()
    return {f"{prefix}_{name}": float(value) for name, value in out.items()}


@dataclass(frozen=True)
class RolloutCorrection:
    """What ``algorithm.rollout_correction`` does to one batch: the importance weights that
    scale each token's policy loss (None when ``rollout_is`` is off), the loss mask with
    rejected tokens set to 0 (the response mask itself when ``rollout_rs`` is off), and verl's
    ``rollout_corr/rollout_is_*`` / ``rollout_rs_*`` metrics, prefixed."""

    weights: Tensor | None  # [B, T], detached
    mask: Tensor  # [B, T], the response mask's dtype
    metrics: dict[str, float]

    def weights_of(self, rows: slice) -> Tensor | None:
        return None if self.weights is None else self.weights[rows]


def rollout_correction(train_log_prob: Tensor, rollout_log_prob: Tensor, mask: Tensor,
                       config: RolloutCorrectionConfig) -> RolloutCorrection:
    """Importance weights and rejection mask for a batch, as verl 0.9's
    ``compute_rollout_correction_and_rejection_mask`` computes them from the old
    (``train_log_prob``) and rollout log-probs, without its off-policy metrics (aqn logs those
    every step, in float64: ``aqn.token_math.rollout_mismatch_metrics``)."""
    if not mask.bool().any():
        raise ValueError("mask has no valid token")
    if not train_log_prob.shape == rollout_log_prob.shape == mask.shape:
        raise ValueError(f"shapes differ: train {tuple(train_log_prob.shape)}, rollout "
                         f"{tuple(rollout_log_prob.shape)}, mask {tuple(mask.shape)}")
    metrics: dict[str, float] = {}
    weights = None
    if config.rollout_is is not None:
        weights, metrics = rollout_is_weights(
            train_log_prob, rollout_log_prob, mask, config.rollout_is,
            config.rollout_is_threshold, config.rollout_is_batch_normalize)
    kept = mask.clone()
    if config.rollout_rs is not None:
        kept, rs_metrics = rollout_rejection_mask(train_log_prob, rollout_log_prob, mask,
                                                  config.rollout_rs, config.rollout_rs_threshold)
        metrics.update(rs_metrics)
    return RolloutCorrection(weights, kept, {keys.ROLLOUT_CORR + k: v for k, v in metrics.items()})
