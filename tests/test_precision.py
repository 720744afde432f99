"""Precision as a variable: fp16 rounding (against torch's own cast and an exhaustive grid
oracle), profiles whose casts follow the rollout dtype, and actor_rollout_ref.rollout.dtype."""

from __future__ import annotations

import pytest
import torch

from aqn.config import load_config
from aqn.errors import ConfigError
from aqn.models import build_tiny, cast_parameters
from aqn.numerics import NumericsEmulator, get_profile, round_to, split_k_linear
from aqn.rollout.mismatch import measure_mismatch

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUB = 2.0**-24


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (so -0.0 != 0.0), any NaN equal to any NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


# every finite non-negative fp16 value, ascending (the bit patterns 0x0000..0x7BFF)
GRID = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def _truncate_oracle(x: torch.Tensor) -> torch.Tensor:
    """The fp16 value of largest magnitude <= |x|, with x's sign (IEEE round toward zero:
    saturating at 65504, inf stays inf), by search in the list of all fp16 values."""
    ax = x.abs()
    low = GRID[(torch.searchsorted(GRID, ax, right=True) - 1).clamp(min=0)]
    return torch.copysign(torch.where(torch.isinf(ax), ax, low), x)


def _next_up(v: torch.Tensor) -> torch.Tensor:
    """The next fp16 magnitude above |v| (inf past 65504), with v's sign."""
    idx = torch.searchsorted(GRID, v.abs(), right=True)
    up = torch.where(idx < len(GRID), GRID[idx.clamp(max=len(GRID) - 1)], torch.inf)
    return torch.copysign(up, v)


def _adversarial() -> torch.Tensor:
    sub = FP16_MIN_SUB
    return torch.tensor([
        0.0, -0.0, 1.0, -1.0, 1 + 2**-11, 1 + 3 * 2**-11,  # ties: to even (1) and up (1+2^-9)
        -(1 + 2**-11), 2049.0, 2051.0,  # integer ties past 2048 (spacing 2)
        FP16_MAX, -FP16_MAX, 65519.99, 65520.0, -65520.0, 65535.0, 65536.0, 1e6, 3e38,
        FP16_MIN_NORMAL, FP16_MIN_NORMAL * (1 - 2**-12), FP16_MIN_NORMAL - sub / 2,  # the edge
        sub, sub / 2, sub / 2 * (1 + 2**-20), sub * 1.5, sub * 2.5, -sub / 2, -sub * 0.75,
        sub / 4, 1e-40, -1e-40, 2**-30,
        float("inf"), float("-inf"), float("nan"),
    ])


def _random(n: int = 20000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = 2.0 ** torch.randint(-30, 20, (n,), generator=gen).float()  # sub- to overflow
    return torch.randn(n, generator=gen) * scale


# ------------------------------------------------------------------------------- fp16 rounding
def test_fp16_rne_is_torchs_own_cast_bit_for_bit():
    x = torch.cat([_random(), _adversarial()])
    got = round_to(x, "fp16", "rne")
    assert _same_bits(got, x.to(torch.float16).float())
    # the cases that matter, spelled out: overflow, ties to even, -0.0, subnormals
    assert round_to(torch.tensor([65519.99, 65520.0, 1 + 2**-11, FP16_MIN_SUB / 2, -0.0]),
                    "fp16").tolist() == [FP16_MAX, float("inf"), 1.0, 0.0, -0.0]


def test_fp16_truncate_matches_a_search_over_every_fp16_value():
    x = torch.cat([_random(seed=1), _adversarial()])
    got = round_to(x, "fp16", "truncate")
    assert _same_bits(got, torch.where(torch.isnan(x), x, _truncate_oracle(x)))
    assert round_to(torch.tensor([1e6, -70000.0, -FP16_MIN_SUB / 2]), "fp16",
                    "truncate").tolist() == [FP16_MAX, -FP16_MAX, -0.0]


@pytest.mark.parametrize("mode", ["rne", "truncate", "stochastic"])
def test_every_fp16_value_is_kept_by_every_mode(mode):
    values = torch.cat([GRID, -GRID, torch.tensor([float("inf"), float("-inf")])])
    out = round_to(values, "fp16", mode, torch.Generator().manual_seed(0))
    assert _same_bits(out, values)


def test_fp16_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    base = torch.cat([torch.rand(24, generator=gen) * 4 - 2,  # normal range
                      (torch.rand(8, generator=gen) - 0.5) * FP16_MIN_NORMAL,  # subnormals
                      torch.tensor([1 + 2**-12, 1000.3, FP16_MAX + 8.0])])  # 1/4, ..., overflow
    draws = 4000
    x = base.repeat(draws, 1)
    out = round_to(x, "fp16", "stochastic", torch.Generator().manual_seed(1))
    low, high = _truncate_oracle(base), _next_up(_truncate_oracle(base))
    down = out == low
    assert (down | (out == high)).all()  # never anything but the two neighbours
    # P(away from zero) = the distance from the lower neighbour in units of the spacing
    p = ((base - low) / (high - low)).where(torch.isfinite(high), (base - low) / 32)
    freq = (~down).double().mean(0)
    tolerance = 5 * (p * (1 - p) / draws).sqrt().double() + 1e-9
    assert ((freq - p.double()).abs() <= tolerance).all(), (freq - p.double()).abs().max()
    assert 0.2 < freq[-1] < 0.3  # 65512: a quarter of the way from 65504 to 65536 (inf)
    # seeded: the same generator state gives the same draws
    again = round_to(x, "fp16", "stochastic", torch.Generator().manual_seed(1))
    assert _same_bits(out, again)


def test_fp16_rounding_is_straight_through_for_gradients():
    x = torch.tensor([1.0001, -3.3e-6, 70000.0], requires_grad=True)
    (round_to(x, "fp16", "truncate") * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_split_k_in_fp16_keeps_what_bf16_loses_and_overflows_past_65504():
    x = torch.ones(1, 6)
    w = torch.tensor([[1.0, 2**-9, 0, 0, 0, 0]])  # chunk 1: 1 + 2^-9, then zeros
    assert split_k_linear(x, w, None, chunk=1, precision_name="fp16").item() == 1 + 2**-9
    assert split_k_linear(x, w, None, chunk=1).item() == 1.0  # bf16 (the default) drops it
    big = torch.full((1, 4), 16384.0)
    wide = torch.ones(1, 4)
    assert split_k_linear(big, wide, None, chunk=2, precision_name="fp16").item() == \
        float("inf")  # 32768 + 32768: the fp16 running sum overflows
    assert split_k_linear(big, wide, None, chunk=2).item() == 65536.0


# ------------------------------------------------------------------- profiles follow the dtype
def test_profile_precision_follows_the_model_dtype_unless_set():
    npu = get_profile("npu-like")
    assert npu.precision == "auto"
    assert npu.on(torch.float16).precision == "fp16"
    assert npu.on(torch.bfloat16).precision == npu.on(torch.float32).precision == "bf16"
    emulated = get_profile({"base": "npu-like", "precision": "fp16"})
    assert emulated.on(torch.float32).precision == "fp16"  # fp16 casts on an fp32 engine
    with pytest.raises(ConfigError, match="casts to fp16, but the model .* bfloat16"):
        emulated.on(torch.bfloat16)
    with pytest.raises(ConfigError, match="casts to bf16, but the model .* float16"):
        get_profile({"base": "gpu-like", "precision": "bf16"}).on(torch.float16)
    with pytest.raises(ConfigError, match="precision"):
        get_profile({"precision": "fp8"})


def _outputs_under(model, profile) -> dict[str, list[torch.Tensor]]:
    """Per kind of target, every patched or hooked module's output (after the emulator's
    rounding; for attention, its softmax probabilities) in one forward under ``profile``."""
    seen: dict[str, list[torch.Tensor]] = {}
    em = NumericsEmulator(model, profile)
    em.apply(0)

    def record(kind):
        def hook(_module, _args, out):
            t = out[1] if kind == "attention" else out[0] if isinstance(out, tuple) else out
            seen.setdefault(kind, []).append(t.detach())
        return hook

    hooks = [m.register_forward_hook(record(kind))
             for kind, found in em.targets.items() for _, m in found]
    try:
        with torch.no_grad():
            model(torch.arange(3, 40).unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
        em.restore()
    return seen


def test_every_cast_of_a_profile_becomes_an_fp16_cast():
    model, _ = build_tiny(seed=0)
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        outs = _outputs_under(model, get_profile({"base": "npu-like", "precision": precision}))
        # split-K Linear, norm cast, SiLU and softmax op by op, hooked hidden states
        assert set(outs) == {"linear", "norm", "act", "attention", "rounded_outputs"}
        for kind, tensors in outs.items():
            values = torch.cat([t.flatten() for t in tensors])
            assert torch.equal(values, values.to(dtype).float()), (precision, kind)
            if precision == "fp16":  # finer than bf16: most values are off the bf16 grid
                values = values[values != 0]  # (the causal mask's zeros lie on both)
                off = (values != values.to(torch.bfloat16).float()).float().mean()
                assert off > 0.5, (kind, off)


def test_a_float16_model_gets_fp16_casts_and_runs_finite(tiny):
    model, _ = tiny
    cast_parameters(model, "float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep theirs
    for name in ("gpu-like", "npu-like", "npu-naive"):
        em = NumericsEmulator(model, name)
        assert em.profile.precision == "fp16"
        em.apply(0)
        with torch.no_grad():
            logits = model(torch.arange(3, 30).unsqueeze(0)).logits
        em.restore()
        assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


def test_fp16_rollout_mismatch_is_smaller_than_bf16(tiny):
    """Qi et al.'s point on the tiny model: the same engine cast to fp16 drifts less from the
    fp32 trainer than cast to bf16 (3 more mantissa bits), with and without a profile."""
    model, tok = tiny
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("1+2=", "7*8-3=")]
    diff = {}
    for profile in ("reference", "gpu-like"):
        for dtype in ("bfloat16", "float16"):
            m = measure_mismatch(model, tok, prompts, profile, max_new_tokens=6, seed=0,
                                 rollout_dtype=dtype)
            diff[profile, dtype] = m["rollout_corr/abs_logp_diff_mean"]
    for profile in ("reference", "gpu-like"):
        assert 0 < 3 * diff[profile, "float16"] < diff[profile, "bfloat16"], diff
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trainer untouched


# ----------------------------------------------------------------- actor_rollout_ref.rollout.dtype
def test_rollout_dtype_takes_verls_spellings_and_defaults_to_the_models():
    cfg = load_config("smoke")
    assert cfg.actor_rollout_ref.rollout.dtype is None
    assert cfg.actor_rollout_ref.rollout_dtype == "float32"
    half = load_config("smoke", ["actor_rollout_ref.model.dtype=bfloat16"])
    assert half.actor_rollout_ref.rollout_dtype == "bfloat16"
    for value in ("float32", "bfloat16", "float16"):
        cfg = load_config("smoke", [f"actor_rollout_ref.rollout.dtype={value}"])
        assert cfg.actor_rollout_ref.rollout_dtype == value
    with pytest.raises(ConfigError, match="rollout.dtype"):
        load_config("smoke", ["actor_rollout_ref.rollout.dtype=fp16"])


def test_a_float16_rollout_casts_the_engine_copy_only_and_its_profile_casts_fp16():
    from aqn.rl.builder import build_engine, build_policy

    cfg = load_config("smoke", ["actor_rollout_ref.rollout.dtype=float16",
                                "actor_rollout_ref.rollout.numerics=npu-like"])
    policy = build_policy(cfg, torch.device("cpu"))
    engine = build_engine(cfg, policy)
    assert {p.dtype for p in engine.model.parameters()} == {torch.float16}
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    assert engine.perturbations.all[0].profile.precision == "fp16"
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01)  # a training step
    engine.sync_weights(policy.model)  # the new fp32 weights, cast
    for (name, mine), theirs in zip(engine.model.named_parameters(),
                                    policy.model.parameters(), strict=True):
        assert torch.equal(mine, theirs.detach().to(torch.float16)), name


def test_a_float16_rollouts_log_probs_are_its_own_not_the_trainers(tmp_path):
    from aqn.rl.trainer import GRPOTrainer
    from conftest import smoke

    trainer = GRPOTrainer(smoke(tmp_path, "actor_rollout_ref.rollout.dtype=float16",
                                "trainer.val_before_train=false"))
    metrics = trainer.step(0)
    # no perturbation, yet not the trainer's weights: the engine recomputes in fp16
    assert metrics["rollout_corr/abs_logp_diff_mean"] > 0
