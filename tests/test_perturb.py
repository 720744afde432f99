"""The perturbation registry, the engine's perturbation list, and the registry's example entry:
activation noise on the RMSNorm outputs (added as one kernel module + one registry entry)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from aqn.config import ConfigError, load_config
from aqn.errors import NoTargetsError
from aqn.experiments.report import build_report
from aqn.firing import NotFiredError
from aqn.noise import NoiseInjectionConfig, NoiseInjector
from aqn.noise.activation import NormOutputNoise
from aqn.perturb import REGISTRY, SPECS, AQNNoise, build_perturbations, registered
from aqn.quant import WeightQuantizer
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from aqn.rollout.base import Engine, Perturbations, SamplingParams
from aqn.rollout.hf import HFEngine, parameter_slots
from conftest import logits, smoke

# ------------------------------------------------------------------------------- registry

def test_registry_declares_each_perturbation_once():
    assert [s.name for s in REGISTRY] == [
        "quant", "weight_noise", "act_quant", "kv_cache", "numerics", "op_noise", "aqn",
        "activation_noise", "actor_act_quant", "actor_numerics", "actor_op_noise"]
    assert {s.name: s.in_validation for s in REGISTRY if s.side == "rollout"} == {
        "quant": True, "weight_noise": True, "act_quant": True, "kv_cache": True,
        "numerics": True, "op_noise": True, "aqn": False, "activation_noise": False}
    assert {s.name for s in REGISTRY if s.side == "actor"} == {
        "actor_act_quant", "actor_numerics", "actor_op_noise"}
    assert len({s.metric_prefix for s in REGISTRY}) == len(REGISTRY)
    assert all(s.metric_prefix.endswith("/") and s.report_section for s in REGISTRY)


def test_build_follows_the_config_in_registry_order(tiny):
    model, _ = tiny
    cfg = load_config("smoke", ["actor_rollout_ref.rollout.activation_noise=0.05",
                                "actor_rollout_ref.rollout.quantization=int4",
                                "trainer.noise_injection.enabled=true"])
    built = build_perturbations(model, cfg)
    assert [spec.name for spec, _ in built] == ["quant", "aqn", "activation_noise"]
    assert [spec.kind for spec, _ in built] == ["quantization", "noise", "activation"]
    assert [type(p) for _, p in built] == [WeightQuantizer, AQNNoise, NormOutputNoise]
    assert build_perturbations(model, load_config("smoke")) == []


def test_an_unregistered_perturbation_is_refused():
    class Homemade:
        name = "homemade"

    with pytest.raises(ValueError, match="not a registered perturbation.*homemade"):
        registered(Homemade())


def test_validation_leaves_out_what_the_registry_declares(tiny):
    model, _ = tiny
    injector = NoiseInjector(model, NoiseInjectionConfig(
        enabled=True, sigma_start=0.05, sigma_end=0.05, num_stages=3, total_steps=10, seed=1))
    perturbations = Perturbations(registered(WeightQuantizer(model, "int4"), AQNNoise(injector)))
    metrics = perturbations.apply(5, validation=True)
    assert "quant/rel_l2" in metrics and not any(k.startswith("aqn/") for k in metrics)
    assert [spec.name for spec, _ in perturbations.active] == ["quant"]
    metrics = perturbations.apply(5)
    assert metrics["aqn/sigma"] == 0.05 and metrics["aqn/swallowed"] == 0.0
    assert [spec.name for spec, _ in perturbations.active] == ["quant", "aqn"]
    perturbations.restore()
    assert not perturbations.perturbed


# ---------------------------------------------------------------------- activation noise

def test_activation_noise_changes_outputs_not_weights_and_restores_exactly(tiny):
    model, _ = tiny
    weights = copy.deepcopy(model.state_dict())
    clean = logits(model)
    noise = NormOutputNoise(model, sigma=0.05, seed=1)
    metrics = noise.apply(step=3)
    assert metrics == {"act_noise/sigma": 0.05, "act_noise/num_modules": 9.0}
    noisy = logits(model)
    assert not torch.allclose(noisy, clean, atol=1e-3)
    usage = noise.firing().metrics("activation_noise")
    # one forward pass calls each of the 9 norms (2 per layer x 4 layers + final) once
    assert usage["perturb/activation_noise/calls"] == 9
    assert usage["perturb/activation_noise/modules"] == 9
    changed = usage["perturb/activation_noise/elements_changed"]
    assert changed / usage["perturb/activation_noise/elements"] > 0.99
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k  # it never touches a weight
    noise.restore()
    assert torch.equal(logits(model), clean)


def test_activation_noise_is_seeded_per_step_and_call(tiny):
    model, _ = tiny
    twin = copy.deepcopy(model)
    noise = NormOutputNoise(model, sigma=0.05, seed=1)
    noise.apply(step=3)
    first, second = logits(model), logits(model)
    assert not torch.equal(first, second)  # fresh noise on every call...
    noise.apply(step=3)
    assert torch.equal(logits(model), first)  # ...but the same calls of a step repeat
    noise.apply(step=4)
    assert not torch.equal(logits(model), first)
    same_seed = NormOutputNoise(twin, sigma=0.05, seed=1)
    same_seed.apply(step=3)
    assert torch.equal(logits(twin), first)  # another process, the same run
    same_seed.restore()
    NormOutputNoise(twin, sigma=0.05, seed=2).apply(step=3)
    assert not torch.equal(logits(twin), first)


def test_activation_noise_that_never_fired_is_an_error(tiny):
    model, _ = tiny
    noise = NormOutputNoise(model, sigma=0.05, seed=1)
    noise.apply(step=0)
    with pytest.raises(NotFiredError, match="'activation_noise'.*none of its hooks"):
        noise.firing().check("activation_noise", 0, "rollout")


def test_activation_noise_with_no_norm_is_an_error():
    with pytest.raises(NoTargetsError, match="activation noise: AQN matched 0 modules"):
        NormOutputNoise(nn.Sequential(nn.Linear(4, 4)), sigma=0.05, seed=1)


def test_activation_noise_config_is_checked():
    with pytest.raises(ConfigError, match="activation_noise"):
        load_config("smoke", ["actor_rollout_ref.rollout.activation_noise=-0.1"])


def test_activation_noise_in_training_is_counted_off_in_validation_and_never_in_the_trainer(
        tmp_path):
    cfg = smoke(tmp_path, "actor_rollout_ref.rollout.activation_noise=0.05")
    trainer = GRPOTrainer(cfg)
    assert [p.name for p in trainer.engine.perturbations.all] == ["activation_noise"]
    trainer.fit()
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if r["step"] >= 1]
    assert len(steps) == 4
    for r in steps:
        assert r["act_noise/sigma"] == 0.05
        # generation (one call per norm per token) and the recompute pass both went through
        assert r["perturb/activation_noise/calls"] > 9 * 16
        assert r["rollout_corr/abs_logp_diff_mean"] > 0  # the rollout saw the noise
    assert not any(k.startswith("val-aux/act_noise") for r in rows for k in r)
    # the hooks lived on the engine's copy only (the counts above come from there)
    assert all(not m._forward_hooks for m in trainer.policy.modules())


def test_the_report_shows_a_registered_perturbation_without_knowing_it(tmp_path):
    train(smoke(tmp_path, "actor_rollout_ref.rollout.activation_noise=0.05", name="act"))
    md = build_report([tmp_path / "act"], tmp_path / "report").markdown
    section = md.split("Activation noise on the norm outputs", 1)[1].split("\n#", 1)[0]
    assert "perturb/activation_noise/calls" in section and "act_noise/sigma" in section
    assert "| act | " in section and "0.05" in section


def test_activation_noise_off_gives_the_unperturbed_run(tmp_path):
    train(smoke(tmp_path, name="plain"))
    train(smoke(tmp_path, "actor_rollout_ref.rollout.activation_noise=0.0", name="zero"))

    def values(name):
        return [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))}
                for r in read_metrics(tmp_path / name)]

    assert values("plain") == values("zero")


def test_the_hf_engine_implements_the_engine_protocol():
    for name in ("sync_weights", "generate", "logprobs"):
        assert (inspect.signature(getattr(HFEngine, name)).parameters.keys()
                == inspect.signature(getattr(Engine, name)).parameters.keys()), name
    assert set(Engine.__annotations__) == {"micro_batch_size", "perturbations"}


def test_every_spec_is_reachable_by_name():
    assert set(SPECS) == {s.name for s in REGISTRY}


# ------------------------------------------------------------------------------- shared weights

EVERY_PERTURBATION = [*("trainer.noise_injection.enabled=true",
                        "trainer.noise_injection.preset=small"),
                      "actor_rollout_ref.rollout.quantization=int4",
                      "actor_rollout_ref.rollout.numerics=npu-like",
                      "actor_rollout_ref.rollout.activation_noise=0.05"]
# weight noise writes the Linear weights quantization writes: one or the other
WITH_WEIGHT_NOISE = [*(o for o in EVERY_PERTURBATION if ".quantization=" not in o),
                     "actor_rollout_ref.rollout.weight_noise.scale=0.1"]


def slots(model: nn.Module) -> dict[str, torch.Tensor]:
    return {slot: param for slot, _, _, param in parameter_slots(model)}


@pytest.mark.parametrize("perturbations, linear_writer", [
    (EVERY_PERTURBATION, "quant"), (WITH_WEIGHT_NOISE, "weight_noise")])
def test_writes_names_every_parameter_a_perturbation_changes(tmp_path, perturbations,
                                                             linear_writer):
    """The engine shares what no perturbation writes, so a missing entry would leak."""
    trainer = GRPOTrainer(smoke(tmp_path, *perturbations,
                                "actor_rollout_ref.rollout.share_weights=false"))
    engine = trainer.engine
    before = {k: p.detach().clone() for k, p in slots(engine.model).items()}
    engine.perturbations.apply(1)  # step 1: AQN's sigma is > 0
    declared = engine.perturbations.writes()
    changed = {k for k, p in slots(engine.model).items() if not torch.equal(p, before[k])}
    assert changed, "nothing changed: the test would prove nothing"
    assert all(id(slots(engine.model)[k]) in declared for k in changed), changed
    by_name = {p.name: len(p.writes()) for p in engine.perturbations.all}
    assert by_name["aqn"] > 0 and by_name[linear_writer] == 28  # every Linear but the head
    assert by_name["numerics"] == by_name["activation_noise"] == 0


@pytest.mark.parametrize("perturbations, min_shared", [
    (EVERY_PERTURBATION, 0.015),  # a quantized rollout owns its Linear weights: the embedding
    (EVERY_PERTURBATION[:2], 0.99),  # AQN alone owns the norm gains only
])
def test_shared_weights_cannot_leak_a_perturbation_into_the_trainer(tmp_path, perturbations,
                                                                   min_shared):
    trainer = GRPOTrainer(smoke(tmp_path, *perturbations))
    engine, policy = trainer.engine, trainer.policy
    mine, theirs = slots(engine.model), slots(policy)
    shared = [k for k in mine if mine[k] is theirs[k]]  # one tensor, not a copy
    total = sum(p.numel() for p in policy.parameters())
    assert sum({id(mine[k]): mine[k].numel() for k in shared}.values()) > min_shared * total
    written = engine.perturbations.writes()
    assert written and not any(id(mine[k]) in written for k in shared)
    assert all(mine[k].data_ptr() != theirs[k].data_ptr() for k in mine if k not in shared)
    prompts = trainer.train_prompts[:2]
    for step in (0, 1):  # AQN's sigma is 0 at step 0, > 0 at step 1
        engine.sync_weights(policy)
        clean = {k: p.detach().clone() for k, p in theirs.items()}
        engine.perturbations.apply(step)
        engine.generate(prompts, SamplingParams(8, n=2), seed=step)
        assert all(torch.equal(theirs[k], clean[k]) for k in theirs)  # nothing leaked
        perturbed = [k for k in mine if k not in shared and not torch.equal(mine[k], theirs[k])]
        assert perturbed or step == 0  # ... though the engine's own copies are perturbed
    engine.perturbations.restore()
    engine.sync_weights(policy)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # clean again: the same values
    with pytest.raises(ValueError, match="shares its weights"):
        engine.sync_weights(copy.deepcopy(policy))


def test_shared_and_copied_engines_train_the_same_run(tmp_path):
    rows = {}
    for share in ("true", "false"):
        train(smoke(tmp_path, *EVERY_PERTURBATION,
                    f"actor_rollout_ref.rollout.share_weights={share}", name=f"share-{share}"))
        rows[share] = [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))}
                       for r in read_metrics(tmp_path / f"share-{share}")]
    assert rows["true"] == rows["false"]


# ------------------------------------------------------- what each entry declares is true

ALL_ON = ["actor_rollout_ref.rollout.activation_noise=0.05",
          "actor_rollout_ref.rollout.activation_quantization=mxfp4",
          "actor_rollout_ref.rollout.kv_cache_dtype=fp8",
          "actor_rollout_ref.rollout.numerics=npu-like",
          "actor_rollout_ref.rollout.op_noise.scale=0.05",
          "trainer.noise_injection.enabled=true"]


@pytest.mark.parametrize("writer", ["quantization=int4", "weight_noise.scale=0.1"])
def test_each_entry_touches_and_writes_what_it_declares(tiny, writer):
    """``writes_linear_weights`` (the weight-sharing engine keeps its own Linear weights for
    those) matches what each built kernel writes, and every kernel names what it touches."""
    model, _ = tiny
    cfg = load_config("smoke", [*ALL_ON, f"actor_rollout_ref.rollout.{writer}"])
    built = build_perturbations(model, cfg)
    assert {spec.name for spec, _ in built} == {s.name for s in REGISTRY
                                                if s.side == "rollout"} - {
        "weight_noise" if writer.startswith("quant") else "quant"}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    for spec, kernel in built:
        assert spec.writes_linear_weights == bool({id(t) for t in kernel.writes()}
                                                  & linear_weights), spec.name
        paths = kernel.touches()
        assert paths and all(isinstance(p, str) for p in paths), spec.name
        known = {name for name, _ in model.named_modules()}
        assert {p.removesuffix(".pv") for p in paths} <= known, spec.name


def test_the_report_section_flag_replaces_a_name_check():
    assert [s.name for s in REGISTRY if s.own_report_section] == ["aqn"]
    assert [s.name for s in REGISTRY if s.vllm is not None] == ["quant", "aqn"]
    assert all(s.build_load is not None for s in REGISTRY if s.vllm == "load")
    # what the vLLM worker carries is aqn.rollout.vllm_worker's extension, which runs AQN
    # only: an entry declared "worker" needs its methods there (and in RemoteInjector's kin)
    assert [s.name for s in REGISTRY if s.vllm == "worker"] == ["aqn"]


# --------------------------------------------- the KV cache entry: one kernel + one spec

def test_kv_cache_fp8_rounds_what_attention_reads_and_restores_exactly(tiny):
    from aqn.quant import round_e4m3
    from aqn.quant.kv_cache import KVCacheQuantizer

    model, _ = tiny
    clean = logits(model)
    kv = KVCacheQuantizer(model, "fp8")
    assert kv.touches() == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(4)
                            for p in ("k", "v")]
    assert kv.apply(0) == {"kv_cache/num_modules": 8.0}
    seen = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.detach().clone()))  # after the kernel's hook
    rounded = logits(model)
    handle.remove()
    assert torch.equal(seen[0], round_e4m3(seen[0]))  # on the E4M3 grid already
    assert not torch.equal(rounded, clean)
    firing = kv.firing().metrics("kv_cache")
    assert firing["perturb/kv_cache/calls"] == 8 and firing["perturb/kv_cache/modules"] == 8
    assert 0 < firing["perturb/kv_cache/elements_changed"] <= firing["perturb/kv_cache/elements"]
    kv.restore()
    assert torch.equal(logits(model), clean)
    with pytest.raises(NoTargetsError, match="k_proj or v_proj"):
        KVCacheQuantizer(nn.Sequential(nn.Linear(4, 4)), "fp8")


def test_a_grpo_run_with_an_fp8_kv_cache_measures_its_mismatch(tmp_path):
    cfg = smoke(tmp_path, "actor_rollout_ref.rollout.kv_cache_dtype=fp8",
                "trainer.total_training_steps=2", "trainer.test_freq=2")
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] >= 1]
    assert all(r["kv_cache/num_modules"] == 8 and r["perturb/kv_cache/calls"] > 0 for r in rows)
    assert all(r["rollout_corr/abs_logp_diff_mean"] > 0 for r in rows)  # the engine differs
    assert rows[-1]["val-aux/kv_cache/num_modules"] == 8  # kept in validation
    assert "rollout kv_cache (actor_rollout_ref.rollout.kv_cache_dtype; in validation: yes): " \
           "8 modules" in (tmp_path / "run" / "plan.txt").read_text()
    # the report's per-perturbation section comes from the spec alone
    md = build_report([tmp_path / "run"], tmp_path / "report").markdown
    assert "KV cache quantization of the rollout (vLLM's kv_cache_dtype=fp8)" in md
    assert "kv_cache/num_modules" in md and "perturb/kv_cache/elements_changed" in md
