"""Metric names that one module writes and another reads, written once (verl's names where
verl has one: ``val-core/<data_source>/acc/mean@<n>``, ``timing_s/<phase>``).

It imports nothing from aqn, so every layer may name them. A perturbation's own metrics live
under the ``metric_prefix`` its registry entry declares (aqn.perturb)."""

from __future__ import annotations

import re

# ------------------------------------------------------------------------------ validation


def val_core(source: str, what: str, n: int) -> str:
    """``what`` is ``reward`` or ``acc`` (fraction correct) over ``n`` completions per item."""
    return f"val-core/{source}/{what}/mean@{n}"


def val_clean(source: str, what: str, n: int) -> str:
    """The same as ``val_core`` for the final policy validated with no perturbation at all
    (trainer.validate_clean_at_end): what it learned, apart from where it runs."""
    return f"val-clean/{source}/{what}/mean@{n}"


VAL_CORE = re.compile(r"val-core/(?P<source>.+)/(?P<what>reward|acc)/mean@(?P<n>\d+)")
VAL_CLEAN = re.compile(r"val-clean/(?P<source>.+)/(?P<what>reward|acc)/mean@(?P<n>\d+)")


def val_pass_at(source: str, k: int) -> str:
    return f"val-aux/{source}/acc/pass@{k}"


def val_zero_adv(source: str) -> str:
    return f"val-aux/{source}/zero_adv_frac"


VAL_AUX = "val-aux/"  # prefix of the perturbations' own metrics during validation

# ------------------------------------------------------------------------------ training


def timing(phase: str) -> str:
    return f"timing_s/{phase}"


GLOBAL_STEP = "training/global_step"
EPOCH = "training/epoch"
SCORE_MEAN = "critic/score/mean"  # verl calls the reward "score"
SCORE_MAX = "critic/score/max"
SCORE_MIN = "critic/score/min"
SAMPLED_ACC = "critic/acc/mean"  # accuracy of the sampled completions
ADVANTAGES_MEAN = "critic/advantages/mean"
ADVANTAGES_MAX = "critic/advantages/max"
ADVANTAGES_MIN = "critic/advantages/min"
ZERO_ADV_FRAC = "actor/zero_adv_frac"
ENTROPY = "actor/entropy"
CLIPFRAC = "actor/pg_clipfrac"
KL_LOSS = "actor/kl_loss"
GRAD_NORM = "actor/grad_norm"
LR = "actor/lr"
RESPONSE_LENGTH = "response_length/mean"
RESPONSE_LENGTH_MAX = "response_length/max"
RESPONSE_LENGTH_MIN = "response_length/min"
RESPONSE_CLIP_RATIO = "response_length/clip_ratio"  # share that hit max_response_length
PROMPT_LENGTH = "prompt_length/mean"
TOTAL_TOKENS = "perf/total_num_tokens"
THROUGHPUT = "perf/throughput"
STEP_TIME = "timing_s/step"
GEN_TIME = "timing_s/gen"
ABS_LOGP_DIFF = "rollout_corr/abs_logp_diff_mean"  # mean |log r| per token: the mismatch axis
ABS_LOGP_DIFF_MAX = "rollout_corr/abs_logp_diff_max"
K3_KL = "rollout_corr/k3_kl"
ROLLOUT_KL = "rollout_corr/kl"  # verl's mean(-log r) over tokens
PROBS_DIFF = "training/rollout_probs_diff_mean"
# the mismatch probe (aqn.rollout.mismatch: `aqn numerics`, `aqn quant`)
MISMATCH_NUM_TOKENS = "mismatch/num_tokens"
MISMATCH_GEN_S = "mismatch/gen_s"


def firing(name: str, what: str = "") -> str:
    """What perturbation ``name`` touched in a step (aqn.firing): ``perturb/<name>/<what>``;
    ``what`` empty: the prefix of them all."""
    return f"perturb/{name}/{what}"

# AQN (aqn.noise.injector writes them, the report reads them)
AQN_STEP = "aqn/step"
AQN_SIGMA = "aqn/sigma"
AQN_NUM_MODULES = "aqn/num_modules"  # the norms the injector targets, counted on the model
AQN_STAGE = "aqn/stage"
AQN_EFFECTIVE_STD = "aqn/effective_std"
AQN_FRAC_CHANGED = "aqn/frac_changed"
AQN_SWALLOWED = "aqn/swallowed"  # 1.0 when the cast to the weight dtype ate the noise


def aqn_layer(layer: int | None, what: str) -> str:
    """Per-layer AQN metric (with layer_multipliers): ``aqn/layer_3/sigma``; ``aqn/final/...``
    for the norms outside the numbered layers."""
    return f"aqn/{'final' if layer is None else f'layer_{layer}'}/{what}"


AQN_LAYER = re.compile(r"aqn/(?:layer_(?P<layer>\d+)|final)/(?P<what>sigma|effective_std)")

# Rollout correction (verl 0.9's rollout_corr/ prefix: mismatch, importance weights, rejection)
ROLLOUT_CORR = "rollout_corr/"
IS_MEAN = "rollout_corr/rollout_is_mean"  # mean importance weight over valid tokens
RS_MASKED_FRACTION = "rollout_corr/rollout_rs_masked_fraction"  # valid tokens rejected
# sequences (of all in the batch, verl's denominator) with at least one rejected token
RS_SEQ_MASKED_FRACTION = "rollout_corr/rollout_rs_seq_masked_fraction"


def rollout_rs(option: str, what: str) -> str:
    """One rejection option's metric: ``rollout_corr/rollout_rs_seq_mean_k1_masked_fraction``."""
    return f"{ROLLOUT_CORR}rollout_rs_{option}_{what}"
