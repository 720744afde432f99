import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from aqn.config import ConfigError, load_config
from aqn.errors import NoTargetsError, TrainingError
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from aqn.rollout.base import SamplingParams
from conftest import smoke, train_until

# AQN preset "small" (K=5) over the 4 smoke steps: sigma 0 at step 0, then 0.01, 0.0046, 0.0022
AQN = ["trainer.noise_injection.enabled=true", "trainer.noise_injection.preset=small"]


def record_gradients(trainer: GRPOTrainer) -> list[torch.Tensor]:
    """Give the trainer a reward with advantages (the random model never answers right: the
    length's parity) and return the list each optimizer step appends its flat gradient to."""
    trainer.reward_fn = lambda response, truth: float(len(response) % 2)
    grads: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def record_then_step():
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters()]))
        step()

    trainer.optimizer.step = record_then_step
    return grads


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("timing_s/", "perf/throughput"))}


def test_mismatch_is_exactly_zero_without_perturbation(tmp_path):
    train(smoke(tmp_path))
    rows = [r for r in read_metrics(tmp_path / "run") if "rollout_corr/kl" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["rollout_corr/abs_logp_diff_max"] == 0.0
        assert r["rollout_corr/kl"] == 0.0 and r["rollout_corr/k3_kl"] == 0.0
        assert r["training/rollout_probs_diff_max"] == 0.0
        assert r["training/rollout_actor_probs_pearson_corr"] == pytest.approx(1.0, abs=1e-14)
        assert r["rollout_corr/ppl_ratio"] == 1.0
        assert "aqn/sigma" not in r


@pytest.mark.parametrize("lora", ["0", "4"])
def test_unperturbed_engine_recompute_equals_the_trainer_bit_for_bit(tmp_path, lora):
    """Why the trainer may skip the engine's recompute pass when nothing perturbs it."""
    trainer = GRPOTrainer(smoke(tmp_path, f"actor_rollout_ref.actor.lora.rank={lora}",
                                "actor_rollout_ref.actor.lora.trainable_norms=true"))
    trainer.reward_fn = lambda response, truth: float(len(response) % 2)  # gives advantages
    trainer.step(0)  # the weights moved: the engine copy is now stale until the next sync
    trainer.engine.sync_weights(trainer.policy)
    assert not trainer.engine.perturbations.perturbed
    batch = trainer.engine.generate(trainer.train_prompts[:4], SamplingParams(12, n=2), seed=3)
    engine_scores = trainer.engine.logprobs(batch, temperature=1.0)
    assert torch.equal(engine_scores, trainer.logprobs(trainer.policy, batch).log_probs)
    assert engine_scores.abs().sum() > 0


def test_aqn_noise_reaches_the_rollout_and_shows_as_mismatch(tmp_path):
    train(smoke(tmp_path, *AQN))
    rows = [r for r in read_metrics(tmp_path / "run") if "aqn/sigma" in r]
    assert [r["aqn/stage"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["aqn/sigma"] == 0 and rows[0]["rollout_corr/abs_logp_diff_max"] == 0.0
    for r, sigma in zip(rows[1:], (0.01, 0.004642, 0.002154), strict=True):
        assert r["aqn/sigma"] == pytest.approx(sigma, rel=1e-3)
        assert r["aqn/effective_std"] == pytest.approx(sigma, rel=0.2)
        assert r["aqn/num_modules"] == 9
        assert r["rollout_corr/abs_logp_diff_mean"] > 0
        assert r["training/rollout_actor_probs_pearson_corr"] < 1.0


def test_decode_log_probs_are_close_but_measured(tmp_path):
    train(smoke(tmp_path, "actor_rollout_ref.rollout.log_prob_source=decode"))
    rows = [r for r in read_metrics(tmp_path / "run") if "rollout_corr/kl" in r]
    assert all(r["rollout_corr/abs_logp_diff_max"] < 1e-4 for r in rows)
    # KV-cache decoding rounds differently from one full forward pass: the decode
    # log-probs are really used (recompute gives exactly 0, the test above)
    assert all(r["rollout_corr/abs_logp_diff_max"] > 0 for r in rows)


def test_training_copy_is_never_perturbed(tmp_path):
    cfg = smoke(tmp_path, *AQN, "actor_rollout_ref.actor.optim.lr=0.0",
                "trainer.val_before_train=false", "trainer.test_freq=0")
    trainer = GRPOTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    for step in range(4):
        trainer.step(step)
    engine_norm = trainer.engine.model.model.norm.weight
    assert not torch.equal(engine_norm, before["model.norm.weight"])  # the engine is noisy
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(v, before[k]), k  # lr 0: the trainer's copy is untouched


def test_run_directory_contents(tmp_path):
    train(smoke(tmp_path, *AQN))
    run = tmp_path / "run"
    assert (run / "config.yaml").read_text().startswith("# aqn config, hash ")
    assert sorted(p.name for p in (run / "val").iterdir()) == [
        "step_0.jsonl", "step_2.jsonl", "step_4.jsonl"]
    rows = [json.loads(x) for x in (run / "val" / "step_4.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert set(rows[0]) == {"id", "prompt", "response", "extracted", "ground_truth", "score",
                            "correct"}
    assert all(r["correct"] == (r["score"] == 1.0) for r in rows)
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]
    last = metrics[-1]
    for key in ("actor/entropy", "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm",
                "critic/score/mean", "response_length/mean", "timing_s/gen",
                "timing_s/update_weights", "timing_s/perturb", "timing_s/old_log_prob",
                "timing_s/update_actor",
                "timing_s/reward", "perf/throughput", "aqn/effective_std",
                "val-core/arith/reward/mean@1"):
        assert key in last and math.isfinite(last[key]), key
    # the newest two are kept (trainer.max_actor_ckpt_to_keep)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]


def test_resume_gives_the_same_run(tmp_path, monkeypatch):
    train(smoke(tmp_path, *AQN, name="straight"))

    train_until(monkeypatch, smoke(tmp_path, *AQN, name="stopped"), stop=3)
    # step 3 was logged but not checkpointed (checkpoint at 2): resume redoes it
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [0, 1, 2, 3]
    train(smoke(tmp_path, *AQN, "trainer.resume=true", name="stopped"))

    straight = [deterministic(r) for r in read_metrics(tmp_path / "straight")]
    resumed = [deterministic(r) for r in read_metrics(tmp_path / "stopped")]
    assert resumed == straight  # same rewards, losses, mismatch and noise draws
    a = load_file(tmp_path / "straight/checkpoints/step_4/model.safetensors")
    b = load_file(tmp_path / "stopped/checkpoints/step_4/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config(tmp_path):
    train(smoke(tmp_path))
    with pytest.raises(ConfigError, match="config differs in actor_rollout_ref.rollout.n"):
        GRPOTrainer(smoke(tmp_path, "trainer.resume=true", "actor_rollout_ref.rollout.n=2"))


def test_resume_accepts_a_run_written_before_a_key_existed(tmp_path):
    """A run from an aqn without a later key resumes if the key keeps its default."""
    train(smoke(tmp_path))
    config = tmp_path / "run" / "config.yaml"
    lines = config.read_text().splitlines(keepends=True)
    older = "".join(x for x in lines if x.strip() != "activation_noise: 0.0")
    assert len(older) < sum(map(len, lines))
    config.write_text(older)
    GRPOTrainer(smoke(tmp_path, "trainer.resume=true"))  # resumes
    config.write_text(older)
    with pytest.raises(ConfigError, match="differs in actor_rollout_ref.rollout.activation_noise"):
        GRPOTrainer(smoke(tmp_path, "trainer.resume=true",
                          "actor_rollout_ref.rollout.activation_noise=0.1"))


def test_no_targets_fails_before_training(tmp_path):
    cfg = smoke(tmp_path, *AQN, "trainer.noise_injection.class_patterns=[layernorm]")
    with pytest.raises(NoTargetsError, match="LlamaRMSNorm x9"):
        train(cfg)
    assert read_metrics(tmp_path / "run") == []


def test_nan_reward_stops_with_a_clear_message(tmp_path, monkeypatch):
    cfg = smoke(tmp_path, "trainer.val_before_train=false")
    trainer = GRPOTrainer(cfg)
    trainer.reward_fn = lambda response, truth: float("nan")
    with pytest.raises(TrainingError, match="non-finite reward at step 0"):
        trainer.fit()


@pytest.mark.parametrize("overrides, message", [
    (["data.train_batch_size=3", "actor_rollout_ref.actor.ppo_mini_batch_size=2"],
     "must be divisible by ppo_mini_batch_size"),
    (["actor_rollout_ref.actor.ppo_micro_batch_size=5"], "divisible by ppo_micro_batch_size"),
    (["data.max_train_samples=0"], "'data.max_train_samples': must be > 0"),
    (["data.train_batch_size=128"], "fewer than one batch"),
    (["data.max_prompt_length=10"], "more than data.max_prompt_length=10"),
])
def test_bad_input(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(smoke(tmp_path, *overrides))


def test_presets_validate():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config("tiny", ["trainer.noise_injection.enabled=true"])
    assert cfg.trainer.noise_injection.total_steps == 40
    assert cfg.actor_rollout_ref.model.path == "tiny-base"
    # the CPU testbed: symbolic problems, 8 prompts x 8 completions, lr 1e-4
    assert (cfg.data.wording, cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n,
            cfg.actor_rollout_ref.actor.optim.lr) == ("symbols", 8, 8, 1e-4)


def gsm8k_folder(root, n_train=520, n_test=20):
    """A folder of GSM8K-format files (the presets read the hub copy; tests pass a folder)."""
    root.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1\n#### {i + 1}"}
                for i in range(n)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_shipped_presets_validate(tmp_path):
    from importlib import resources

    from aqn.config import preset_names

    assert {"smollm2-gsm8k", "smollm2-arith", "seed-qwen2.5-1.5b-gsm8k"} <= set(preset_names())
    for name in ("smollm2-gsm8k", "seed-qwen2.5-1.5b-gsm8k"):  # no folder only we have
        text = (resources.files("aqn.configs") / f"{name}.yaml").read_text()
        assert "  path: openai/gsm8k" in text and "shared/data" not in text
    gsm8k = gsm8k_folder(tmp_path / "gsm8k")
    seed = load_config("seed-qwen2.5-1.5b-gsm8k", ["aqn=qerl", f"data.path={gsm8k}"])
    arr = seed.actor_rollout_ref
    assert arr.model.path == "Qwen/Qwen2.5-1.5B-Instruct" and arr.model.dtype == "bfloat16"
    assert seed.data.source == "gsm8k" and seed.data.prompt_style == "verl"
    assert (arr.actor.optim.lr, arr.actor.kl_loss_coef, arr.actor.kl_loss_type) == \
        (1e-6, 0.001, "low_var_kl")
    assert arr.actor.use_kl_loss and arr.actor.clip_ratio_low == arr.actor.clip_ratio_high == 0.2
    assert seed.trainer.test_freq == 20 and seed.trainer.noise_injection.total_steps == 116
    assert seed.trainer.noise_injection.enabled and seed.reward.method == "strict"
    for name in ("smollm2-gsm8k", "smollm2-arith"):
        cfg = load_config(name, ["aqn=mild", *[f"data.path={gsm8k}"] * (name == "smollm2-gsm8k")])
        assert cfg.actor_rollout_ref.model.path == "smollm2-135m-instruct"
        assert cfg.actor_rollout_ref.actor.lora.rank == 16
        assert cfg.trainer.noise_injection.sigma_start == 0.025
    assert not load_config("smollm2-arith", ["aqn=off"]).trainer.noise_injection.enabled
    with pytest.raises(ConfigError, match="aqn= takes one of qerl"):
        load_config("smollm2-arith", ["aqn=loud"])
    with pytest.raises(ConfigError, match="quantized policy trains through LoRA"):
        load_config("tiny", ["actor_rollout_ref.actor.quantization=nvfp4"])
    with pytest.raises(ConfigError, match="unknown profile 'tpu'"):
        load_config("tiny", ["actor_rollout_ref.rollout.numerics=tpu"])


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write the run directory"):
        train(smoke(blocker))


def test_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    train(smoke(tmp_path, "trainer.logger=[jsonl,tensorboard]", "trainer.total_training_steps=2",
                "trainer.save_freq=0"))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_any_hugging_face_model_by_local_path(tmp_path):
    from aqn.models import build_tiny

    model, tokenizer = build_tiny(seed=3)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    final = train(smoke(tmp_path, f"actor_rollout_ref.model.path={tmp_path / 'hf'}",
                        "trainer.total_training_steps=1", "trainer.save_freq=0"))
    assert "val-core/arith/reward/mean@1" in final and "actor/entropy" in final


def test_validation_is_clean_unless_asked(tmp_path, monkeypatch):
    calls = []
    original = GRPOTrainer.validate

    def spy(self, step, val=None, clean=False):
        result = original(self, step, val, clean)
        calls.append(self.engine.perturbations.all[0].injector.applied_step)
        return result

    monkeypatch.setattr(GRPOTrainer, "validate", spy)
    train(smoke(tmp_path, *AQN, name="clean"))
    assert calls == [None, None, None]  # steps 0, 2, 4 validated on clean weights
    calls.clear()
    run = smoke(tmp_path, *AQN, "trainer.validate_with_perturbation=true", name="noisy")
    train(run)
    # and the final policy once more with no noise at all (trainer.validate_clean_at_end)
    assert calls == [0, 2, None, 4]
    run_dir = tmp_path / "noisy"
    items = [json.loads(line) for line in (run_dir / "val" / "clean_step_4.jsonl").open()]
    assert len(items) == 8
    last = read_metrics(run_dir)[-1]
    assert last["val-clean/arith/acc/mean@1"] == sum(it["correct"] for it in items) / 8


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum-norm",
                                  "seq-mean-token-mean"])
def test_micro_batch_size_does_not_change_the_update(tmp_path, mode):
    """The gradient of a mini-batch is the same whatever the micro-batch split."""
    grads = {}
    for micro in (16, 4):
        cfg = smoke(tmp_path, f"actor_rollout_ref.actor.ppo_micro_batch_size={micro}",
                    f"actor_rollout_ref.actor.loss_agg_mode={mode}",
                    "actor_rollout_ref.actor.grad_clip=1e9", "trainer.val_before_train=false",
                    name=f"{mode}-{micro}")
        trainer = GRPOTrainer(cfg)
        captured = record_gradients(trainer)
        trainer.step(0)
        grads[micro] = captured[0]
    assert grads[16].abs().max() > 1e-3
    torch.testing.assert_close(grads[4], grads[16], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("actor_rollout_ref.actor.ppo_mini_batch_size=-4", "'actor_rollout_ref.actor.ppo_mini_batch"),
    ("actor_rollout_ref.actor.grad_clip=0", "'actor_rollout_ref.actor.grad_clip': must be > 0"),
    ("actor_rollout_ref.actor.optim.lr=.nan", "'actor_rollout_ref.actor.optim.lr': must be"),
    ("actor_rollout_ref.actor.optim.betas=[0.9]", "must be two numbers"),
])
def test_silently_wrong_optimizer_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    from aqn.rl.checkpoint import checkpoint_steps

    for name in ("step_2", "step_4.tmp"):  # a crash while saving step 4
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "state.json").write_text("{}")
    assert checkpoint_steps(tmp_path) == [(2, tmp_path / "checkpoints" / "step_2")]


def test_training_signal_metrics_match_the_rewards(tmp_path):
    """actor/zero_adv_frac and critic/acc/mean, recomputed from the rewards the step saw."""
    trainer = GRPOTrainer(smoke(tmp_path, "trainer.val_before_train=false"))
    seen = []

    def reward(response, truth):  # scores 1 for even lengths: some groups mixed, some not
        seen.append(float(len(response) % 2 == 0))
        return seen[-1]

    trainer.reward_fn = reward
    metrics = trainer.step(0)
    n = trainer.cfg.actor_rollout_ref.rollout.n
    groups = [seen[i:i + n] for i in range(0, len(seen), n)]
    assert metrics["actor/zero_adv_frac"] == sum(len(set(g)) == 1 for g in groups) / len(groups)
    assert metrics["critic/acc/mean"] == pytest.approx(sum(seen) / len(seen))
    assert metrics["critic/acc/mean"] == pytest.approx(metrics["critic/score/mean"])


def test_sampled_validation_gives_pass_at_k_beside_the_greedy_file(tmp_path):
    from aqn.config.schema import ValKwargs

    trainer = GRPOTrainer(smoke(tmp_path))
    trainer.reward_fn = lambda response, truth: float(response.startswith(("1", "2", "3")))
    greedy = trainer.validate(0)
    sampled = trainer.validate(0, ValKwargs(do_sample=True, temperature=1.0, n=4))
    val = tmp_path / "run" / "val"
    assert sorted(p.name for p in val.iterdir()) == ["sampled@4_step_0.jsonl", "step_0.jsonl"]
    rows = [json.loads(x) for x in (val / "sampled@4_step_0.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * len(trainer.val_records)
    by_id: dict[str, list[bool]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r["correct"])
    assert sampled["val-aux/arith/acc/pass@4"] == sum(map(any, by_id.values())) / len(by_id)
    assert sampled["val-aux/arith/zero_adv_frac"] == (
        sum(len(set(v)) == 1 for v in by_id.values()) / len(by_id))
    assert sampled["val-core/arith/acc/mean@4"] == sum(r["correct"] for r in rows) / len(rows)
    assert sampled["val-aux/arith/acc/pass@4"] >= sampled["val-core/arith/acc/mean@4"]
    assert "val-aux/arith/acc/pass@1" not in greedy


def test_a_redirected_log_gets_a_plain_line_per_step(tmp_path, capsys):
    train(smoke(tmp_path, "trainer.progress_bar=true"))  # stderr is not a TTY under pytest
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "\r" not in err and "reward " in lines[0] and " time " in lines[0]


@pytest.mark.parametrize("extra", [
    [],  # an unperturbed engine: its recompute is skipped, rollout = old log-probs
    [*AQN, "algorithm.rollout_correction.rollout_is=token"],  # noisy rollout, TIS on
    [*AQN, "algorithm.rollout_correction.rollout_is=sequence",
     "actor_rollout_ref.actor.entropy_coeff=0.01"],
])
def test_old_log_probs_from_the_training_forward_equal_the_separate_pass(tmp_path, extra):
    """The on-policy shortcut (one optimizer step per batch) changes nothing but the time:
    the same loss, gradient and metrics, bit for bit, as verl's separate old_log_prob pass."""
    results = {}
    for mode in ("auto", "separate"):
        # the same micro-batches on both sides, so the two forward passes are the same sums
        cfg = smoke(tmp_path, f"actor_rollout_ref.actor.old_log_prob={mode}",
                    "actor_rollout_ref.rollout.micro_batch_size=8",
                    "trainer.val_before_train=false",
                    *extra, name=mode)
        trainer = GRPOTrainer(cfg)
        assert trainer.old_log_prob_from_update() == (mode == "auto")
        grads = record_gradients(trainer)
        metrics = {}
        for step in range(2):  # step 1 has AQN noise on (step 0 is the schedule's clean stage)
            metrics = trainer.step(step)
        results[mode] = grads, deterministic(metrics)
    (grads_auto, auto), (grads_sep, separate) = results["auto"], results["separate"]
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(grads_auto, grads_sep, strict=True))
    assert grads_auto[-1].abs().max() > 1e-4
    assert set(auto) == set(separate)
    compared = [k for k in auto if k.startswith(("rollout_corr/", "training/", "actor/"))]
    assert len(compared) > 25
    for key in compared:
        same_nan = math.isnan(auto[key]) and math.isnan(separate[key])
        assert auto[key] == separate[key] or same_nan, key
    if extra:
        assert separate["rollout_corr/abs_logp_diff_max"] > 0  # the noise really shows


def test_multi_epoch_or_mini_batch_configs_keep_the_separate_pass(tmp_path):
    for name, override in [("epochs", "actor_rollout_ref.actor.ppo_epochs=2"),
                           ("minis", "actor_rollout_ref.actor.ppo_mini_batch_size=2")]:
        assert not GRPOTrainer(smoke(tmp_path, override, name=name)).old_log_prob_from_update()


def test_fused_lm_head_trains_the_same_step(tmp_path):
    """actor.fused_lm_head: the same loss and metrics, the gradient up to summation order."""
    results = {}
    for fused in ("true", "false"):
        trainer = GRPOTrainer(smoke(tmp_path, f"actor_rollout_ref.actor.fused_lm_head={fused}",
                                    "trainer.val_before_train=false", name=f"fused-{fused}"))
        grads = record_gradients(trainer)
        results[fused] = deterministic(trainer.step(0)), grads[0]
    (fused, g_fused), (plain, g_plain) = results["true"], results["false"]
    assert g_plain.abs().max() > 1e-4
    assert (g_fused - g_plain).norm() <= 1e-6 * g_plain.norm()
    for key in ("actor/pg_loss", "actor/entropy", "rollout_corr/k3_kl", "critic/score/mean"):
        assert fused[key] == plain[key], key
