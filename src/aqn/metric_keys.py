"""Metric names that one module writes and another reads, written once (verl's names where
verl has one: ``val-core/<data_source>/acc/mean@<n>``, ``timing_s/<phase>``)."""

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


def val_pass_at(source: str, k: int) -> str:
    return f"val-aux/{source}/acc/pass@{k}"


def val_zero_adv(source: str) -> str:
    return f"val-aux/{source}/zero_adv_frac"


VAL_AUX = "val-aux/"  # prefix of the perturbations' own metrics during validation

# ------------------------------------------------------------------------------ training


def timing(phase: str) -> str:
    return f"timing_s/{phase}"


SCORE_MEAN = "critic/score/mean"
SAMPLED_ACC = "critic/acc/mean"  # accuracy of the sampled completions
ZERO_ADV_FRAC = "actor/zero_adv_frac"
ENTROPY = "actor/entropy"
CLIPFRAC = "actor/pg_clipfrac"
RESPONSE_LENGTH = "response_length/mean"
THROUGHPUT = "perf/throughput"
ABS_LOGP_DIFF = "rollout_corr/abs_logp_diff_mean"
K3_KL = "rollout_corr/k3_kl"
ROLLOUT_KL = "rollout_corr/kl"  # verl's mean(-log r) over tokens
PROBS_DIFF = "training/rollout_probs_diff_mean"

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
