"""Simulated hardware numerics: each knob against a hand computation, bit-exact restore."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aqn.errors import ConfigError, NoTargetsError
from aqn.models import build_tiny
from aqn.numerics import (
    PROFILES,
    NumericsEmulator,
    NumericsProfile,
    compare_to_published,
    emulate,
    get_profile,
    mismatch_report,
    round_bf16,
    split_k_linear,
)
from aqn.rollout.mismatch import measure_mismatch

EPS = 2.0**-7  # bf16 spacing in [1, 2)


def bf16(t: torch.Tensor) -> torch.Tensor:
    """Reference RNE cast through PyTorch's own dtype conversion."""
    return t.to(torch.bfloat16).to(torch.float32)


def _inputs(seed: int = 0, batch: int = 3, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in the first row
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------ rounding
def test_rne_and_truncate_on_bf16_boundaries():
    x = torch.tensor([
        1 + EPS / 2,  # tie between 1 (even) and 1 + eps (odd)
        1 + 0.75 * EPS,  # nearer the upper neighbour
        1 + EPS + EPS / 2,  # tie between 1 + eps (odd) and 1 + 2 eps (even)
        -(1 + 0.75 * EPS),  # negative: truncation goes toward zero
        1 + 0.25 * EPS,
        3.0,
    ])
    rne = round_bf16(x, "rne")
    trunc = round_bf16(x, "truncate")
    assert rne.tolist() == [1.0, 1 + EPS, 1 + 2 * EPS, -(1 + EPS), 1.0, 3.0]
    assert trunc.tolist() == [1.0, 1.0, 1 + EPS, -1.0, 1.0, 3.0]
    assert torch.equal(rne, bf16(x))  # PyTorch's cast is round-to-nearest-even
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    for mode in ("rne", "truncate", "stochastic"):
        out = round_bf16(special, mode, torch.Generator().manual_seed(0))
        assert out[:2].tolist() == [float("inf"), float("-inf")]
        assert math.isnan(out[2].item()) and out[3:].tolist() == [0.0, 0.0]


def test_truncate_never_increases_magnitude_and_lands_on_grid():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 100
    t = round_bf16(x, "truncate")
    assert torch.equal(bf16(t), t)  # on the bf16 grid
    assert bool((t.abs() <= x.abs()).all())
    assert bool(((x - t).abs() < x.abs() * 2.0**-7).all())  # less than one spacing away


def test_stochastic_rounding_seeded_and_unbiased():
    x = torch.full((200_000,), 1 + 0.25 * EPS)
    a = round_bf16(x, "stochastic", torch.Generator().manual_seed(7))
    b = round_bf16(x, "stochastic", torch.Generator().manual_seed(7))
    c = round_bf16(x, "stochastic", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {1.0, 1 + EPS}  # only the two neighbours
    up = (a > 1).double().mean().item()
    assert abs(up - 0.25) < 0.005  # P(up) = distance to the lower neighbour / spacing
    assert abs(a.double().mean().item() - (1 + 0.25 * EPS)) < 0.005 * EPS
    # unbiased on arbitrary values too, while round-to-nearest-even is not on this set
    y = torch.rand(100_000, generator=torch.Generator().manual_seed(2)) * EPS + 1 + EPS / 2
    sr = round_bf16(y, "stochastic", torch.Generator().manual_seed(3))
    assert abs((sr - y).double().mean().item()) < 0.01 * EPS
    assert abs((round_bf16(y, "truncate") - y).double().mean().item()) > 0.4 * EPS


def test_rounding_is_straight_through_for_gradients():
    x = torch.randn(50, requires_grad=True)
    (round_bf16(x, "truncate") * torch.arange(50.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(50.0))


# -------------------------------------------------------------------------------- split-K
def test_split_k_hand_example_swallows_small_partials():
    # partial products 1, 2^-8, 2^-8: fp32 gives 1 + 2^-7; a bf16 running sum rounds
    # 1 + 2^-8 back to 1 (tie to even) after each chunk and never moves
    x = torch.tensor([[1.0, 2.0**-8, 2.0**-8]])
    w = torch.ones(1, 3)
    assert split_k_linear(x, w, None, chunk=1).item() == 1.0
    assert split_k_linear(x, w, None, chunk=3).item() == 1 + EPS
    assert split_k_linear(x, w, torch.tensor([0.5]), chunk=3).item() == bf16(
        torch.tensor(1.5 + EPS)).item()


def test_split_k_equals_manual_chunked_bf16_sum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 100, generator=gen)
    w = torch.randn(30, 100, generator=gen)
    b = torch.randn(30, generator=gen)
    for chunk in (16, 64, 128):
        acc = torch.zeros(5, 7, 30, dtype=torch.bfloat16)
        for s in range(0, 100, chunk):
            part = torch.einsum("btk,nk->btn", x[..., s:s + chunk], w[:, s:s + chunk])
            acc = (acc.float() + part).to(torch.bfloat16)
        want = (acc.float() + b).to(torch.bfloat16).float()
        got = split_k_linear(x, w, b, chunk)
        assert torch.allclose(got, want, rtol=0, atol=0.02) and (got == want).float().mean() > 0.97
    # a smaller chunk means more bf16 roundings: further from the fp32 result
    exact = x @ w.T + b
    err16 = (split_k_linear(x, w, b, 16) - exact).abs().mean()
    err128 = (split_k_linear(x, w, b, 128) - exact).abs().mean()
    assert err16 > 1.5 * err128 > 0


# ----------------------------------------------------------------------- knobs on modules
def test_norm_cast_order_matches_formula(tiny):
    model, _ = tiny
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.7, norm.weight.numel()))
    x = torch.randn(4, norm.weight.numel(), generator=torch.Generator().manual_seed(3))
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    outs = {}
    for cast in ("before_weight", "after_weight"):
        with emulate(model, NumericsProfile(norm_cast=cast)), torch.no_grad():
            outs[cast] = norm(x)
    assert torch.equal(outs["before_weight"], bf16(norm.weight * bf16(xn)))
    assert torch.equal(outs["after_weight"], bf16(norm.weight * xn))
    assert not torch.equal(outs["before_weight"], outs["after_weight"])


def test_norm_before_weight_and_act_fp32_are_hf_bf16_numerics(tiny_bf16):
    """On a bf16 model, HF's RMSNorm casts before the multiply and SiLU rounds once."""
    model, _ = tiny_bf16
    with torch.no_grad():
        for m in model.modules():
            if "rmsnorm" in type(m).__name__.lower():
                m.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(4))
    ids, mask = _inputs()
    base = _logits(model, ids, mask)
    with emulate(model, NumericsProfile(norm_cast="before_weight", act_dtype="fp32",
                                        rounding="rne")):
        assert torch.equal(_logits(model, ids, mask), base)
    with emulate(model, NumericsProfile(norm_cast="after_weight")):
        assert not torch.equal(_logits(model, ids, mask), base)


def test_silu_knob_matches_op_by_op_formula(tiny):
    model, _ = tiny
    act = model.model.layers[0].mlp.act_fn
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 4
    with emulate(model, NumericsProfile(act_dtype="bf16")), torch.no_grad():
        low = act(x)
    with emulate(model, NumericsProfile(act_dtype="fp32")), torch.no_grad():
        high = act(x)
    xb = bf16(x)
    assert torch.equal(low, bf16(xb / bf16(1 + bf16(torch.exp(-xb)))))
    assert torch.equal(high, bf16(torch.nn.functional.silu(x)))
    assert not torch.equal(low, high)


def test_softmax_bf16_attention_matches_hand_computation(tiny):
    model, _ = tiny
    em = NumericsEmulator(model, NumericsProfile(softmax_dtype="bf16"))
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 32, generator=gen)
    k = torch.randn(2, 2, 5, 32, generator=gen)
    v = torch.randn(2, 2, 5, 32, generator=gen)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 0] = False  # a padded first key in the second row
    out, probs = em._attention(attn, q, k, v, mask, scaling=32**-0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = bf16(q @ kk.transpose(2, 3) * 32**-0.5).masked_fill(~mask, torch.finfo().min)
    e = bf16(torch.exp(bf16(s - s.amax(-1, keepdim=True))))
    p = bf16(e / bf16(e.sum(-1, keepdim=True)))
    assert torch.equal(probs, p)
    assert torch.equal(out, (p @ vv).transpose(1, 2))
    assert probs[1, :, 1:, 0].abs().max() == 0  # masked key has exactly zero weight
    fp32_probs = torch.softmax(q @ kk.transpose(2, 3) * 32**-0.5
                               + torch.where(mask, 0.0, torch.finfo().min), -1)
    assert 0 < (p - fp32_probs).abs().max() < 0.02


def test_emulated_attention_masks_left_padding(tiny):
    model, _ = tiny
    ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    pad_mask = (padded != 0).long()
    with emulate(model, "npu-like"):
        assert model.config._attn_implementation.startswith("aqn_numerics_")
        plain = _logits(model, ids, torch.ones_like(ids))
        left = model(input_ids=padded, attention_mask=pad_mask,
                     position_ids=(pad_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 4:]
    assert (plain - left).abs().max() < 0.05  # split-K rounding may flip, masking is exact
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------- whole profiles
def test_reference_profile_is_bit_identical(tiny, tiny_bf16):
    for model, _ in (tiny, tiny_bf16):
        ids, mask = _inputs()
        base = _logits(model, ids, mask)
        with emulate(model, "reference") as em:
            assert em.metrics() == {"numerics/patched_modules": 0.0}
            assert torch.equal(_logits(model, ids, mask), base)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_is_bit_identical_for_every_profile(dtype):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, _ = build_tiny(dtype=dtype)
    ids, mask = _inputs()
    base = _logits(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keys = set(ALL_ATTENTION_FUNCTIONS)
    profiles = [*PROFILES.values(), NumericsProfile(rounding="stochastic")]
    for profile in profiles:
        em = NumericsEmulator(model, profile, seed=1)
        em.apply(0)
        em.apply(1)  # re-applying after a sync installs nothing twice
        changed = _logits(model, ids, mask)
        em.restore()
        em.restore()  # idempotent
        assert torch.equal(_logits(model, ids, mask), base), profile.name
        if not profile.is_reference:
            assert not torch.equal(changed[mask.bool()], base[mask.bool()]) or (
                dtype == "bfloat16" and profile.name == "gpu-like"), profile.name
    for m in model.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks
    assert model.config._attn_implementation == "sdpa"
    assert set(ALL_ATTENTION_FUNCTIONS) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_npu_like_differs_more_than_gpu_like(tiny):
    model, _ = tiny
    ids, mask = _inputs(length=24)
    valid = mask.bool()
    base = _logits(model, ids, mask).log_softmax(-1)[valid]
    diffs = {}
    for name in ("gpu-like", "npu-like", "npu-naive"):
        with emulate(model, name):
            diffs[name] = (_logits(model, ids, mask).log_softmax(-1)[valid] - base).abs().mean()
    assert 0 < diffs["gpu-like"] < diffs["npu-like"] < diffs["npu-naive"]


def test_stochastic_profile_reproducible_per_seed_and_step(tiny):
    model, _ = tiny
    ids, mask = _inputs()
    profile = NumericsProfile(rounding="stochastic", matmul="bf16_splitk", split_k_chunk=32)

    def run(seed, step):
        with emulate(model, profile, seed=seed, step=step):
            return _logits(model, ids, mask)

    assert torch.equal(run(0, 3), run(0, 3))
    assert not torch.equal(run(0, 3), run(0, 4))
    assert not torch.equal(run(0, 3), run(1, 3))


def test_gradients_flow_straight_through(tiny):
    model, _ = tiny
    model.train()
    ids, _ = _inputs()
    mask = torch.ones_like(ids)  # left-pad query rows see no key: conventions differ there

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    clean = grads()
    with emulate(model, "npu-like"):
        emulated = grads()
    for name, g in emulated.items():
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), clean[name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


def test_fp32_norm_weights_compose_with_emulation(tiny_bf16):
    model, _ = tiny_bf16
    norm = model.model.layers[1].post_attention_layernorm
    norm.weight.data = norm.weight.data.float() * 1.01
    x = torch.randn(3, 128).to(torch.bfloat16)
    with emulate(model, NumericsProfile(norm_cast="after_weight")), torch.no_grad():
        y = norm(x)
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert y.dtype == torch.float32 and torch.equal(y, bf16(norm.weight * xn))


# -------------------------------------------------------------------------------- errors
def test_unknown_profile_and_bad_knobs_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="reference, gpu-like, npu-like"):
        NumericsEmulator(tiny[0], "tpu-like")
    with pytest.raises(ConfigError, match="matmul"):
        NumericsProfile(matmul="fp16")
    with pytest.raises(ConfigError, match="split_k_chunk"):
        NumericsProfile(split_k_chunk=0)
    with pytest.raises(ConfigError, match="unknown numerics knobs"):
        get_profile({"base": "npu-like", "matmull": "fp32"})
    custom = get_profile({"base": "npu-like", "split_k_chunk": 16})
    assert custom.split_k_chunk == 16 and custom.softmax_dtype == "bf16"
    assert custom.name == "npu-like+custom"
    assert custom.knobs_hash() != PROFILES["npu-like"].knobs_hash()


def test_profile_matching_no_module_raises():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(NoTargetsError, match="norm_cast"):
        NumericsEmulator(model, NumericsProfile(norm_cast="before_weight"))
    with pytest.raises(NoTargetsError, match="softmax_dtype"):
        NumericsEmulator(model, NumericsProfile(softmax_dtype="bf16"))
    with pytest.raises(NoTargetsError, match="act_dtype"):
        NumericsEmulator(model, NumericsProfile(act_dtype="bf16"))
    with emulate(model, NumericsProfile(matmul="bf16_splitk", split_k_chunk=4)) as em:
        assert em.metrics()["numerics/patched_linear"] == 1.0


def test_norm_with_another_formula_is_refused():
    class OffsetRMSNorm(nn.Module):  # Gemma style: (1 + weight) * x / rms(x)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.eps = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    model = nn.Sequential(nn.Linear(8, 8), OffsetRMSNorm())
    em = NumericsEmulator(model, NumericsProfile(norm_cast="before_weight"))
    with pytest.raises(ConfigError, match="does not compute weight"):
        em.apply(0)
    assert not em.active and "forward" not in model[0].__dict__  # nothing left behind


# ------------------------------------------------------------------------------- mismatch
def test_measure_mismatch_reference_zero_and_profile_positive(tiny):
    model, tok = tiny
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("1+2=", "Tom has 3 pens.")]
    ref = measure_mismatch(model, tok, prompts, "reference", max_new_tokens=8, seed=0)
    assert ref["rollout_corr/abs_logp_diff_mean"] == 0.0 and ref["rollout_corr/k3_kl"] == 0.0
    assert ref["training/rollout_actor_probs_pearson_corr"] == pytest.approx(1.0, abs=1e-14)
    npu = measure_mismatch(model, tok, prompts, "npu-like", max_new_tokens=8, seed=0)
    assert npu["mismatch/num_tokens"] == ref["mismatch/num_tokens"] == 16  # random model: no EOS
    assert npu["rollout_corr/abs_logp_diff_mean"] > 1e-3
    assert npu["rollout_corr/abs_logp_diff_max"] >= npu["rollout_corr/abs_logp_diff_mean"]
    assert npu["rollout_corr/k3_kl"] > 0 and npu["numerics/patched_modules"] > 0
    assert all("forward" not in m.__dict__ for m in model.modules())  # clean model untouched


def test_measure_mismatch_takes_any_perturbation(tiny):
    from aqn.noise import NoiseInjectionConfig, NoiseInjector
    from aqn.perturb import AQNNoise

    model, tok = tiny
    prompts = [tok.encode("2+2=", add_special_tokens=False)]
    cfg = NoiseInjectionConfig(sigma_start=0.05, sigma_end=0.01, num_stages=3, total_steps=9,
                               seed=0).resolved()
    out = measure_mismatch(model, tok, prompts,
                           lambda m: AQNNoise(NoiseInjector(m, cfg)),
                           max_new_tokens=6, step=4)
    assert out["rollout_corr/abs_logp_diff_mean"] > 0
    with pytest.raises(TypeError, match="builds the perturbation"):
        measure_mismatch(model, tok, prompts, NumericsEmulator(model, "npu-like"))


def test_mismatch_report_places_value_among_published_ranges():
    assert compare_to_published(0.02) == {"gpu": "within", "npu-naive": "below",
                                          "npu-fixed": "within"}
    assert compare_to_published(0.1)["npu-naive"] == "within"
    text = mismatch_report(0.1, label="npu-naive on tiny-base", k3_kl=0.003)
    assert text.startswith("npu-naive on tiny-base: mean |logp_train - logp_rollout| = 0.1")
    assert "0.075-0.178  -> within" in text and "0.011-0.025  -> above" in text
