"""Hand-checked values for the GRPO maths in aqn.rl.core_algos."""

from __future__ import annotations

import math
import statistics
from typing import get_args, get_type_hints

import pytest
import torch

from aqn.config.schema import ActorConfig
from aqn.rl.core_algos import (
    KL_KINDS,
    LOSS_AGG_MODES,
    agg_loss,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    rollout_is_weights,
)
from aqn.token_math import (
    entropy_from_logits,
    log_probs_from_logits,
    masked_mean,
    masked_sum,
    rollout_mismatch_metrics,
)

LN2 = math.log(2.0)
MISMATCH_KEYS = {
    "training/rollout_probs_diff_valid",
    "training/rollout_probs_diff_mean",
    "training/rollout_probs_diff_max",
    "training/rollout_probs_diff_std",
    "training/rollout_actor_probs_pearson_corr",
    *(f"rollout_corr/{k}" for k in (
        "kl", "k3_kl", "training_ppl", "training_log_ppl", "rollout_ppl", "rollout_log_ppl",
        "log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min", "ppl_ratio",
        "chi2_token", "chi2_seq", "abs_logp_diff_mean", "abs_logp_diff_max")),
}


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7
    )


# --- masked helpers ---------------------------------------------------------------------------


def test_masked_helpers_ignore_garbage_and_empty_rows() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 5.0, -1e30]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_sum(values, mask), 3.0)
    close(masked_mean(values, mask), 1.5)
    close(masked_sum(values, mask, dim=-1), [3.0, 0.0])
    close(masked_mean(values, mask, dim=-1), [1.5, 0.0])  # empty row: 0, not nan


# --- advantages --------------------------------------------------------------------------------


def test_grpo_advantages_two_groups_and_singleton() -> None:
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 5.0])
    groups = ["a", "a", "a", "a", "b", "b", "c"]
    adv = grpo_advantages(scores, groups)
    # group a: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    d = 0.5 + 1e-6
    close(adv, [0.25 / d, -0.75 / d, 0.25 / d, 0.25 / d, 0.0, 0.0, 0.0])


def test_grpo_advantages_interleaved_tensor_ids() -> None:
    scores = torch.tensor([2.0, 1.0, 4.0, 2.0, 3.0])
    ids = torch.tensor([7, 3, 7, 3, 3])
    adv = grpo_advantages(scores, ids)
    # group 7: [2, 4], mean 3, std sqrt(2); group 3: [1, 2, 3], mean 2, std 1
    s7 = math.sqrt(2.0) + 1e-6
    close(adv, [-1 / s7, -1 / (1 + 1e-6), 1 / s7, 0.0, 1 / (1 + 1e-6)])


def test_grpo_advantages_without_std_and_errors() -> None:
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0])
    adv = grpo_advantages(scores, [0, 0, 0, 0, 1], norm_by_std=False)
    close(adv, [0.25, -0.75, 0.25, 0.25, 0.0])
    with pytest.raises(ValueError):
        grpo_advantages(scores, [0, 0, 1])
    with pytest.raises(ValueError):
        grpo_advantages(scores.view(1, -1), [0])


# --- loss aggregation --------------------------------------------------------------------------

NAN = float("nan")
LOSS_MAT = torch.tensor(
    [[1.0, 2.0, NAN, 1e9], [4.0, 1e9, 1e9, 1e9], [1e9, NAN, 1e9, 1e9]]
)  # third row has no valid token
LOSS_MASK = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-sum", (3 + 4) / 2),
        ("seq-mean-token-mean", (1.5 + 4) / 2),
        ("token-sum", 1 + 2 + 4),
        # verl >= 0.8: the mean over the 2 sequences with tokens, / padded length T = 4
        ("seq-mean-token-sum-norm", (3 + 4) / 2 / 4),
    ],
)
def test_agg_loss_modes(mode: str, expected: float) -> None:
    close(agg_loss(LOSS_MAT, LOSS_MASK, mode), expected)
    close(agg_loss(LOSS_MAT, LOSS_MASK.bool(), mode), expected)


def test_agg_loss_unknown_mode_names_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        agg_loss(LOSS_MAT, LOSS_MASK, "seq-sum")
    for mode in LOSS_AGG_MODES:
        assert mode in str(info.value)


# --- policy loss -------------------------------------------------------------------------------

# Per valid token: (advantage, ratio, expected loss, grad of the token-mean loss wrt log_prob)
# 1. A=+1, ratio 1.1 inside [0.8, 1.2]:      -A*r = -1.1, grad -A*r/N
# 2. A=+1, ratio 1.5 above 1.2 -> clipped:  -1.2, grad 0
# 3. A=-1, ratio 0.5 below 0.8 -> clipped:  +0.8, grad 0
# 4. A=-1, ratio 5.0 -> dual clip caps 5.0 at -A*3 = 3, grad 0
# 5. A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5, not clipped, grad -A*r/N
CASES = [(1.0, 1.1), (1.0, 1.5), (-1.0, 0.5), (-1.0, 5.0), (1.0, 0.5)]
EXPECTED_LOSSES = [-1.1, -1.2, 0.8, 3.0, -0.5]
N_VALID = len(CASES)


def make_policy_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence of 5 valid tokens and one garbage masked token."""
    adv = torch.tensor([[a for a, _ in CASES] + [100.0]], dtype=torch.float64)
    old = torch.full((1, N_VALID + 1), -1.0, dtype=torch.float64)
    log_ratios = [math.log(r) for _, r in CASES] + [50.0]
    log_prob = (old + torch.tensor([log_ratios], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1] * N_VALID + [0]])
    return old.requires_grad_(), log_prob, adv.requires_grad_(), mask


def test_policy_loss_values_and_metrics() -> None:
    old, log_prob, adv, mask = make_policy_inputs()
    out = policy_loss(old, log_prob, adv, mask)
    close(out["pg_loss"], sum(EXPECTED_LOSSES) / N_VALID)  # = 0.2
    close(out["pg_clipfrac"], 2 / N_VALID)  # tokens 2 and 3
    close(out["pg_clipfrac_lower"], 1 / N_VALID)  # token 4
    close(out["ppo_kl"], -sum(math.log(r) for _, r in CASES) / N_VALID)
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        assert out[key].dim() == 0 and not out[key].requires_grad


def test_policy_loss_gradient_only_to_log_prob() -> None:
    old, log_prob, adv, mask = make_policy_inputs()
    policy_loss(old, log_prob, adv, mask)["pg_loss"].backward()
    expected = [-1.1 / N_VALID, 0.0, 0.0, 0.0, -0.5 / N_VALID, 0.0]
    close(log_prob.grad, [expected])
    assert old.grad is None and adv.grad is None


def test_policy_loss_asymmetric_clip_and_per_sequence_advantage() -> None:
    old = torch.zeros(2, 2, dtype=torch.float64)
    log_prob = torch.log(torch.tensor([[1.25, 1.0], [1.25, 0.9]], dtype=torch.float64))
    mask = torch.ones(2, 2)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)  # [B], broadcast over tokens
    # high 0.2: token (0,0) clipped at 1.2; row 1 (A=-2): max(2r, 2 clamp(r)) = [2.5, 1.8]
    out = policy_loss(old, log_prob, adv, mask)
    close(out["pg_loss"], (-1.2 - 1.0 + 2.5 + 1.8) / 4)
    close(out["pg_clipfrac"], 1 / 4)
    # DAPO's clip-higher 0.28: 1.25 is inside the range now
    out = policy_loss(old, log_prob, adv, mask, clip_ratio_high=0.28)
    close(out["pg_loss"], (-1.25 - 1.0 + 2.5 + 1.8) / 4)
    close(out["pg_clipfrac"], 0.0)
    same = policy_loss(old, log_prob, adv.unsqueeze(-1).expand(2, 2), mask, clip_ratio_high=0.28)
    close(same["pg_loss"], float(out["pg_loss"]))


def test_policy_loss_is_weights_and_agg_mode() -> None:
    old, log_prob, adv, mask = make_policy_inputs()
    weights = torch.tensor([[2.0, 1.0, 0.5, 0.0, 1.5, 7.0]], dtype=torch.float64)
    weights.requires_grad_()
    out = policy_loss(old, log_prob, adv, mask, is_weights=weights)
    close(out["pg_loss"], (2.0 * -1.1 + 1.0 * -1.2 + 0.5 * 0.8 + 0.0 * 3.0 + 1.5 * -0.5) / N_VALID)
    out["pg_loss"].backward()
    assert weights.grad is None
    out = policy_loss(old, log_prob, adv, mask, loss_agg_mode="seq-mean-token-sum-norm")
    close(out["pg_loss"], sum(EXPECTED_LOSSES) / (N_VALID + 1))


def test_policy_loss_rejects_bad_dual_clip() -> None:
    old, log_prob, adv, mask = make_policy_inputs()
    with pytest.raises(ValueError):
        policy_loss(old, log_prob, adv, mask, clip_ratio_c=1.0)


# --- KL penalty --------------------------------------------------------------------------------


def test_kl_penalty_kinds() -> None:
    logp = torch.tensor([-1.0, -2.0, -30.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -15.0], dtype=torch.float64)
    close(kl_penalty(logp, ref, "kl"), [0.5, -1.0, -15.0])
    close(kl_penalty(logp, ref, "abs"), [0.5, 1.0, 15.0])
    close(kl_penalty(logp, ref, "mse"), [0.125, 0.5, 112.5])
    # k3 with x = ref - logp: exp(x) - x - 1; x = 15 gives 3.3e6, clamped to 10
    close(
        kl_penalty(logp, ref, "low_var_kl"),
        [math.exp(-0.5) + 0.5 - 1.0, math.exp(1.0) - 2.0, 10.0],
    )
    close(kl_penalty(ref, ref, "low_var_kl"), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(logp, ref, "k4")


# --- logits ------------------------------------------------------------------------------------


def test_entropy_from_logits() -> None:
    vocab = 7
    close(entropy_from_logits(torch.zeros(2, 3, vocab)), torch.full((2, 3), math.log(vocab)))
    probs = torch.tensor([0.5, 0.25, 0.25])
    close(entropy_from_logits(probs.log()), 1.5 * LN2)  # -sum p ln p
    # large logits (exact in float32): same entropy as [0, -1, -1], no overflow or cancellation
    p = [1 / (1 + 2 * math.exp(-1)), math.exp(-1) / (1 + 2 * math.exp(-1))]
    expected = -(p[0] * math.log(p[0]) + 2 * p[1] * math.log(p[1]))
    close(entropy_from_logits(torch.tensor([1e4, 1e4 - 1, 1e4 - 1])), expected)
    out = entropy_from_logits(torch.zeros(4, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


def test_log_probs_from_logits_matches_log_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=gen) * 5
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(log_probs_from_logits(logits, labels), expected)
    bf16 = logits.bfloat16()
    expected_bf16 = torch.log_softmax(bf16.float(), -1).gather(-1, labels.unsqueeze(-1))
    got = log_probs_from_logits(bf16, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected_bf16.squeeze(-1))


# --- rollout mismatch metrics ------------------------------------------------------------------


def test_mismatch_metrics_identical_inputs_are_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 9, generator=gen) * 3
    mask = torch.ones(4, 9)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    logp[mask == 0] = 1e4  # garbage in padding
    m = rollout_mismatch_metrics(logp, logp.clone(), mask)
    assert set(m) == MISMATCH_KEYS
    assert all(isinstance(value, float) for value in m.values())
    # every difference is exactly 0, every ratio exactly 1
    for key in ("kl", "k3_kl", "log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max",
                "log_ppl_diff_min", "chi2_token", "chi2_seq", "abs_logp_diff_mean",
                "abs_logp_diff_max"):
        assert m[f"rollout_corr/{key}"] == 0.0, key
    for key in ("mean", "max", "std"):
        assert m[f"training/rollout_probs_diff_{key}"] == 0.0, key
    assert m["rollout_corr/ppl_ratio"] == 1.0
    assert m["rollout_corr/training_ppl"] == m["rollout_corr/rollout_ppl"] > 1.0
    # torch.corrcoef (verl's) of two equal vectors: 1 up to rounding
    assert m["training/rollout_actor_probs_pearson_corr"] == pytest.approx(1.0, abs=1e-14)


def small_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities: train [[0.5, 0.25], [0.8]], rollout [[0.25, 0.25], [0.4]]."""
    train = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.2]]))
    rollout = torch.log(torch.tensor([[0.25, 0.25, 0.01], [0.4, 0.7, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    return train, rollout, mask


def test_mismatch_metrics_small_known_pair() -> None:
    train, rollout, mask = small_pair()
    m = rollout_mismatch_metrics(train, rollout, mask)
    diffs = [0.25, 0.0, 0.4]
    # token log r = [ln 2, 0, ln 2], r = [2, 1, 2]
    # log_ppl_train - log_ppl_rollout per sequence: [1.5 ln2 - 2 ln2, -ln 0.8 + ln 0.4]
    seq_diffs = [-0.5 * LN2, -LN2]
    expected = {
        "training/rollout_probs_diff_mean": statistics.fmean(diffs),
        "training/rollout_probs_diff_max": 0.4,
        "training/rollout_probs_diff_std": statistics.stdev(diffs),
        "training/rollout_actor_probs_pearson_corr": statistics.correlation(
            [0.5, 0.25, 0.8], [0.25, 0.25, 0.4]
        ),
        "rollout_corr/kl": -2 * LN2 / 3,
        "rollout_corr/k3_kl": 2 * (2 - LN2 - 1) / 3,
        "rollout_corr/log_ppl_diff": statistics.fmean(seq_diffs),
        "rollout_corr/log_ppl_diff_max": -0.5 * LN2,
        "rollout_corr/log_ppl_diff_min": -LN2,
        "rollout_corr/log_ppl_abs_diff": 0.75 * LN2,
        "rollout_corr/ppl_ratio": statistics.fmean(math.exp(d) for d in seq_diffs),
        "rollout_corr/training_ppl": statistics.fmean([math.sqrt(8), 1.25]),
        "rollout_corr/rollout_ppl": statistics.fmean([4.0, 2.5]),
        "rollout_corr/chi2_token": (4 + 1 + 4) / 3 - 1,
        # sequence ratios 2 and 2
        "rollout_corr/chi2_seq": 4 - 1,
        "rollout_corr/abs_logp_diff_mean": 2 * LN2 / 3,
        "rollout_corr/abs_logp_diff_max": LN2,
    }
    assert set(m) == MISMATCH_KEYS
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_mismatch_metrics_ignore_masked_positions() -> None:
    train, rollout, mask = small_pair()
    reference = rollout_mismatch_metrics(train, rollout, mask)
    garbage_train, garbage_rollout = train.clone(), rollout.clone()
    garbage_train[mask == 0] = torch.tensor([1e6, float("nan"), -float("inf")])
    garbage_rollout[mask == 0] = torch.tensor([-1e6, 3.0, float("inf")])
    assert rollout_mismatch_metrics(garbage_train, garbage_rollout, mask.bool()) == reference


def test_mismatch_metrics_degenerate_and_all_masked_rows() -> None:
    one = torch.log(torch.tensor([[0.5, 0.3]]))
    other = torch.log(torch.tensor([[0.4, 0.3]]))
    single = torch.tensor([[1, 0]])
    m = rollout_mismatch_metrics(one, other, single)  # one token: undefined, as in verl
    assert math.isnan(m["training/rollout_actor_probs_pearson_corr"])
    assert math.isnan(m["training/rollout_probs_diff_std"])
    with pytest.raises(ValueError):
        rollout_mismatch_metrics(one, other, torch.zeros(1, 2))
    # an all-masked row counts as log_ppl 0 on both sides (verl): diff 0, ratio 1
    two = torch.cat([one, one]), torch.cat([other, other])
    m = rollout_mismatch_metrics(*two, torch.tensor([[1, 1], [0, 0]]))
    diff = math.log(0.4 * 0.3) / 2 - math.log(0.5 * 0.3) / 2
    assert m["rollout_corr/log_ppl_abs_diff"] == pytest.approx(abs(diff) / 2)
    assert m["rollout_corr/ppl_ratio"] == pytest.approx((math.exp(diff) + 1) / 2)


def test_k3_kl_is_not_clamped() -> None:
    m = rollout_mismatch_metrics(torch.tensor([[-0.01]]), torch.tensor([[-45.0]]), torch.ones(1, 1))
    assert m["rollout_corr/k3_kl"] == pytest.approx(math.exp(44.99) - 44.99 - 1)


# --- truncated importance sampling -------------------------------------------------------------


def test_is_weights_token_level() -> None:
    train = torch.log(torch.tensor([[3.0, 0.5, 1.5, 0.2]], dtype=torch.float64))
    train.requires_grad_()
    rollout = torch.tensor([[0.0, 0.0, 0.0, -50.0]], dtype=torch.float64)  # r = train probs
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, m = rollout_is_weights(train, rollout, mask, level="token", threshold=2.0)
    close(weights, [[2.0, 0.5, 1.5, 0.0]])
    assert not weights.requires_grad
    # verl >= 0.8 logs the truncated weights [2, 0.5, 1.5]
    assert m["rollout_is_mean"] == pytest.approx(4.0 / 3)
    assert m["rollout_is_max"] == 2.0 and m["rollout_is_min"] == 0.5
    assert m["rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)
    assert m["rollout_is_ratio_fraction_low"] == 0.0  # 0.5 is not below 1 / 2
    assert m["rollout_is_std"] == pytest.approx(math.sqrt(6.5 / 3 - 16 / 9))
    # (sum w)^2 / (N sum w^2) = 16 / (3 * 6.5)
    assert m["rollout_is_eff_sample_size"] == pytest.approx(16 / 19.5)
    assert m["rollout_is_seq_mean"] == pytest.approx(4.0 / 3)


def test_is_weights_sequence_level_product() -> None:
    ratios = torch.tensor([[1.2, 1.5, 9.0], [2.0, 1.5, 0.1], [7.0, 7.0, 7.0]], dtype=torch.float64)
    train, rollout = ratios.log(), torch.zeros(3, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])  # last row has no valid token
    weights, m = rollout_is_weights(train, rollout, mask, level="sequence", threshold=2.0)
    # products over valid tokens: 1.2 * 1.5 = 1.8, 2.0 * 1.5 = 3.0 -> truncated to 2
    close(weights, [[1.8, 1.8, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # verl: the mean and ESS weigh each sequence by its tokens; max and min are of the
    # untruncated ratio and count the all-masked row as ratio 1; fractions are over rows
    assert m["rollout_is_mean"] == pytest.approx((2 * 1.8 + 2 * 2.0) / 4)
    assert m["rollout_is_max"] == pytest.approx(3.0)
    assert m["rollout_is_min"] == pytest.approx(1.0)
    assert m["rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)
    mean, mean_sq = 1.9, (2 * 1.8**2 + 2 * 2.0**2) / 4
    assert m["rollout_is_eff_sample_size"] == pytest.approx(mean**2 / mean_sq)


def test_is_weights_sequence_clamp_equal_weights_and_errors() -> None:
    train = torch.full((1, 3), 10.0, dtype=torch.float64)  # sum of log r = 30 -> clamped at 20
    rollout = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3)
    weights, m = rollout_is_weights(train, rollout, mask, level="sequence")
    assert m["rollout_is_max"] == pytest.approx(math.exp(20.0))
    close(weights, [[2.0, 2.0, 2.0]])
    logp = -torch.rand(3, 4, dtype=torch.float64)
    weights, m = rollout_is_weights(logp, logp, torch.ones(3, 4))
    close(weights, torch.ones(3, 4))
    assert m["rollout_is_eff_sample_size"] == pytest.approx(1.0, abs=1e-7)  # verl's mean + 1e-8
    with pytest.raises(ValueError, match="sequence"):
        rollout_is_weights(logp, logp, torch.ones(3, 4), level="geometric")
    with pytest.raises(ValueError):
        rollout_is_weights(logp, logp, torch.zeros(3, 4))


def test_config_choices_are_the_implemented_ones() -> None:
    hints = get_type_hints(ActorConfig)
    assert get_args(hints["loss_agg_mode"]) == LOSS_AGG_MODES
    assert set(get_args(hints["kl_loss_type"])) == set(KL_KINDS)
