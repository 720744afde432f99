"""Differential tests: aqn against the peers' own code, on random and adversarial inputs.

Where aqn uses verl's names it must compute what verl 0.9.1 computes, and where it claims
to fake-quantize as torchao 0.18 it must give torchao's bits. Both come from PyPI in the
``peers`` extra (``make setup-peers``; verl ``--no-deps`` plus the modules its import chain
needs). Equality is on bits (integer views; nan equals nan), never ``torch.equal``, which
cannot see the sign of a zero. Without the extra these tests skip, unless
``AQN_REQUIRE_PEERS=1`` (``make test`` sets it), where a missing peer fails them.

Deviations that remain, each on purpose (docs/reference.md#where-aqn-differs-from-verl):
a group of one gets advantage 0 (verl: the raw score); masked positions never reach a
result even when they hold inf or nan (verl multiplies by the mask: nan). The tests below
check those too, so a change on either side shows.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aqn.config.rollout_correction import RS_OPTIONS
from aqn.quant import FORMATS, fake_quantize
from aqn.rewards import gsm8k as aqn_gsm8k
from aqn.rl import core_algos as aqn_algos
from aqn.token_math import rollout_mismatch_metrics
from conftest import peer

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"




@pytest.fixture(scope="module")
def verl_algos():
    return peer("verl.trainer.ppo.core_algos")


@pytest.fixture(scope="module")
def verl_corr():
    return peer("verl.trainer.ppo.rollout_corr_helper")


# ------------------------------------------------------------------------------- equality

def bits(x) -> tuple:
    """The exact bits of a tensor or a float, nan folded to one value."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.is_floating_point():
            nan = torch.isnan(x)
            ints = x.masked_fill(nan, 0).view({8: torch.int64, 4: torch.int32,
                                               2: torch.int16}[x.element_size()])
            return (str(x.dtype), tuple(x.shape), ints.tolist(), nan.tolist())
        return (str(x.dtype), tuple(x.shape), x.tolist())
    x = float(x)
    return ("nan",) if math.isnan(x) else (struct.pack("<d", x),)


def assert_same_bits(ours, theirs, what: str) -> None:
    assert bits(ours) == bits(theirs), f"{what}: aqn {ours!r} vs peer {theirs!r}"


# ------------------------------------------------------------------------------- inputs

def log_prob_cases(dtype=torch.float64) -> list[tuple[str, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]]:
    """(name, train, rollout, mask) pairs: random, extreme and degenerate, masks as int64
    (verl's response_mask is the attention mask's int slice) or float32."""
    gen = torch.Generator().manual_seed(0)
    cases = []

    def add(name, train, rollout, mask):
        cases.append((name, train.to(dtype), rollout.to(dtype), mask))

    for i in range(24):
        b, t = 1 + i % 5, 1 + (3 * i) % 11
        train = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 4
        rollout = train + torch.randn(b, t, generator=gen, dtype=torch.float64) * 10 ** (-i % 4)
        mask = (torch.rand(b, t, generator=gen) < 0.8).long()
        mask[0, 0] = 1  # at least one valid token
        if i % 3 == 0:
            mask[-1] = 0 if b > 1 else mask[-1]  # an all-masked row
        if i % 2:
            mask = mask.float()
        add(f"random{i}", train, rollout, mask)
    base = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    right_pad = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [0] * 6])
    add("identical", base, base.clone(), right_pad)
    add("tiny mismatch", base, base + 1e-12, right_pad)
    add("extreme ratios", base, base - torch.tensor([50.0, -50.0, 300.0, -700.0, 0.0, 5.0]),
        right_pad)
    add("k3 overflow", base, base - 750.0, right_pad)
    add("single valid token", base, base + 0.3, torch.zeros(4, 6, dtype=torch.long)
        .index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(1)))
    add("negative zeros and subnormals", torch.full((2, 3), -0.0),
        torch.tensor([[0.0, -5e-324, -1e-310], [-0.0, -0.0, -2.5e-308]]), torch.ones(2, 3))
    garbage = base.clone()
    garbage[right_pad == 0] = 1e6  # finite garbage in padding
    add("masked finite garbage", garbage, base, right_pad)
    return cases


@pytest.fixture(scope="module")
def verl_actor_config():
    config = peer("verl.workers.config")

    def make(clip_low=0.2, clip_high=0.28, clip_c=3.0):
        return config.ActorConfig(strategy="fsdp", rollout_n=4, clip_ratio=0.2,
                                  clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                                  clip_ratio_c=clip_c, ppo_micro_batch_size_per_gpu=1)
    return make


# ------------------------------------------------------------------------------- GRPO maths

def test_grpo_advantages_equal_verl(verl_algos):
    gen = torch.Generator().manual_seed(1)
    cases = 0
    for i in range(40):
        n, groups = 2 + i % 7, 1 + i % 5
        scores = torch.randint(0, 3, (n * groups,), generator=gen).float()
        if i % 4 == 1:
            scores = torch.randn(n * groups, generator=gen) * 10 ** (i % 5 - 2)
        if i % 4 == 2:
            scores[:n] = 1.0  # a group with one score: zero advantage
        index = np.repeat(np.arange(groups), n)
        rewards = torch.zeros(n * groups, 3)
        rewards[:, -1] = scores
        for norm in (True, False):
            theirs, _ = verl_algos.compute_grpo_outcome_advantage(
                rewards, torch.ones(n * groups, 3), index, norm_adv_by_std_in_grpo=norm)
            ours = aqn_algos.grpo_advantages(scores, index.tolist(), norm)
            assert_same_bits(ours, theirs[:, 0], f"case {i} norm {norm}")
            cases += 1
    assert cases == 80
    # the documented deviation: a group of one (verl: mean 0, std 1, i.e. the raw score)
    theirs, _ = verl_algos.compute_grpo_outcome_advantage(
        torch.tensor([[0.0, 0.7]]), torch.ones(1, 2), np.array([0]))
    assert aqn_algos.grpo_advantages(torch.tensor([0.7]), [0]).item() == 0.0
    assert theirs[0, 0].item() == pytest.approx(0.7 / (1 + 1e-6))


@pytest.mark.parametrize("mode", aqn_algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agg_loss_equals_verl(verl_algos, mode, dtype):
    for name, loss, _, mask in log_prob_cases(dtype):
        assert_same_bits(aqn_algos.agg_loss(loss, mask, mode),
                         verl_algos.agg_loss(loss, mask, mode), f"{mode} on {name}")
    # the example: verl >= 0.8 divides Dr. GRPO's sum by the sequences too
    ones = torch.ones(2, 4)
    if mode == "seq-mean-token-sum-norm":
        assert aqn_algos.agg_loss(ones, ones, mode).item() == 1.0


def test_masked_inf_stays_out_of_aqn_but_not_verl(verl_algos):
    loss = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert aqn_algos.agg_loss(loss, mask, "seq-mean-token-sum").item() == 1.5
    assert math.isnan(verl_algos.agg_loss(loss, mask, "seq-mean-token-sum").item())


@pytest.mark.parametrize("mode", aqn_algos.LOSS_AGG_MODES)
def test_policy_loss_and_gradient_equal_verl(verl_algos, verl_actor_config, mode):
    gen = torch.Generator().manual_seed(2)
    cases = 0
    for name, old, new, mask in log_prob_cases(torch.float32):
        adv = torch.randn(old.shape[0], 1, generator=gen).expand_as(old) * 2
        for clip in ((0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.1, 0.5, 1.5)):
            for is_weights in (None, torch.rand(old.shape, generator=gen) * 2):
                ours_lp = new.clone().requires_grad_()
                theirs_lp = new.clone().requires_grad_()
                ours = aqn_algos.policy_loss(old, ours_lp, adv, mask, *clip, mode,
                                             is_weights=is_weights)
                theirs, metrics = verl_algos.compute_policy_loss_vanilla(
                    old, theirs_lp, adv, mask, mode, verl_actor_config(*clip),
                    rollout_is_weights=is_weights)
                what = f"{mode} {clip} on {name}"
                assert_same_bits(ours["pg_loss"], theirs, what)
                for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
                    assert_same_bits(ours[key].item(), metrics[f"actor/{key}"], f"{key} {what}")
                ours["pg_loss"].backward()
                theirs.backward()
                assert_same_bits(ours_lp.grad, theirs_lp.grad, f"gradient {what}")
                cases += 1
    assert cases == len(log_prob_cases()) * 6


@pytest.mark.parametrize("kind", aqn_algos.KL_KINDS)
def test_kl_penalty_value_and_gradient_equal_verl(verl_algos, kind):
    for name, logp, ref, _ in log_prob_cases(torch.float32):
        ours_lp, theirs_lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        ours = aqn_algos.kl_penalty(ours_lp, ref, kind)
        theirs = verl_algos.kl_penalty(theirs_lp, ref, kind)
        assert_same_bits(ours, theirs, f"{kind} on {name}")
        ours.sum().backward()
        theirs.sum().backward()
        assert_same_bits(ours_lp.grad, theirs_lp.grad, f"{kind} gradient on {name}")


# ------------------------------------------------------------------------------- mismatch

@pytest.mark.parametrize("level", aqn_algos.IS_LEVELS)
@pytest.mark.parametrize("threshold, batch_normalize", [  # TIS, IcePop ("lower_upper")
    (2.0, False), (1.5, False), (10.0, False), ("0.5_5.0", False), (2.0, True),
    ("0.8_1.25", True)])
def test_truncated_is_weights_and_metrics_equal_verl(verl_corr, level, threshold,
                                                     batch_normalize):
    for name, train, rollout, mask in rs_cases(torch.float64):
        ours_w, ours_m = aqn_algos.rollout_is_weights(train, rollout, mask, level, threshold,
                                                      batch_normalize)
        what = f"{level} C={threshold} batch_normalize={batch_normalize} on {name}"
        try:
            theirs_w, theirs_m = verl_corr.compute_rollout_correction_weights(
                train - rollout, mask, level, threshold, batch_normalize)
        except ZeroDivisionError:  # the documented deviation: IcePop zeroed every weight
            assert isinstance(threshold, str), what
            assert (ours_w == 0).all() and ours_m["rollout_is_eff_sample_size"] == 0.0, what
            assert ours_m["rollout_is_mean"] == 0.0, what
            continue
        assert_same_bits(ours_w, theirs_w, what)
        assert set(ours_m) == set(theirs_m), what
        for key, value in theirs_m.items():
            assert_same_bits(ours_m[key], value, f"{key} {what}")


def verl_mismatch(train, rollout, mask) -> dict[str, float]:
    corr = peer("verl.trainer.ppo.rollout_corr_helper")
    debug = peer("verl.utils.debug.metrics")
    from verl.protocol import DataProto

    batch = DataProto.from_dict(tensors={
        "rollout_log_probs": rollout, "old_log_probs": train, "response_mask": mask,
        "responses": torch.zeros(mask.shape, dtype=torch.long)})
    metrics = debug.calculate_debug_metrics(batch)
    metrics.update(corr.compute_rollout_corr_metrics_from_logprobs(train, rollout, mask))
    return metrics


def test_mismatch_metrics_equal_verl(verl_corr):
    checked = 0
    for name, train, rollout, mask in log_prob_cases():
        ours = rollout_mismatch_metrics(train, rollout, mask)
        theirs = verl_mismatch(train, rollout, mask)
        assert set(theirs) <= set(ours), set(theirs) - set(ours)
        for key, value in theirs.items():
            assert_same_bits(ours[key], value, f"{key} on {name}")
            checked += 1
    assert checked == len(log_prob_cases()) * 18
    # the example: k3_kl is not clamped (verl: 3.46e19)
    k3 = rollout_mismatch_metrics(torch.tensor([[-0.01]]), torch.tensor([[-45.0]]),
                                  torch.ones(1, 1))["rollout_corr/k3_kl"]
    assert k3 == pytest.approx(3.46e19, rel=0.01)


# ------------------------------------------------------------------------------- rollout correction

# Thresholds per statistic (the first also in float32). In the "at the thresholds" case
# k1 "0.5_2.0" meets log r = +-log 2, "1.0_1.0" log r = 0 and k2 0.125 log r = +-0.5 exactly.
RS_THRESHOLDS = {"k1": ("0.5_2.0", "1.0_1.0", 1.05), "k2": (0.125, 0.005),
                 "k3": (0.01, 0.5)}
RS_CHAINS = (
    ("token_k1,seq_mean_k3", "0.97_1.03,0.01"),  # a threshold per option
    ("seq_sum_k2,seq_max_k3,token_k3", 0.5),  # one shared by all
    (" seq_mean_k1, token_k2 ,seq_mean_k1", "0.9_1.1,0.02"),  # spaces, a duplicate dropped
    (",".join(RS_OPTIONS), 1.25),  # every option; k1 reads 1.25 as 0.8_1.25
)


def boundary_case(dtype) -> tuple:
    log2 = math.log(2.0)
    train = torch.tensor([[-log2, log2, 0.5, -0.5, 0.0], [log2, 0.0, -0.0, 0.0, 0.0]],
                         dtype=torch.float64)
    return ("at the thresholds", train.to(dtype), torch.zeros(2, 5, dtype=dtype),
            torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]))


@functools.cache
def real_log_prob_cases() -> tuple:
    """Log-probs of 16 response tokens under the tiny model (the training copy) and under a
    rollout copy of it in bf16, or with noisy weights: a real model's mismatch."""
    from aqn.models import build_tiny
    from aqn.token_math import log_probs_from_logits

    model, _ = build_tiny(seed=0)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 30, (6, 24), generator=gen)
    mask = (torch.arange(16) < torch.tensor([16, 11, 7, 3, 16, 1])[:, None]).long()

    def log_probs(m):
        with torch.no_grad():
            return log_probs_from_logits(m(ids).logits[:, 7:23], ids[:, 8:24])

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.abs().mean())
    train = log_probs(model)
    return (("real bf16 rollout", train, log_probs(copy.deepcopy(model).bfloat16()), mask),
            ("real noisy rollout", train, log_probs(noisy), mask))


def small_mismatch_cases(dtype) -> list[tuple]:
    """Random log-probs with the mismatch a rollout engine makes (log r ~ N(0, 0.01..0.3)),
    where the thresholds reject some tokens and keep others (log_prob_cases' random ones
    have sigma 1 to 1000)."""
    gen = torch.Generator().manual_seed(11)
    cases = []
    for i in range(8):
        b, t = 2 + i % 4, 3 + (5 * i) % 13
        train = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
        rollout = train + torch.randn(b, t, generator=gen, dtype=torch.float64) * (
            0.3, 0.1, 0.03, 0.01)[i % 4]
        mask = (torch.rand(b, t, generator=gen) < 0.85).long()
        mask[0, 0] = 1
        if i % 3 == 1:
            mask[-1] = 0  # an all-masked row
        cases.append((f"small mismatch {i}", train.to(dtype), rollout.to(dtype),
                      mask.float() if i % 2 else mask))
    return cases


def rs_cases(dtype) -> list[tuple]:
    """The IS tests' cases, small mismatches, one at the thresholds, and the real ones."""
    return [*log_prob_cases(dtype), *small_mismatch_cases(dtype), boundary_case(dtype),
            *((n, t.to(dtype), r.to(dtype), m) for n, t, r, m in real_log_prob_cases())]


def compare_rejection(verl_corr, rollout_rs, threshold, cases) -> tuple[int, int, int]:
    """Mask and every metric of aqn's rollout_rejection_mask against verl's
    compute_rollout_rejection_mask: (cases, values compared, cases that reject some valid
    tokens and keep others)."""
    values = partial = 0
    for name, train, rollout, mask in cases:
        what = f"{rollout_rs!r} {threshold!r} on {name} ({train.dtype})"
        ours_mask, ours = aqn_algos.rollout_rejection_mask(train, rollout, mask, rollout_rs,
                                                           threshold)
        theirs_mask, theirs = verl_corr.compute_rollout_rejection_mask(
            train - rollout, mask, rollout_rs, threshold)
        assert_same_bits(ours_mask, theirs_mask, f"mask {what}")
        assert set(ours) == set(theirs), what
        for key, value in theirs.items():
            assert_same_bits(ours[key], value, f"{key} {what}")
        values += mask.numel() + len(theirs)
        partial += 0 < theirs["rollout_rs_masked_fraction"] < 1
    return len(cases), values, partial


@pytest.mark.parametrize("option", RS_OPTIONS)
def test_rejection_mask_and_metrics_equal_verl(verl_corr, option):
    thresholds = RS_THRESHOLDS[option[-2:]]
    cases = partial = 0
    for dtype in (torch.float64, torch.float32):
        for threshold in thresholds if dtype == torch.float64 else thresholds[:1]:
            n, _, p = compare_rejection(verl_corr, option, threshold, rs_cases(dtype))
            cases, partial = cases + n, partial + p
    assert cases == len(rs_cases(torch.float64)) * (len(thresholds) + 1)
    assert partial >= 3, "the thresholds must reject some tokens and keep others"


@pytest.mark.parametrize("chain, threshold", RS_CHAINS)
def test_chained_rejection_equals_verl(verl_corr, chain, threshold):
    n, _, partial = compare_rejection(verl_corr, chain, threshold, rs_cases(torch.float64))
    assert n == len(rs_cases(torch.float64)) and partial >= 2


IS_SETTINGS = (None, ("token", 2.0, False), ("sequence", 2.0, False),
               ("token", "0.5_5.0", False), ("sequence", "0.5_5.0", False),
               ("token", 1.5, True), ("sequence", 10.0, True), ("token", "0.8_1.25", True),
               ("sequence", "0.1_10.0", True))
RS_SETTINGS = (None, ("seq_mean_k1", "0.999_1.001"), ("token_k1,seq_max_k3", "0.5_2.0,0.5"))


def correction_kwargs(is_setting, rs_setting) -> dict:
    kwargs = {}
    if is_setting:
        kwargs |= dict(zip(("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize"),
                           is_setting, strict=True))
    if rs_setting:
        kwargs |= dict(zip(("rollout_rs", "rollout_rs_threshold"), rs_setting, strict=True))
    return kwargs


# each IS setting with one RS setting in turn, and each RS setting alone
CORRECTION_SETTINGS = [(s, RS_SETTINGS[i % 3]) for i, s in enumerate(IS_SETTINGS[1:])] + [
    (None, rs) for rs in RS_SETTINGS[1:]]


@pytest.mark.parametrize("is_setting, rs_setting", CORRECTION_SETTINGS)
def test_rollout_correction_equals_verl(verl_corr, is_setting, rs_setting):
    """aqn's rollout_correction (what the trainer calls) against verl's
    compute_rollout_correction_and_rejection_mask: weights, mask and every rollout_is_* /
    rollout_rs_* metric; verl's off-policy metrics are aqn's rollout_mismatch_metrics,
    compared in test_mismatch_metrics_equal_verl."""
    from aqn.config.rollout_correction import RolloutCorrectionConfig

    kwargs = correction_kwargs(is_setting, rs_setting)
    config = RolloutCorrectionConfig(**kwargs)
    for name, train, rollout, mask in rs_cases(torch.float64):
        what = f"{kwargs} on {name}"
        ours = aqn_algos.rollout_correction(train, rollout, mask, config)
        try:
            weights, theirs_mask, theirs = \
                verl_corr.compute_rollout_correction_and_rejection_mask(
                    train, rollout, mask, **kwargs)
        except ZeroDivisionError:  # the documented deviation: IcePop zeroed every weight
            assert isinstance(config.rollout_is_threshold, str), what
            assert (ours.weights == 0).all(), what
            assert ours.metrics["rollout_corr/rollout_is_eff_sample_size"] == 0.0, what
            continue
        offpolicy = {f"rollout_corr/{k}"
                     for k in verl_corr.compute_offpolicy_metrics(train, rollout, mask)}
        theirs = {k: v for k, v in theirs.items() if k not in offpolicy}
        assert set(ours.metrics) == set(theirs), what
        for key, value in theirs.items():
            assert_same_bits(ours.metrics[key], value, f"{key} {what}")
        assert_same_bits(ours.mask, theirs_mask, f"mask {what}")
        if weights is None:
            assert ours.weights is None, what
        else:
            assert_same_bits(ours.weights, weights.batch["rollout_is_weights"], what)


def test_masked_garbage_in_rollout_correction(verl_corr):
    """The documented deviation, where it shows: nan or inf in masked positions gives verl
    nan TIS weights there (it multiplies by the mask) and aqn 0; IcePop, batch normalization,
    rejection and every metric agree."""
    gen = torch.Generator().manual_seed(7)
    train = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    rollout = train + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    train[0, 3], train[0, 4], train[2] = float("nan"), float("inf"), float("-inf")
    for level in aqn_algos.IS_LEVELS:
        for threshold, normalize in ((2.0, False), (2.0, True), ("0.5_5.0", False)):
            ours_w, ours_m = aqn_algos.rollout_is_weights(train, rollout, mask, level,
                                                          threshold, normalize)
            theirs_w, theirs_m = verl_corr.compute_rollout_correction_weights(
                train - rollout, mask, level, threshold, normalize)
            assert set(ours_m) == set(theirs_m)
            for key, value in theirs_m.items():
                assert_same_bits(ours_m[key], value, f"{key} {level} {threshold}")
            valid = mask.bool()
            assert_same_bits(ours_w[valid], theirs_w[valid], f"{level} {threshold}")
            assert (ours_w[~valid] == 0).all()
            if level == "token" and threshold == 2.0:
                assert theirs_w[~valid].isnan().any()  # nan * 0 in verl
            else:
                assert_same_bits(ours_w, theirs_w, f"{level} {threshold} {normalize}")
    for option in RS_OPTIONS:
        threshold = "0.5_2.0" if option.endswith("k1") else 0.3
        compare_rejection(verl_corr, option, threshold, [("garbage", train, rollout, mask)])


RS_SPECS = (  # (options, rollout_rs_threshold): verl's parser accepts or refuses each
    (["token_k1"], "0.5_2.0"), (["token_k1"], 2.0), (["token_k1"], 2), (["token_k1"], "2"),
    (["seq_sum_k1"], "1.0_1.0"), (["seq_mean_k1"], "1e-3_1e3"), (["seq_mean_k1"], 0.5),
    (["seq_mean_k3"], 0.01), (["seq_max_k2"], "0.01"), (["token_k1", "seq_max_k2"], 1.5),
    (["token_k1", "seq_max_k2"], "0.5_2.0, 0.3"), (["token_k1", "seq_max_k2"], "0.5_2.0,"),
    (["token_k1"], "2.0_0.5"), (["token_k1"], -1.0), (["token_k1"], 0), (["token_k1"], "abc"),
    (["token_k2"], "0.5_2.0"), (["token_k2"], -0.1), (["token_k1", "seq_max_k2"], "1,2,3"),
    (["token_k1"], ""), (["token_k1"], ","), (["token_k1"], None), (["token_k1"], "0_1"),
    (["token_k1"], "1_x"), (["token_k3"], "inf"),
)
IS_SPECS = (2.0, 2, "2.0", "0.5_5.0", " 0.5_5.0 ", "5.0_0.5", 0, -1.0, "", "x", "0_1",
            "1_1", True, None)


def test_threshold_parsers_accept_and_refuse_what_verl_does(verl_corr):
    from aqn.config import rollout_correction as rc

    accepted = 0
    for options, spec in RS_SPECS:
        try:
            theirs = verl_corr._parse_rollout_rs_thresholds(options, spec)
        except (ValueError, TypeError, ZeroDivisionError):
            with pytest.raises((ValueError, TypeError)):
                rc.parse_rs_thresholds(options, spec)
            continue
        ours = rc.parse_rs_thresholds(options, spec)
        assert {o: (b.lower, b.upper) for o, b in ours.items()} == {
            o: (t["lower"], t["upper"]) for o, t in theirs.items()}, (options, spec)
        accepted += 1
    assert accepted == 11
    accepted = 0
    for spec in IS_SPECS:
        try:
            theirs = verl_corr._parse_rollout_is_threshold(spec)
        except (ValueError, TypeError):
            with pytest.raises((ValueError, TypeError)):
                rc.parse_is_threshold(spec)
            continue
        assert rc.parse_is_threshold(spec) == theirs, spec
        accepted += 1
    assert accepted == 6
    assert rc.RS_OPTIONS == tuple(sorted(verl_corr.SUPPORTED_ROLLOUT_RS_OPTIONS,
                                         key=rc.RS_OPTIONS.index))
    assert set(rc.RS_OPTIONS) == verl_corr.SUPPORTED_ROLLOUT_RS_OPTIONS


# ------------------------------------------------------------------------------- GSM8K

def gsm8k_strings() -> list[str]:
    """Real GSM8K answers, variants of them, and random strings over the pattern's alphabet."""
    rng = random.Random(0)
    strings = []
    if GSM8K_TEST.exists():
        for line in GSM8K_TEST.read_text().splitlines()[:400]:
            answer = json.loads(line)["answer"]
            strings += [answer, answer.replace("#### ", "The answer is "),
                        answer + " or maybe 1,234.", answer[: rng.randrange(len(answer) + 1)]]
    alphabet = "0123456789.,-$# \nab"
    for _ in range(3000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        strings.append(rng.choice(["", "#### ", "x" * 290, "so "]) + body)
    strings += ["#### 1,234", "#### 18, so that's it...", "no numbers here...", ".", ",",
                "#### -", "#### $5", "#### 5" + "x" * 295, "#### 5" + "x" * 294, "-.-,"]
    return strings


@pytest.mark.parametrize("method", ["strict", "flexible"])
def test_gsm8k_reward_equals_verl(method):
    verl_gsm8k = peer("verl.utils.reward_score.gsm8k")
    strings = gsm8k_strings()
    truths = ["18", "1234", "5", "-3", "0.5", ",", "..."]
    for text in strings:
        theirs = verl_gsm8k.extract_solution(text, method)
        assert aqn_gsm8k.extract_solution(text, method) == theirs, repr(text)
        for truth in truths + ([theirs] if theirs else []):
            assert aqn_gsm8k.compute_score(text, truth, method, format_score=0.1) == \
                verl_gsm8k.compute_score(text, truth, method, format_score=0.1), repr(text)
    assert len(strings) >= 3000


# ------------------------------------------------------------------------------- torchao

@pytest.fixture(scope="module")
def torchao_ref():
    peer("torchao")
    from aqn.quant.torchao_ref import torchao_fake_quantize

    return torchao_fake_quantize


def weight_cases() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)

    def gaussian(rows, cols, scale=0.02):
        return torch.randn(rows, cols, generator=gen) * scale

    awkward = gaussian(96, 512)
    awkward[3] = 0.0  # an all-zero row
    awkward[5, :64] = -0.0  # a block of negative zeros
    awkward[7, 128:160] *= 1e-6  # a block of tiny values
    awkward[9, 7] = 0.3  # an outlier
    signs = gaussian(64, 256) * 1e-3
    signs[::2] = -signs[::2].abs()  # rows of negatives that round to -0 in a coarse format
    subnormal = torch.tensor([[1e-39, -1e-40, 1.4e-45, -0.0] * 32] * 4)
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 16] * 8)
    cases = [("awkward", awkward), ("awkward x 1e-4", awkward * 1e-4), ("large", awkward * 1e4),
             ("negative small", signs), ("subnormal", subnormal), ("ties", ties * 0.1)]
    cases += [(f"width {w}", gaussian(64, w)) for w in (200, 576)]
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_bits_equal_torchao_fp32(torchao_ref, fmt):
    for name, w in weight_cases():
        ours, theirs = fake_quantize(w, fmt), torchao_ref(w, fmt)
        if fmt == "nvfp4" and name == "subnormal":
            # the documented deviation: torchao's 1 / per-tensor scale overflows to inf there
            assert torch.isfinite(ours).all() and (ours[w == 0] == 0).all()
            assert (theirs[w == 0] != 0).any()
            continue
        assert_same_bits(ours, theirs, f"{fmt} on {name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_bf16_bits_equal_torchao_computed_in_fp32(torchao_ref, fmt):
    for name, w in weight_cases():
        w = w.bfloat16()
        if fmt == "nvfp4" and name == "subnormal":
            continue  # see above
        assert_same_bits(fake_quantize(w, fmt), torchao_ref(w.float(), fmt).bfloat16(),
                         f"{fmt} on {name}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_torchao_native_bf16_differs_by_at_most_one_step(torchao_ref, fmt):
    # On bf16 input torchao keeps bf16 for the int4/int8 scales and arithmetic and for the
    # fp8 scale (amax / 448 rounded to bf16); ours computes in fp32 as specified. The
    # slightly different scale moves elements near a rounding boundary by one step (25-40 %
    # of the elements here), and rescales the rest by < 2^-8 before the bf16 rounding.
    w = (torch.randn(96, 512, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    ours, theirs = fake_quantize(w, fmt).float(), torchao_ref(w, fmt).float()
    x = w.float()
    if fmt in ("nvfp4", "mxfp4"):  # torchao computes these in fp32 too: bit for bit
        assert_same_bits(ours, theirs, fmt)
        return
    if fmt == "int8":
        step = x.abs().amax(-1, keepdim=True) / 127.5
    elif fmt == "int4":
        g = x.reshape(96, -1, 128)
        step = (g.amax(-1, keepdim=True).clamp(min=0) - g.amin(-1, keepdim=True).clamp(max=0)) / 15
        step = step.expand_as(g).reshape(96, 512)
    else:  # one E4M3 step at the value: 2^-3 relative (2^-9 of the scale when subnormal)
        step = torch.maximum(ours.abs(), theirs.abs()) / 8 + x.abs().amax() / 448 * 2**-9
    diff = (ours - theirs).abs()
    assert (diff > 0).any()
    assert (diff <= step + 2**-6 * torch.maximum(ours.abs(), theirs.abs())).all()
    assert rel_l2(ours, x) == pytest.approx(rel_l2(theirs, x), rel=0.01)


def rel_l2(q, w) -> float:
    return ((q.float() - w.float()).norm() / w.float().norm()).item()


@pytest.mark.parametrize("fmt", FORMATS)
def test_w4a4_activation_quantization_bits_equal_torchao(torchao_ref, fmt):
    """What each Linear receives under ActivationQuantizer is torchao's quantize-dequantize of
    its real input (a [batch, tokens, width] activation of the tiny model, flattened to the
    [tokens, width] matrix torchao takes), for every format and Linear, signs of zeros included."""
    from aqn.models import build_tiny
    from aqn.quant.activation import ActivationQuantizer
    from conftest import linear_inputs

    model, _ = build_tiny(seed=0)
    model.requires_grad_(False)  # a rollout pass; with gradients Q(x) + (x - x) turns -0 to +0
    quant = ActivationQuantizer(model, fmt)
    ids = torch.randint(3, 30, (3, 17), generator=torch.Generator().manual_seed(1))
    pairs = linear_inputs(model, quant, lambda: model(ids).logits.detach())
    assert len(pairs) == 28
    for path, (x, received) in pairs.items():
        flat = x.reshape(-1, x.shape[-1])
        assert_same_bits(received.reshape(flat.shape), torchao_ref(flat, fmt), f"{fmt} {path}")
