"""A run records a fingerprint of its inputs (data and initial weights) in inputs.json, and a
resume refuses other inputs, naming them."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from aqn.config import ConfigError
from aqn.data import load_task
from aqn.models import build_tiny
from aqn.rl import trainer as trainer_module
from aqn.rl.inputs import INPUTS_FILE, fingerprint_inputs, model_sha256
from aqn.rl.trainer import GRPOTrainer, train
from conftest import smoke


def arith(n_train=16, n_val=4):
    return load_task("arith", n_train, n_val, 0, [1], wording="words")


def test_the_fingerprint_is_stable_across_builds():
    (train_a, val_a), (train_b, val_b) = arith(), arith()
    a = fingerprint_inputs(train_a, val_a, build_tiny(seed=0)[0])
    b = fingerprint_inputs(train_b, val_b, build_tiny(seed=0)[0])
    assert a == b
    assert (a["n_train"], a["n_val"]) == (16, 4) and a["n_params"] > 0
    assert all(len(a[k]) == 64 for k in ("train_data", "val_data", "model"))


def test_one_ulp_of_one_weight_changes_the_model_fingerprint():
    model = build_tiny(seed=0)[0]
    before = model_sha256(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert model_sha256(model) != before
    # the same bytes in another dtype are other weights too
    assert model_sha256(build_tiny(seed=0, dtype="bfloat16")[0]) != before


def test_one_changed_record_changes_only_its_split():
    train_records, val_records = arith()
    model = build_tiny(seed=0)[0]
    before = fingerprint_inputs(train_records, val_records, model)
    train_records[7]["ground_truth"] += "0"
    after = fingerprint_inputs(train_records, val_records, model)
    assert after["train_data"] != before["train_data"]
    assert (after["val_data"], after["model"]) == (before["val_data"], before["model"])


def test_a_run_writes_its_inputs(tmp_path):
    cfg = smoke(tmp_path)
    trainer = GRPOTrainer(cfg)
    stored = json.loads((tmp_path / "run" / INPUTS_FILE).read_text())
    assert stored == fingerprint_inputs(trainer.train_records, trainer.val_records,
                                        build_tiny(seed=cfg.trainer.seed)[0])
    assert stored["n_train"] == 64 and stored["n_val"] == 8


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished smoke run of 2 steps (its checkpoint at step 2), copied by each test."""
    root = tmp_path_factory.mktemp("finished")
    train(smoke(root, "trainer.total_training_steps=2"))
    return root / "run"


def copy_of(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path


def test_resume_with_changed_data_is_refused_naming_it(finished_run, tmp_path, monkeypatch):
    root = copy_of(finished_run, tmp_path)
    stored = (root / "run" / INPUTS_FILE).read_text()
    original = trainer_module.load_task

    def edited(*args, **kwargs):  # the same config, a data file edited since
        train_records, val_records = original(*args, **kwargs)
        train_records[0]["ground_truth"] = "12345"
        return train_records, val_records

    monkeypatch.setattr(trainer_module, "load_task", edited)
    with pytest.raises(ConfigError, match=r"cannot resume .*its inputs changed: train_data "
                       r"\(sha256 [0-9a-f]{12}, 64 records -> [0-9a-f]{12}, 64 records\); the "
                       r"run was made with other data/model") as e:
        GRPOTrainer(smoke(root, "trainer.total_training_steps=2", "trainer.resume=true"))
    assert "val_data" not in str(e.value) and "model" not in str(e.value).split(";")[0]
    assert e.value.key == "trainer.resume"
    assert (root / "run" / INPUTS_FILE).read_text() == stored  # left as it was
    monkeypatch.setattr(trainer_module, "load_task", original)
    # the refusal freed the run directory: with the data restored it resumes
    resumed = GRPOTrainer(smoke(root, "trainer.total_training_steps=2", "trainer.resume=true"))
    assert resumed.start_step == 2


def test_resume_with_other_initial_weights_is_refused_naming_the_model(finished_run, tmp_path,
                                                                       monkeypatch):
    root = copy_of(finished_run, tmp_path)
    original = trainer_module.build_policy

    def overwritten(cfg, device):  # the same model path, other weights behind it
        policy = original(cfg, device)
        with torch.no_grad():
            policy.model.model.norm.weight.add_(1e-3)
        return policy

    monkeypatch.setattr(trainer_module, "build_policy", overwritten)
    with pytest.raises(ConfigError, match=r"its inputs changed: model \(sha256 [0-9a-f]{12}, "
                       r"\d+ parameters -> [0-9a-f]{12}, \d+ parameters\);"):
        GRPOTrainer(smoke(root, "trainer.total_training_steps=2", "trainer.resume=true"))


def test_a_run_from_before_inputs_json_resumes_and_gets_one(finished_run, tmp_path, caplog):
    root = copy_of(finished_run, tmp_path)
    inputs = root / "run" / INPUTS_FILE
    stored = inputs.read_text()
    inputs.unlink()  # as an older aqn left it
    with caplog.at_level(logging.INFO, logger="aqn.rl.inputs"):
        resumed = GRPOTrainer(smoke(root, "trainer.total_training_steps=2",
                                    "trainer.resume=true"))
    assert resumed.start_step == 2
    assert "holds no inputs.json (a run from an older aqn)" in caplog.text
    assert inputs.read_text() == stored  # the inputs of the resume: the run's own
