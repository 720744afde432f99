"""Two rollout perturbations of the Linear weights at a size one chooses, to ask whether random
noise is a fair model of quantization error: the quantization error scaled by a
(``rollout.quant_error_scale``) and random weight noise of a given relative L2 size
(``rollout.weight_noise``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from aqn.config import ConfigError, load_config
from aqn.errors import NoTargetsError
from aqn.firing import NotFiredError
from aqn.perturb import (
    SPECS,
    Perturbations,
    build_perturbations,
    check_engine_support,
    describe_plan,
)
from aqn.quant import LoadTimeWeightQuantizer, WeightQuantizer, fake_quantize, select_linears
from aqn.quant.weight_noise import WeightNoise, WeightNoiseConfig
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import train
from conftest import logits, smoke

ROLLOUT = "actor_rollout_ref.rollout"
# the hf engine shares the trainer's Linear weights unless told otherwise (see the config)
NOISE = [f"{ROLLOUT}.weight_noise.scale=0.1"]  # the engine owns the Linears it writes


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def target_weights(model) -> dict[str, torch.Tensor]:
    """The default-selected Linear weights (the targets of both perturbations), as now."""
    return {path: m.weight.detach().clone() for path, m in select_linears(model)}


# ------------------------------------------------------------------ scaled quantization error

def test_error_scale_one_is_todays_quantizer_bit_for_bit(tiny):
    model, _ = tiny
    twin = copy.deepcopy(model)
    clean = target_weights(model)
    today = WeightQuantizer(model, "nvfp4")
    metrics = today.apply(0)
    scaled = WeightQuantizer(twin, "nvfp4", error_scale=1.0)
    assert scaled.apply(0) == metrics  # no quant/error_scale either: the logs are as before
    for path, m in select_linears(twin):
        assert torch.equal(m.weight, fake_quantize(clean[path], "nvfp4")), path
    assert torch.equal(logits(model), logits(twin))


def test_error_scale_two_writes_twice_the_error_and_logs_it(tiny):
    model, _ = tiny
    twin, before = copy.deepcopy(model), state(model)
    clean = target_weights(model)
    one = WeightQuantizer(twin, "nvfp4").apply(0)
    quant = WeightQuantizer(model, "nvfp4", error_scale=2.0)
    two = quant.apply(0)
    for path, m in select_linears(model):
        q = fake_quantize(clean[path], "nvfp4")
        assert torch.equal(m.weight, clean[path] + 2.0 * (q - clean[path])), path
        assert not torch.equal(m.weight, q)
    assert one["quant/rel_l2"] > 0.05
    assert two["quant/rel_l2"] == pytest.approx(2 * one["quant/rel_l2"], rel=1e-6)
    assert two["quant/max_layer_rel_l2"] == pytest.approx(2 * one["quant/max_layer_rel_l2"],
                                                          rel=1e-6)
    assert two["quant/sqnr_db"] == pytest.approx(one["quant/sqnr_db"] - 20 * math.log10(2))
    assert two["quant/error_scale"] == 2.0 and "quant/error_scale" not in one
    firing = quant.firing()
    assert firing.modules == set(quant.targets) and len(quant.targets) == 28
    assert firing.num_changed > 0.9 * firing.elements
    quant.restore()
    assert_same(model, before)


def test_the_logged_error_is_the_one_written_after_the_cast(tiny_bf16):
    model, _ = tiny_bf16
    clean = target_weights(model)
    metrics = WeightQuantizer(model, "mxfp4", error_scale=4.0).apply(0)
    written = target_weights(model)
    err = sum(float((written[p].double() - clean[p].double()).pow(2).sum()) for p in clean)
    ref = sum(float(clean[p].double().pow(2).sum()) for p in clean)
    assert metrics["quant/rel_l2"] == pytest.approx(math.sqrt(err / ref), rel=1e-12)
    assert 0.3 < metrics["quant/rel_l2"] < 0.6  # about 4 x mxfp4's 11 %


def test_error_scale_zero_writes_the_clean_weights_and_expects_no_change(tiny):
    model, _ = tiny
    before = state(model)
    quant = WeightQuantizer(model, "nvfp4", error_scale=0.0)
    metrics = quant.apply(0)
    assert_same(model, before)
    assert metrics["quant/rel_l2"] == 0.0 and quant.firing().num_changed == 0
    quant.firing().check("quant", 0, "rollout")  # nothing expected: no NotFiredError
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightQuantizer(model, "nvfp4", error_scale=-1.0)


def test_the_load_time_quantizer_scales_the_same_way(tiny):
    model, _ = tiny
    twin = copy.deepcopy(model)
    engine = WeightQuantizer(twin, "int4", error_scale=2.0)
    expected = engine.apply(0)
    loader = LoadTimeWeightQuantizer(model, "int4", error_scale=2.0)
    written = dict(select_linears(twin))
    for path, m in select_linears(model):
        assert torch.equal(loader.quantize(path, m.weight), written[path].weight), path
    loader.refresh()
    assert loader.apply(0) == expected


# ------------------------------------------------------------------------------ weight noise

def noise(model, scale=0.1, distribution="gaussian", seed=1, **kw) -> WeightNoise:
    return WeightNoise(model, WeightNoiseConfig(scale, distribution, **kw), seed)


def unit_eps(model, clean: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The eps each weight received, recovered from what was written: (w - w_clean) /
    (scale * rms(w_clean)), all targets in one flat tensor."""
    written = target_weights(model)
    return torch.cat([((written[p] - c) / (scale * c.pow(2).mean().sqrt())).flatten()
                      for p, c in clean.items()])


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("scale", [0.03, 0.1, 0.3])
def test_weight_noise_has_the_relative_l2_size_it_is_given(tiny, distribution, scale):
    model, _ = tiny
    wn = noise(model, scale, distribution)
    metrics = wn.apply(4)
    assert metrics["weight_noise/rel_l2"] == pytest.approx(scale, rel=0.05)
    assert metrics["weight_noise/max_layer_rel_l2"] == pytest.approx(scale, rel=0.05)
    assert metrics["weight_noise/scale"] == scale
    assert metrics["weight_noise/num_modules"] == 28.0
    assert metrics["weight_noise/num_params"] == sum(m.weight.numel()
                                                     for _, m in select_linears(model))
    assert metrics["weight_noise/sqnr_db"] == pytest.approx(-20 * math.log10(scale), abs=0.5)


def test_gaussian_and_uniform_noise_match_in_size_not_in_shape(tiny):
    model, _ = tiny
    clean = target_weights(model)
    eps, rel = {}, {}
    for distribution in ("gaussian", "uniform"):
        wn = noise(model, 0.1, distribution)
        rel[distribution] = wn.apply(1)["weight_noise/rel_l2"]
        eps[distribution] = unit_eps(model, clean, 0.1).double()
        wn.restore()
    assert rel["gaussian"] == pytest.approx(rel["uniform"], rel=0.02)
    assert eps["gaussian"].numel() > 500_000
    for e in eps.values():
        assert abs(float(e.mean())) < 0.01 and float(e.var()) == pytest.approx(1.0, rel=0.02)

    def kurtosis(e):
        return float(((e - e.mean()) ** 4).mean() / e.var() ** 2)

    assert kurtosis(eps["gaussian"]) == pytest.approx(3.0, abs=0.1)
    assert kurtosis(eps["uniform"]) == pytest.approx(1.8, abs=0.05)
    assert float(eps["uniform"].abs().max()) <= math.sqrt(3) + 1e-3  # bounded, rounding's shape
    assert float(eps["gaussian"].abs().max()) > 4.0  # tails: many draws beyond sqrt(3)
    assert float((eps["gaussian"].abs() > math.sqrt(3)).double().mean()) == pytest.approx(
        0.0833, abs=0.005)  # P(|z| > sqrt 3) for z ~ N(0, 1)


def test_weight_noise_is_seeded_by_seed_step_and_module(tiny):
    model, _ = tiny
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    clean = target_weights(model)
    noise(model).apply(3)
    first = target_weights(model)
    noise(twin).apply(3)  # another process, the same run
    assert all(torch.equal(w, first[p]) for p, w in target_weights(twin).items())
    for wn, step in ((noise(other), 4), (noise(other, seed=2), 3)):
        wn.apply(step)
        assert not any(torch.equal(w, first[p]) for p, w in target_weights(other).items())
        wn.restore()
    # each module draws its own eps: two layers of one shape do not get the same noise
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj" for i in (0, 1))
    eps = {p: (first[p] - clean[p]) / clean[p].pow(2).mean().sqrt() for p in (q0, q1)}
    assert eps[q0].shape == eps[q1].shape and not torch.allclose(eps[q0], eps[q1], atol=1e-3)


def test_weight_noise_never_accumulates_and_restores_bit_for_bit(tiny):
    model, _ = tiny
    before, clean = state(model), target_weights(model)
    wn = noise(model)
    wn.apply(3)
    at_3 = target_weights(model)
    for step in (4, 5, 6):
        assert wn.apply(step)["weight_noise/rel_l2"] == pytest.approx(0.1, rel=0.05)
    wn.apply(3)
    assert all(torch.equal(w, at_3[p]) for p, w in target_weights(model).items())
    assert not any(torch.equal(at_3[p], c) for p, c in clean.items())
    wn.restore()
    assert_same(model, before)
    assert wn.writes() and all(w is m.weight for w, (_, m) in zip(wn.writes(),
                                                                  select_linears(model),
                                                                  strict=True))


def test_weight_noise_refresh_takes_new_weights_and_keeps_unsent_ones(tiny):
    model, _ = tiny
    clean = target_weights(model)
    wn = noise(model)
    wn.apply(1)
    [(_, first), *others] = select_linears(model)
    new = torch.full_like(first.weight, 0.5)
    with torch.no_grad():
        first.weight.copy_(new)  # the sync sent this weight; the others still hold the noise
    wn.refresh()
    assert wn.last_refreshed == 1
    wn.restore()
    assert torch.equal(first.weight, new)
    assert others and all(torch.equal(m.weight, clean[p]) for p, m in others)


def test_weight_noise_counts_every_weight_it_wrote(tiny):
    model, _ = tiny
    wn = noise(model)
    wn.apply(2)
    firing = wn.firing()
    paths = [p for p, _ in select_linears(model)]
    assert firing.modules == set(paths) == set(wn.targets) and len(paths) == 28
    assert firing.elements == sum(m.weight.numel() for _, m in select_linears(model))
    assert firing.num_changed > 0.999 * firing.elements
    assert firing.metrics("weight_noise")["perturb/weight_noise/modules"] == 28.0
    firing.check("weight_noise", 2, "rollout")


def test_weight_noise_on_nothing_or_at_zero_is_an_error(tiny):
    model, _ = tiny
    with pytest.raises(NoTargetsError, match="weight noise matched 0 modules"):
        noise(model, include=("nothing_here",))
    with pytest.raises(ValueError, match="scale > 0"):
        noise(model, scale=0.0)
    only = noise(model, include=("down_proj",))
    assert only.targets == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]


def test_weight_noise_that_changed_nothing_did_not_fire(tiny_bf16):
    model, _ = tiny_bf16
    wn = noise(model, scale=1e-20)  # far below bf16's resolution: the cast swallows it
    wn.apply(0)
    assert wn.firing().num_changed == 0
    with pytest.raises(NotFiredError, match="'weight_noise'.*changed none"):
        wn.firing().check("weight_noise", 0, "rollout")


# ---------------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, key, message", [
    ("quant_error_scale=-1", "quant_error_scale", "finite number > 0"),
    ("quant_error_scale=.nan", "quant_error_scale", "finite number > 0"),
    ("quant_error_scale=.inf", "quant_error_scale", "finite number > 0"),
    ("quant_error_scale=0", "quant_error_scale", "clean point of a dose sweep"),
    ("quant_error_scale=2", "quant_error_scale", "quantization is null"),
    ("weight_noise.scale=-0.1", "weight_noise.scale", "finite number >= 0"),
    ("weight_noise.scale=.nan", "weight_noise.scale", "finite number >= 0"),
    ("weight_noise.distribution=laplace", "weight_noise.distribution", "gaussian"),
])
def test_bad_weight_perturbation_configs_name_their_key(override, key, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("smoke", [f"{ROLLOUT}.{override}"])
    assert e.value.key == f"{ROLLOUT}.{key}"


def test_weight_noise_and_quantization_are_one_or_the_other():
    with pytest.raises(ConfigError, match="replace the other") as e:
        load_config("smoke", [*NOISE, f"{ROLLOUT}.quantization=nvfp4"])
    assert e.value.key == f"{ROLLOUT}.weight_noise.scale"


@pytest.mark.parametrize("override, key", [
    ("weight_noise.scale=0.1", "weight_noise"),
    ("numerics=npu-like", "numerics"),
    ("op_noise.scale=0.05", "op_noise"),
    ("activation_noise=0.05", "activation_noise"),
    ("activation_quantization=mxfp4", "activation_quantization"),
    ("kv_cache_dtype=fp8", "kv_cache_dtype"),
])
def test_vllm_refuses_what_the_registry_says_it_cannot_carry(override, key):
    cfg = load_config("smoke", [f"{ROLLOUT}.name=vllm", f"{ROLLOUT}.{override}"])
    with pytest.raises(ConfigError, match="not supported with name=vllm") as e:
        check_engine_support(cfg)
    assert e.value.key == f"{ROLLOUT}.{key}"  # the registry entry's config_key
    check_engine_support(load_config("smoke", [f"{ROLLOUT}.{override}"]))  # hf carries it
    # what vLLM carries: AQN on its modules, quantization (scaled too) in the weights it loads
    check_engine_support(load_config("smoke", [
        f"{ROLLOUT}.name=vllm", f"{ROLLOUT}.quantization=nvfp4", f"{ROLLOUT}.quant_error_scale=2",
        "trainer.noise_injection.enabled=true"]))


# -------------------------------------------------------------------------------- registry

def test_the_registry_builds_both_from_the_config(tiny):
    model, _ = tiny
    cfg = load_config("tiny", [f"{ROLLOUT}.quantization=nvfp4", f"{ROLLOUT}.quant_error_scale=2"])
    [(spec, quant)] = build_perturbations(model, cfg)
    assert spec is SPECS["quant"] and quant.error_scale == 2.0
    cfg = load_config("tiny", [*NOISE, f"{ROLLOUT}.weight_noise.distribution=uniform",
                               "trainer.seed=7"])
    [(spec, wn)] = build_perturbations(model, cfg)
    assert isinstance(wn, WeightNoise) and wn.seed == 7
    assert wn.config == WeightNoiseConfig(0.1, "uniform")
    assert (spec.kind, spec.metric_prefix, spec.config_key, spec.in_validation) == (
        "weight-noise", "weight_noise/", f"{ROLLOUT}.weight_noise", True)
    assert spec is SPECS["weight_noise"]
    perturbations = Perturbations([(spec, wn)])
    assert perturbations.apply(0, validation=True)["weight_noise/rel_l2"] == pytest.approx(
        0.1, rel=0.05)  # kept in validation: it models where the model runs
    assert perturbations.writes() == {id(m.weight) for _, m in select_linears(model)}
    plan = describe_plan(cfg, {"rollout": perturbations})
    assert "rollout weight_noise (actor_rollout_ref.rollout.weight_noise; in validation: yes): " \
           "28 modules, e.g. model.layers.0.self_attn.q_proj" in plan


def test_a_grpo_run_logs_the_weight_noise_it_applied(tmp_path):
    train(smoke(tmp_path, *NOISE, "trainer.total_training_steps=2", "trainer.test_freq=2"))
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if r["step"] >= 1]
    assert len(steps) == 2
    for r in steps:
        assert r["weight_noise/rel_l2"] == pytest.approx(0.1, rel=0.05)
        assert r["weight_noise/scale"] == 0.1 and r["weight_noise/num_modules"] == 28
        assert r["perturb/weight_noise/modules"] == 28
        assert r["perturb/weight_noise/elements_changed"] > 0.99 * r["weight_noise/num_params"]
        assert r["rollout_corr/abs_logp_diff_mean"] > 0  # the rollout ran on noisy weights
    assert rows[0]["val-aux/weight_noise/rel_l2"] == pytest.approx(0.1, rel=0.05)
    # fresh noise each step, from the clean weights each time (never compounding)
    assert steps[0]["weight_noise/rel_l2"] != steps[1]["weight_noise/rel_l2"]
