"""aqn.integrations.verl: the block resolved and frozen in the driver, parsed back by Hydra
(verl's own parser, in the peers set-up) and composed into verl's own ppo_trainer config; the
worker extension on a model with vLLM's module names and classes. The same extension inside
real vLLM: tests/test_vllm.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from aqn.errors import ConfigError, NoTargetsError
from aqn.integrations.verl import (
    ENGINE,
    EXTENSION,
    command,
    frozen_block,
    hydra_value,
    make_extension,
)
from aqn.noise import NoiseInjectionConfig
from aqn.rollout.vllm_worker import CONFIG_KEY, METRICS_KEY, START_KEY, worker_noise_config
from conftest import peer

SIGMA = 0.05
ON = {"enabled": True, "sigma_start": SIGMA, "sigma_end": SIGMA, "num_stages": 3,
      "total_steps": 6, "seed": 7}


def parse(overrides: list[str]) -> dict:
    peer("hydra")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}


def launch(*argv: str) -> tuple[list[str], dict]:
    peer("hydra")  # the launcher parses with verl's parser
    cmd = command(list(argv))
    assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"]
    return cmd[3:], parse(cmd[3:])


ADVERSARIAL = [
    ON,
    {**ON, "preset": "qerl", "sigma_start": None, "sigma_end": None, "num_stages": None,
     "total_steps": 20},
    {**ON, "sigma_start": 1e-7, "sigma_end": 3.3e-9, "mode": "multiplicative",
     "distribution": "uniform", "include_final_norm": False},
    {**ON, "target_modules": ["model.layers.0.input_layernorm"],
     "exclude_patterns": ["it's \\ odd", "a,b", "{x:1}", "ends\\", "a\\'b\\\\'", "$x"],
     "class_patterns": ["rmsnorm", "norm"]},
    {**ON, "layer_multipliers": {0: 2.0, 1: 0.5}, "default_multiplier": 0.25},
    {**ON, "layer_multipliers": [1.0, 0.0]},
]


@pytest.mark.parametrize("block", ADVERSARIAL)
def test_the_frozen_block_survives_verls_parser_and_the_worker_rebuilds_it_exactly(block):
    argv = [f"+trainer.noise_injection.{k}={hydra_value(v)}" for k, v in block.items()]
    rest, parsed = launch("data.train_files=/data/train.parquet", *argv)
    assert parsed[f"{ENGINE}.worker_extension_cls"] == EXTENSION
    assert parsed["data.train_files"] == "/data/train.parquet"
    assert not any("noise_injection" in a for a in rest)  # nothing left for verl to ignore
    shipped = parsed[f"{ENGINE}.additional_config"]
    in_worker = worker_noise_config(shipped)  # what each vLLM worker builds
    expected = NoiseInjectionConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in block.items()}).resolved()
    assert in_worker == expected
    schedule = in_worker.sigma_schedule()
    assert [schedule.stage_sigma(schedule.stage(t)) for t in range(6)] == [
        expected.sigma_schedule().stage_sigma(expected.sigma_schedule().stage(t))
        for t in range(6)]
    # resolving again in the worker changes nothing: the driver's block is final
    assert frozen_block(in_worker) == shipped[CONFIG_KEY]


def test_the_launcher_fills_the_schedule_from_verls_keys_and_refuses_bad_blocks():
    peer("hydra")
    _, parsed = launch("trainer.total_training_steps=30", "+trainer.noise_injection.enabled=true",
                       "+trainer.noise_injection.seed=3")
    block = parsed[f"{ENGINE}.additional_config"][CONFIG_KEY]
    assert (block["total_steps"], block["seed"], block["preset"]) == (30, 3, "qerl")
    assert (block["sigma_start"], block["num_stages"]) == (0.05, 10)  # QeRL's values
    rest, parsed = launch("trainer.total_training_steps=30",
                          "+trainer.noise_injection.enabled=false")
    assert rest == ["trainer.total_training_steps=30"]  # off: verl runs as is
    for argv, key in [
        (["+trainer.noise_injection.enabled=true", "+trainer.noise_injection.sigma_strat=0.1"],
         "trainer.noise_injection.sigma_strat"),
        (["+trainer.noise_injection.enabled=true", "+trainer.noise_injection.seed=1"],
         "trainer.noise_injection.total_steps"),  # verl derives the length later: say it
        (["trainer.total_training_steps=9", "+trainer.noise_injection.enabled=true"],
         "trainer.noise_injection.seed"),
        (["+trainer.noise_injection.enabled=true", "+trainer.noise_injection.seed=1",
          "trainer.total_training_steps=9", "+trainer.noise_injection.num_stages=0"],
         "trainer.noise_injection.num_stages"),
        ([f"+{ENGINE}.worker_extension_cls=x.Y", "+trainer.noise_injection.enabled=true"],
         f"{ENGINE}.worker_extension_cls"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            command(argv)


def test_the_overrides_compose_into_verls_own_config():
    """Hydra composes verl 0.9.1's ppo_trainer.yaml with the overrides; verl's RolloutConfig
    carries the block to the vLLM server as a plain dict."""
    peer("hydra"), peer("verl")
    import verl
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    rest, _ = launch("trainer.total_training_steps=12", "+trainer.noise_injection.enabled=true",
                     "+trainer.noise_injection.seed=5")
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=rest)
    OmegaConf.resolve(cfg)  # as verl's TaskRunner does before building workers
    vllm_kwargs = OmegaConf.to_container(cfg.actor_rollout_ref.rollout.engine_kwargs.vllm)
    assert vllm_kwargs["worker_extension_cls"] == EXTENSION
    config = worker_noise_config(vllm_kwargs["additional_config"])
    assert (config.total_steps, config.seed, config.enabled) == (12, 5, True)


class RMSNorm(nn.Module):  # vLLM's class name; aqn's class-name rule must find it
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))


def vllm_named_model(layers: int = 2, hidden: int = 64) -> nn.Module:
    """A model with vLLM's Qwen3 module paths: q/k norms, the two per-layer norms, model.norm."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    for _ in range(layers):
        layer = nn.Module()
        layer.input_layernorm, layer.post_attention_layernorm = RMSNorm(hidden), RMSNorm(hidden)
        layer.self_attn = nn.Module()
        layer.self_attn.q_norm, layer.self_attn.k_norm = RMSNorm(16), RMSNorm(16)
        layer.mlp = nn.Linear(hidden, hidden, bias=False)
        model.model.layers.append(layer)
    model.model.norm = RMSNorm(hidden)
    return model


class FakeVerlExtension:
    """verl's vLLMColocateWorkerExtension reduced to what the sync does to the model."""

    def update_weights_from_ipc(self, weights: dict, peft_config=None, base_sync_done=False):
        self.model_runner.model.load_state_dict(weights, strict=False)  # copy_, in place
        return "synced"


def worker(noise: dict | None, seed: int = 0, metrics_file: Path | None = None,
           rank: int = 0, start_step: int | None = None):
    ext = make_extension(FakeVerlExtension)()
    ext.rank = rank  # vLLM's Worker.rank
    ext.model_runner = type("Runner", (), {})()
    ext.model_runner.model = vllm_named_model()
    ext.vllm_config = type("VllmConfig", (), {})()
    ext.vllm_config.additional_config = None if noise is None else {CONFIG_KEY: noise}
    if metrics_file is not None:
        ext.vllm_config.additional_config[METRICS_KEY] = str(metrics_file)
    if start_step is not None:
        ext.vllm_config.additional_config[START_KEY] = start_step
    return ext


def trainer_weights(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
            for k, v in vllm_named_model().state_dict().items()}


def norms(ext) -> dict:
    return {k: v.clone() for k, v in ext.model_runner.model.state_dict().items() if "norm" in k}


def test_each_sync_is_clean_plus_the_steps_noise_on_every_rank_never_accumulated():
    rank0, rank1 = worker(ON), worker(ON)
    ptrs = {k: v.data_ptr() for k, v in rank0.model_runner.model.state_dict().items()}
    step_weights = [trainer_weights(s) for s in range(4)]
    seen = []
    for step, weights in enumerate(step_weights):
        assert rank0.update_weights_from_ipc(weights) == "synced"
        rank1.update_weights_from_ipc(weights)
        now = norms(rank0)
        assert now.keys() == norms(rank1).keys() and len(now) == 9
        for k in now:
            assert torch.equal(now[k], norms(rank1)[k])  # tensor-parallel ranks agree
            delta = now[k].float() - weights[k].float()
            if step < 2:  # stage 0 of 3 over 6 steps: QeRL's warm-up, no noise
                assert torch.equal(now[k], weights[k])
            else:
                assert delta.abs().max() > 0
        seen.append(now)
        report = rank0.aqn_report()
        assert report["aqn/num_modules"] == 9
        assert report["aqn/sigma"] == (0.0 if step < 2 else SIGMA)
    assert {k: v.data_ptr() for k, v in rank0.model_runner.model.state_dict().items()} == ptrs
    d = torch.cat([seen[3][k].float().flatten() - step_weights[3][k].float().flatten()
                   for k in seen[3]])
    assert 0.7 * SIGMA < d.std().item() < 1.3 * SIGMA

    # a sync that sends no norm (an adapter-only update): the clean copy stays, noise is
    # re-drawn for the new step, not added to the old
    rank0.aqn_set_step(2)
    rank0.update_weights_from_ipc({"model.layers.0.mlp.weight": step_weights[3][
        "model.layers.0.mlp.weight"]})
    rank1.aqn_set_step(2)
    rank1.update_weights_from_ipc(step_weights[3])
    for k, v in norms(rank0).items():
        assert torch.equal(v, norms(rank1)[k])


def test_the_worker_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="additional_config.aqn_noise"):
        worker(None).update_weights_from_ipc(trainer_weights(0))
    with pytest.raises(ConfigError, match=r"aqn_noise\.fp32_targets"):
        worker({**ON, "fp32_targets": True}).update_weights_from_ipc(trainer_weights(0))
    with pytest.raises(ConfigError, match=r"aqn_noise\.total_steps"):
        worker({**ON, "total_steps": None}).update_weights_from_ipc(trainer_weights(0))
    with pytest.raises(NoTargetsError):  # the seed's bug: a class check that matches nothing
        worker({**ON, "class_patterns": ["llamarmsnorm"]}).update_weights_from_ipc(
            trainer_weights(0))
    off = worker({**ON, "enabled": False})
    off.update_weights_from_ipc(trainer_weights(0))
    assert all(torch.equal(v, trainer_weights(0)[k]) for k, v in norms(off).items())
    assert off.aqn_report() == {}


def test_the_gpu_recipe_composes_with_verls_config_and_carries_the_frozen_block():
    """examples/verl's command line, its shell variables filled in, through the launcher and
    Hydra into verl's own config: every key it sets exists in verl 0.9.1."""
    peer("hydra"), peer("verl")
    import shlex
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir

    script = Path(__file__).parents[1] / "examples/verl/run_qwen2_5_1_5b_gsm8k_aqn.sh"
    text = script.read_text().split("python3 -m aqn.integrations.verl", 1)[1]
    for name, value in {"$DATA": "/data", "$MODEL": "m", "$RUN": "r", "$STEPS": "232",
                        "$SEED": "1", '"$@"': ""}.items():
        text = text.replace(name, value)
    argv = shlex.split(text.replace("\\\n", " "))
    rest, _ = launch(*argv)
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose("ppo_trainer", overrides=rest)  # an unknown key raises here
    assert cfg.trainer.logger == ["console", "file"]
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    block = cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.additional_config[CONFIG_KEY]
    assert (block.total_steps, block.seed, block.sigma_start, block.num_stages) == (
        232, 1, 0.05, 10)


def test_the_launcher_sends_the_workers_metrics_beside_verls_log(tmp_path, monkeypatch):
    """The workers' metrics file is verl's FileLogger path with .aqn.jsonl, made absolute in
    the driver (Ray workers do not share its working directory)."""
    on = ("trainer.total_training_steps=20", "+trainer.noise_injection.enabled=true",
          "+trainer.noise_injection.seed=1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.delenv("VERL_FILE_LOGGER_ROOT", raising=False)

    def shipped(*argv: str) -> str:
        return launch(*on, *argv)[1][f"{ENGINE}.additional_config"][METRICS_KEY]

    assert shipped("trainer.project_name=p", "trainer.experiment_name=aqn-seed1") == str(
        tmp_path / "p" / "aqn-seed1.aqn.jsonl")
    peer("verl")  # unset names: verl's own defaults (ppo_trainer.yaml)
    assert shipped() == str(tmp_path / "verl_examples" / "gsm8k.aqn.jsonl")
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", "logs")
    assert shipped("trainer.experiment_name=e") == str(tmp_path / "logs/verl_examples/e.aqn.jsonl")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "runs/verl/x.jsonl")  # verl's first choice
    assert shipped("trainer.experiment_name=e") == str(tmp_path / "runs/verl/x.aqn.jsonl")


def test_one_worker_logs_the_noise_beside_verls_log_and_the_report_merges_it(tmp_path,
                                                                            monkeypatch):
    """verl's own FileLogger writes the run's metrics; the first rank of the first replica
    writes aqn/* at the step each sync feeds (sync k -> step k + 1); the report reads both."""
    tracking = peer("verl.utils.tracking")
    from aqn.experiments.report import build_report
    from aqn.experiments.runs import find_runs

    log = tmp_path / "runs" / "verl" / "aqn-seed1.jsonl"
    aqn_log = log.with_name("aqn-seed1.aqn.jsonl")
    aqn_log.parent.mkdir(parents=True)
    aqn_log.write_text('{"step": 99, "data": {"aqn/sigma": 9.0}}\n')  # an older run's
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    logger = tracking.FileLogger("aqn", "aqn-seed1")
    writers = [worker(ON, metrics_file=aqn_log), worker(ON, metrics_file=aqn_log, rank=1)]
    monkeypatch.setenv("VERL_REPLICA_RANK", "1")
    other_replica = worker(ON, metrics_file=tmp_path / "other.aqn.jsonl")
    other_replica.update_weights_from_ipc(trainer_weights(0))
    assert not (tmp_path / "other.aqn.jsonl").exists()
    monkeypatch.delenv("VERL_REPLICA_RANK")
    for w in writers:  # verl's init: sync 0, then validation at step 0
        w.update_weights_from_ipc(trainer_weights(0))
    logger.log(data={"val-core/openai/gsm8k/acc/mean@1": 0.3}, step=0)
    for step in range(1, 6):  # rollout, update, sync (it feeds the next step)
        logger.log(data={"critic/score/mean": 0.1 * step}, step=step)
        for w in writers:
            w.update_weights_from_ipc(trainer_weights(step))
    logger.log(data={"val-core/openai/gsm8k/acc/mean@1": 0.5}, step=5)
    logger.finish()

    rows = [json.loads(line) for line in aqn_log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer, the old file gone
    assert [r["data"]["aqn/sigma"] for r in rows] == [0, 0, SIGMA, SIGMA, SIGMA, SIGMA]
    [run] = find_runs([log, aqn_log])  # the .aqn.jsonl is part of the run, not a run
    assert run.aqn_enabled and run.accuracy == {0: 0.3, 5: 0.5}
    assert run.series("aqn/num_modules") == {s: 9 for s in range(1, 7)}
    assert run.series("critic/score/mean")[3] == pytest.approx(0.3)
    r = build_report([log], tmp_path / "report")
    assert "is not known here" not in r.markdown
    section = r.markdown[r.markdown.index("## 4."):]
    stage1 = next(line for line in section.splitlines() if line.startswith("| 1 |"))
    assert stage1.startswith("| 1 | 2 | 0.05 |") and stage1.endswith("| 9 |")  # 9 norms
    log.unlink()
    with pytest.raises(ValueError, match="verl's log aqn-seed1.jsonl is not beside it"):
        find_runs([aqn_log])


def test_a_resumed_run_continues_the_noise_schedule_where_verl_resumes(tmp_path, monkeypatch):
    """The launcher finds the step verl will resume at (its resume_mode rules, its own
    find_latest_ckpt_path); the workers' first sync then feeds that step, not step 0."""
    on = ("trainer.total_training_steps=6", "+trainer.noise_injection.enabled=true",
          "+trainer.noise_injection.seed=7", "+trainer.noise_injection.sigma_start=0.05",
          "+trainer.noise_injection.sigma_end=0.05", "+trainer.noise_injection.num_stages=3",
          "trainer.project_name=p", "trainer.experiment_name=e")
    monkeypatch.chdir(tmp_path)

    def start(*argv: str) -> int:
        return launch(*on, *argv)[1][f"{ENGINE}.additional_config"][START_KEY]

    peer("verl")
    assert start() == 0  # no checkpoint yet: from scratch
    checkpoints = tmp_path / "checkpoints" / "p" / "e"  # verl's default_local_dir
    (checkpoints / "global_step_4").mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("4")
    assert start() == 4
    assert start("trainer.resume_mode=disable") == 0
    assert start("trainer.resume_mode=resume_path",
                 "trainer.resume_from_path=/ckpt/global_step_2") == 2

    aqn_log = tmp_path / "e.aqn.jsonl"
    resumed = worker(ON, metrics_file=aqn_log, start_step=4)
    resumed.update_weights_from_ipc(trainer_weights(4))
    fresh = worker(ON)
    fresh.aqn_set_step(4)
    fresh.update_weights_from_ipc(trainer_weights(4))
    assert resumed.aqn_report()["aqn/sigma"] == SIGMA  # step 4: stage 2, not the warm-up
    assert norms(resumed).keys() == norms(fresh).keys()
    assert all(torch.equal(v, norms(fresh)[k]) for k, v in norms(resumed).items())
    assert json.loads(aqn_log.read_text())["step"] == 5  # the row of the step it feeds


def test_an_aqn_error_in_vllms_worker_is_raised_in_the_driver_as_itself():
    """vLLM passes on only a worker exception's text; the extension returns aqn's errors as
    values, and the driver raises the same class with the same message and key."""
    from aqn.rollout.vllm_worker import AQNWorkerExtension, raise_worker_error

    class Worker(AQNWorkerExtension):  # vLLM's worker, as far as the extension reads it
        def __init__(self, additional_config, model):
            self.vllm_config = type("VllmConfig", (), {"additional_config": additional_config})
            self.model_runner = type("ModelRunner", (), {"model": model})

    model = nn.Sequential(nn.Linear(4, 4))  # no norm at all
    with pytest.raises(NoTargetsError, match="AQN matched 0 modules in Sequential"):
        raise_worker_error(Worker({CONFIG_KEY: {"enabled": True, "total_steps": 4,
                                                "seed": 1}}, model).aqn_targets())
    with pytest.raises(ConfigError) as e:
        raise_worker_error(Worker({}, model).aqn_apply(3))
    assert e.value.key.endswith("additional_config.aqn_noise") and "missing" in e.value.message
    with pytest.raises(ConfigError) as e:  # a key the block does not have: named in full
        raise_worker_error(Worker({CONFIG_KEY: {"enabled": True, "sigma": 1}}, model)
                           .aqn_targets())
    assert e.value.key.endswith("aqn_noise.sigma")
    assert raise_worker_error(Worker({CONFIG_KEY: {"enabled": False}}, model).aqn_targets()) \
        == []
