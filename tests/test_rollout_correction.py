"""verl 0.9's ``algorithm.rollout_correction`` in aqn (issue 29): its config names (the old
``algorithm.rollout_is*`` refused, runs stored with them still resume), the rejection mask
on the policy loss, and verl's / TRL's correction metrics read from foreign logs.
(The maths against verl's own functions: tests/test_peers.py.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from aqn import metric_keys as keys
from aqn.config import ConfigError, load_config
from aqn.config.rollout_correction import RolloutCorrectionConfig
from aqn.config.upgrade import upgrade_stored_config
from aqn.rl import core_algos as algos
from aqn.rl import trainer as trainer_module
from aqn.rl.run_dir import config_changes
from aqn.rl.tracking import read_metrics
from aqn.rl.trainer import GRPOTrainer, train
from aqn.token_math import masked_mean
from conftest import peer, smoke, train_until

TIS = ["algorithm.rollout_correction.rollout_is=token"]
AQN = ["trainer.noise_injection.enabled=true", "trainer.noise_injection.preset=small"]
NOISY = ["actor_rollout_ref.rollout.op_noise.scale=0.1"]  # |dlogp| ~ 0.04 on the smoke run


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize("old, new", [
    ("algorithm.rollout_is=token", "algorithm.rollout_correction.rollout_is"),
    ("algorithm.rollout_is_threshold=2.0", "algorithm.rollout_correction.rollout_is_threshold"),
])
def test_verl_08_names_are_refused_naming_the_new_key(tmp_path, old, new):
    key = old.split("=")[0]
    message = re.escape(f"{key} is verl 0.8's name; verl 0.9 (and aqn) use {new}")
    with pytest.raises(ConfigError, match=message) as e:
        load_config("smoke", [old])
    assert e.value.key == key
    file = tmp_path / "old.yaml"
    file.write_text(f"algorithm:\n  {key.split('.')[1]}: {old.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(file)


def test_defaults_change_nothing_and_every_field_is_verls():
    verl = peer("verl.trainer.config.algorithm")
    ours = RolloutCorrectionConfig()
    theirs = {f: getattr(verl.RolloutCorrectionConfig(), f)
              for f in verl.RolloutCorrectionConfig.__dataclass_fields__ if not f.startswith("_")}
    assert set(theirs) == set(RolloutCorrectionConfig.__dataclass_fields__)
    # verl's trainer YAML (what a verl user sees) has rollout_is null; its dataclass "sequence"
    assert ours.rollout_is is None and theirs["rollout_is"] == "sequence"
    assert {k: getattr(ours, k) for k in theirs if k != "rollout_is"} == {
        k: v for k, v in theirs.items() if k != "rollout_is"}
    assert not ours.enabled and not ours.needs_whole_batch


def verl_presets():
    verl = peer("verl.trainer.config.algorithm").RolloutCorrectionConfig
    names = sorted(n for n, v in vars(verl).items()
                   if isinstance(v, classmethod) and n.startswith(("decoupled_", "bypass_")))
    assert len(names) >= 15
    return [(n, getattr(verl, n)()) for n in names]


def test_a_verl_block_is_accepted_verbatim(tmp_path):
    """Every preset verl 0.9.1 defines, written as a YAML block: the decoupled ones load with
    verl's values, the bypass ones are refused naming bypass_mode; and verl's trainer YAML
    default block loads as aqn's default."""
    fields = list(RolloutCorrectionConfig.__dataclass_fields__)
    accepted = 0
    for name, preset in verl_presets():
        block = {f: getattr(preset, f) for f in fields}
        file = tmp_path / f"{name}.yaml"
        file.write_text(yaml.safe_dump({"algorithm": {"rollout_correction": block}}))
        if preset.bypass_mode:
            with pytest.raises(ConfigError, match="bypass mode .* is not offered") as e:
                load_config(file)
            assert e.value.key == "algorithm.rollout_correction.bypass_mode", name
            continue
        got = load_config(file).algorithm.rollout_correction
        assert {f: getattr(got, f) for f in fields} == block, name
        accepted += 1
    assert accepted >= 9
    generated = Path(peer("verl").__file__).parent / "trainer/config/_generated_ppo_trainer.yaml"
    block = yaml.safe_load(generated.read_text())["algorithm"]["rollout_correction"]
    file = tmp_path / "verl_default.yaml"
    file.write_text(yaml.safe_dump({"algorithm": {"rollout_correction": block}}))
    assert load_config(file).algorithm.rollout_correction == RolloutCorrectionConfig()


@pytest.mark.parametrize("overrides, key, message", [
    (["rollout_rs=seq_max_k1", "rollout_rs_threshold=2"], "rollout_rs",
     "invalid rollout_rs option 'seq_max_k1'"),
    (["rollout_rs=seq_mean_k3"], "rollout_rs_threshold", "must be given when rollout_rs"),
    (["rollout_rs=seq_mean_k3", "rollout_rs_threshold=0.5_2.0"], "rollout_rs_threshold",
     "one upper bound without '_'"),
    (["rollout_rs=token_k1,seq_sum_k2", "rollout_rs_threshold='0.5_2.0,1,2'"],
     "rollout_rs_threshold", "one per option"),
    (["rollout_rs=token_k1", "rollout_rs_threshold=2.0_0.5"], "rollout_rs_threshold",
     "lower <= upper"),
    (["rollout_is_threshold=-1"], "rollout_is_threshold", "must be positive"),
    (["rollout_is_threshold=5.0_0.5"], "rollout_is_threshold", "lower bound must be <="),
    (["rollout_is_batch_normalize=true"], "rollout_is_batch_normalize", "rollout_is is null"),
    (["loss_type=reinforce"], "loss_type", "read only in verl's bypass mode"),
    (["loss_type=reinforce", "bypass_mode=true"], "bypass_mode", "not offered"),
])
def test_what_aqn_cannot_honour_is_refused_by_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("smoke", [f"algorithm.rollout_correction.{o}" for o in overrides])
    assert e.value.key == f"algorithm.rollout_correction.{key}"


# ------------------------------------------------------------------------------- the maths


def test_rejection_by_hand():
    """token_k1 keeps 0.6 <= 1/r <= 1.5; seq_mean_k2 keeps mean((log r)^2 / 2) <= 0.1."""
    ln2 = math.log(2.0)
    train = torch.tensor([[ln2, 0.0, -ln2], [0.1, 0.1, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kept, m = algos.rollout_rejection_mask(train, torch.zeros_like(train), mask, "token_k1",
                                           "0.6_1.5")
    assert kept.tolist() == [[0, 1, 0], [1, 1, 0]] and kept.dtype == mask.dtype
    assert m["rollout_rs_masked_fraction"] == pytest.approx(2 / 5)
    assert m["rollout_rs_seq_masked_fraction"] == 0.5
    assert m["rollout_rs_token_k1_fraction_high"] == pytest.approx(1 / 5)  # k1 = ln 2
    assert m["rollout_rs_token_k1_fraction_low"] == pytest.approx(1 / 5)  # k1 = -ln 2
    kept, m = algos.rollout_rejection_mask(train, torch.zeros_like(train), mask,
                                           "seq_mean_k2", 0.1)
    # row 0: mean(ln2^2 / 2 * 2 / 3) = 0.160 > 0.1, rejected whole; row 1: 0.005, kept
    assert kept.tolist() == [[0, 0, 0], [1, 1, 0]]
    assert m["rollout_rs_seq_mean_k2_seq_max"] == pytest.approx(ln2**2 / 3)
    assert m["rollout_rs_seq_mean_k2_seq_masked_fraction"] == 0.5


# ------------------------------------------------------------------------------- stored runs


def to_old_names(config_file: Path) -> None:
    """Rewrite a run's config.yaml as an aqn before verl 0.9's names wrote it."""
    data = yaml.safe_load(config_file.read_text())
    corr = data["algorithm"].pop("rollout_correction")
    data["algorithm"] |= {"rollout_is": corr["rollout_is"],
                          "rollout_is_threshold": corr["rollout_is_threshold"]}
    config_file.write_text(yaml.safe_dump(data, sort_keys=False))


def test_upgrade_stored_config_moves_the_old_keys():
    stored = {"algorithm": {"adv_estimator": "grpo", "rollout_is": "token",
                            "rollout_is_threshold": 1.5}, "data": {"seed": 0}}
    upgraded = upgrade_stored_config(stored)
    assert upgraded == {"algorithm": {"adv_estimator": "grpo", "rollout_correction": {
        "rollout_is": "token", "rollout_is_threshold": 1.5}}, "data": {"seed": 0}}
    assert "rollout_is" in stored["algorithm"]  # the input is left as it was
    new = {"algorithm": {"rollout_correction": {"rollout_is": None}}}
    assert upgrade_stored_config(new) == new
    assert upgrade_stored_config({}) == {} and upgrade_stored_config({"algorithm": None}) == {
        "algorithm": None}


def test_a_run_stored_with_the_old_names_resumes_with_the_new(tmp_path, monkeypatch):
    train(smoke(tmp_path, *AQN, *TIS, name="straight"))
    train_until(monkeypatch, smoke(tmp_path, *AQN, *TIS, name="stopped"), stop=3)
    config = tmp_path / "stopped" / "config.yaml"
    to_old_names(config)
    assert "rollout_is: token" in config.read_text() and "rollout_correction" not in \
        config.read_text()
    resumed = smoke(tmp_path, *AQN, *TIS, "trainer.resume=true", name="stopped")
    assert config_changes(config, resumed) == []
    other = smoke(tmp_path, *AQN, "algorithm.rollout_correction.rollout_is=sequence",
                  "trainer.resume=true", name="stopped")
    assert config_changes(config, other) == ["algorithm.rollout_correction.rollout_is"]
    train(resumed)

    def rows(name):
        return [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))}
                for r in read_metrics(tmp_path / name)]

    assert rows("stopped") == rows("straight")
    assert rows("straight")[-1][keys.IS_MEAN] > 0  # TIS ran
    # and it reports under today's names
    from aqn.experiments.runs import load_run

    stored = load_run(tmp_path / "stopped")
    assert stored.setting("algorithm.rollout_correction.rollout_is") == "token"
    assert stored.setting("algorithm.rollout_is") is None


# ------------------------------------------------------------------------------- the trainer


def record_loss_masks(monkeypatch) -> tuple[list, list]:
    """The masks the policy loss gets, and the corrections the trainer computes."""
    masks, corrections = [], []
    policy_loss, correction = algos.policy_loss, algos.rollout_correction

    def loss(*args, **kwargs):
        masks.append(args[3].clone())
        return policy_loss(*args, **kwargs)

    def corr(*args, **kwargs):
        corrections.append(correction(*args, **kwargs))
        return corrections[-1]

    monkeypatch.setattr(trainer_module.algos, "policy_loss", loss)
    monkeypatch.setattr(trainer_module.algos, "rollout_correction", corr)
    return masks, corrections


def test_rejected_tokens_leave_the_policy_loss(tmp_path, monkeypatch):
    """Rejection sampling multiplies the policy loss's mask (verl: the response mask the
    actor gets); its metrics are logged under verl's names; the old log-probs come from a
    separate pass (the whole batch's are needed before the update)."""
    cfg = smoke(tmp_path, *NOISY, "algorithm.rollout_correction.rollout_rs=token_k1",
                "algorithm.rollout_correction.rollout_rs_threshold=0.95_1.05",
                "trainer.val_before_train=false")
    trainer = GRPOTrainer(cfg)
    assert not trainer.old_log_prob_from_update()
    masks, corrections = record_loss_masks(monkeypatch)
    metrics = trainer.step(0)
    [correction] = corrections
    assert torch.equal(torch.cat(masks), correction.mask)
    fraction = metrics[keys.RS_MASKED_FRACTION]
    assert 0 < fraction < 1
    assert fraction == metrics[keys.rollout_rs("token_k1", "masked_fraction")]
    assert keys.RS_SEQ_MASKED_FRACTION in metrics
    assert metrics[keys.ABS_LOGP_DIFF] > 0.01  # the noise made the mismatch it rejects


def test_a_correction_that_rejects_everything_leaves_no_gradient(tmp_path, monkeypatch):
    """token_k1 keeping only 1e-9 <= 1/r <= 1e-8 rejects every token of a small mismatch:
    the policy loss has nothing left and the gradient is 0; a bound nothing crosses leaves
    the gradient as without rejection, bit for bit."""
    grads = {}
    for name, rs in [("all", ["rollout_rs=token_k1", "rollout_rs_threshold=1e-9_1e-8"]),
                     ("none", ["rollout_rs=seq_mean_k1", "rollout_rs_threshold=0.5_2.0"]),
                     ("no_rs", [])]:
        cfg = smoke(tmp_path, *NOISY, *(f"algorithm.rollout_correction.{o}" for o in rs),
                    "actor_rollout_ref.actor.old_log_prob=separate",
                    "trainer.val_before_train=false", name=name)
        trainer = GRPOTrainer(cfg)
        trainer.reward_fn = lambda response, truth: float(len(response) % 2)
        seen = []
        step = trainer.optimizer.step

        def record(seen=seen, trainer=trainer, step=step):
            seen.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters()]))
            step()

        trainer.optimizer.step = record
        metrics = trainer.step(0)
        grads[name] = seen[0]
        if name == "all":
            assert metrics[keys.RS_MASKED_FRACTION] == 1.0
            assert metrics[keys.RS_SEQ_MASKED_FRACTION] == 1.0
        if name == "none":
            assert metrics[keys.RS_MASKED_FRACTION] == 0.0
    assert grads["all"].abs().max() == 0
    assert grads["no_rs"].abs().max() > 1e-4
    assert torch.equal(grads["none"].view(torch.int32), grads["no_rs"].view(torch.int32))


def test_batch_normalized_weights_average_one_on_the_loss(tmp_path, monkeypatch):
    cfg = smoke(tmp_path, *NOISY, "algorithm.rollout_correction.rollout_is=sequence",
                "algorithm.rollout_correction.rollout_is_batch_normalize=true",
                "trainer.val_before_train=false")
    trainer = GRPOTrainer(cfg)
    assert not trainer.old_log_prob_from_update()
    _, corrections = record_loss_masks(monkeypatch)
    metrics = trainer.step(0)
    [c] = corrections
    seq_weights = masked_mean(c.weights, c.mask, dim=-1)
    assert seq_weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    # the factor is the mean over sequences; the logged rollout_is_* are before it
    assert metrics["rollout_corr/rollout_is_batch_norm_factor"] != 1.0
    assert metrics[keys.IS_MEAN] == c.metrics[keys.IS_MEAN] != 1.0


# ------------------------------------------------------------------------------- foreign runs


def test_verl_and_trl_correction_metrics_are_read_beside_aqns(tmp_path, monkeypatch):
    """verl's rollout_corr/rollout_rs_* keys keep their names in the report's data; TRL's
    sampling/importance_sampling_ratio/* keep TRL's (its ratio after TRL's own truncation or
    masking, averaged per process: not verl's rollout_is_* figures)."""
    from aqn.experiments.runs import find_runs

    tracking = peer("verl.utils.tracking")
    log = tmp_path / "mis-seed1.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    logger = tracking.FileLogger("aqn", log.stem)
    rs = {keys.RS_MASKED_FRACTION: 0.12, keys.RS_SEQ_MASKED_FRACTION: 0.5,
          keys.rollout_rs("seq_mean_k1", "mean"): -0.001,
          keys.rollout_rs("seq_mean_k1", "masked_fraction"): 0.12, keys.IS_MEAN: 0.98}
    logger.log(data={"val-core/openai/gsm8k/acc/mean@1": 0.3}, step=0)
    for step in (1, 2):
        logger.log(data={**rs, "critic/score/mean": 0.5}, step=step)
    logger.finish()
    [verl_run] = find_runs([log])
    for key, value in rs.items():
        assert verl_run.series(key) == {1: value, 2: value}, key

    out = tmp_path / "trl-mis-seed1"
    trl = {f"sampling/importance_sampling_ratio/{s}": v
           for s, v in (("min", 0.4), ("mean", 0.99), ("max", 2.0))}
    history = [{"step": 1, "reward": 0.2, **trl}, {"step": 2, "eval_reward": 0.25}]
    out.mkdir()
    (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    [trl_run] = find_runs([out])
    assert trl_run.engine == "trl (trainer_state)"
    for key, value in trl.items():
        assert trl_run.series(key) == {1: value}, key
