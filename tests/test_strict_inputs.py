"""Inputs checked strictly: duplicate keys, a local model path that is not there, and
configs whose training steps cannot change the policy."""

import logging
import re

import pytest

from aqn.cli import main
from aqn.config import load_config
from aqn.config.loader import read_yaml
from aqn.errors import ConfigError
from aqn.experiments.sweep import load_sweep
from aqn.files import is_local_model_path, load_yaml_strict, missing_model_path
from aqn.noise.config import read_multipliers

MISSING = "does not exist (a local path; a hub id looks like org/name)"


# --- duplicate keys -------------------------------------------------------------------------

def test_duplicate_key_in_a_config_file_names_file_line_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  seed: 1\n  total_training_steps: 3\n  seed: 2\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert str(e.value) == f"{path}:4: duplicate key 'seed' (first at line 2)"
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: duplicate key 'seed'")):
        load_config(path)


def test_same_key_in_different_mappings_is_fine_and_merge_keys_still_work():
    text = "a: {x: 1}\nb: {x: 2}\nbase: &b {p: 1, q: 2}\nd:\n  <<: *b\n  p: 3\n"
    assert load_yaml_strict(text, "f.yaml") == {
        "a": {"x": 1}, "b": {"x": 2}, "base": {"p": 1, "q": 2}, "d": {"p": 3, "q": 2}}


def test_duplicate_key_in_a_flow_mapping_and_keys_yaml_reads_as_equal():
    with pytest.raises(ConfigError, match=r"^f\.yaml:1: duplicate key 'a' \(first at line 1\)$"):
        load_yaml_strict("{a: 1, b: 2, a: 3}", "f.yaml")
    with pytest.raises(ConfigError, match=r"^f\.yaml:2: duplicate key True \(first at line 1\)$"):
        load_yaml_strict("yes: 1\ntrue: 2\n", "f.yaml")  # YAML 1.1: both the boolean true


def test_invalid_yaml_still_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r":3: invalid YAML: "):
        read_yaml(path)


def test_duplicate_key_in_an_override_value():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["data.difficulty={a: 1, a: 2}"])
    assert e.value.key == "data.difficulty"
    assert "line 1: duplicate key 'a' (first at line 1)" in str(e.value)


def test_duplicated_variant_in_a_sweep_file_names_file_line_and_variant(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: dup\nbase: smoke\nseeds: [1]\nvariants:\n"
                    "  baseline: []\n"
                    "  aqn: [aqn=small]\n"
                    "  aqn: [aqn=mild]\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    assert str(e.value) == f"{path}:7: duplicate key 'aqn' (first at line 6)"


def test_duplicate_layer_in_a_multipliers_file(tmp_path):
    key = "trainer.noise_injection.layer_multipliers"
    yml = tmp_path / "m.yaml"
    yml.write_text("layer_multipliers:\n  0: 0.5\n  1: 1.0\n  0: 2.0\n")
    with pytest.raises(ConfigError) as e:
        read_multipliers(str(yml), 1.0)
    assert e.value.key == key
    assert e.value.message == f"{yml}:4: duplicate key 0 (first at line 2)"
    js = tmp_path / "m.json"
    js.write_text('{"layer_multipliers": {"0": 0.5, "1": 1.0, "0": 2.0}}')
    with pytest.raises(ConfigError) as e:
        read_multipliers(str(js), 1.0)
    assert e.value.key == key and e.value.message == f"{js}: duplicate key '0' in a JSON object"
    # 0 and "0" are two YAML keys but one layer
    yml.write_text("0: 0.5\n'0': 2.0\n")
    with pytest.raises(ConfigError, match="a layer given twice"):
        read_multipliers(str(yml), 1.0)
    js.write_text('{"layer_multipliers": {"2": 0.5, "0": 0.25}}')
    assert read_multipliers(str(js), 1.0) == (0.25, 1.0, 0.5)


# --- a local model path that does not exist ---------------------------------------------------

@pytest.mark.parametrize("name", ["/no/such/dir", "./missing", "~/aqn-no-such-model",
                                  "../missing", "models/org/name", "C:\\models\\x", ".\\x"])
def test_a_missing_local_model_path_fails_at_config_load(name):
    assert is_local_model_path(name)
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"actor_rollout_ref.model.path={name}"])
    assert e.value.key == "actor_rollout_ref.model.path"
    assert e.value.message == f"{name} {MISSING}"


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-1.5B",
                                  "tiny", "tiny-base", "smollm2-135m-instruct"])
def test_a_hub_id_or_built_in_is_not_a_local_path(name):
    assert not is_local_model_path(name) and missing_model_path(name) is None
    assert load_config("tiny", [f"actor_rollout_ref.model.path={name}"]
                       ).actor_rollout_ref.model.path == name


def test_an_existing_local_model_path_passes(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in (str(tmp_path / "m"), "./m", "m/../m"):
        assert missing_model_path(name) is None
        load_config("tiny", [f"actor_rollout_ref.model.path={name}"])


def test_load_model_refuses_a_missing_local_path_before_transformers(monkeypatch):
    import transformers

    from aqn.models import load_model

    def boom(*a, **k):
        raise AssertionError("transformers was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ConfigError, match=re.escape(f"model /no/such/dir {MISSING}")):
        load_model("/no/such/dir")


def test_train_cli_with_a_missing_model_path_is_one_line_and_no_run_dir(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = main(["train", "tiny", "actor_rollout_ref.model.path=/no/such/dir",
               f"trainer.default_local_dir={runs}", "trainer.total_training_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == ("aqn train: error: config key 'actor_rollout_ref.model.path': "
                   f"/no/such/dir {MISSING}\n")
    assert not runs.exists()


# --- configs that cannot produce a gradient ---------------------------------------------------

def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "aqn.config.schema" and r.levelno == logging.WARNING]


def test_group_of_one_warns_that_every_gradient_is_zero(caplog):
    with caplog.at_level(logging.WARNING, logger="aqn.config.schema"):
        load_config("tiny", ["actor_rollout_ref.rollout.n=1",
                             "actor_rollout_ref.actor.ppo_micro_batch_size=1"])
    assert _warnings(caplog) == [
        "actor_rollout_ref.rollout.n=1: GRPO's advantage is 0 for a group of one; every "
        "step's gradient is zero; set n >= 2 (a group to compare with)"]


def test_group_of_one_with_a_kl_loss_says_only_the_kl_term_moves_the_policy(caplog):
    with caplog.at_level(logging.WARNING, logger="aqn.config.schema"):
        load_config("tiny", ["actor_rollout_ref.rollout.n=1",
                             "actor_rollout_ref.actor.ppo_micro_batch_size=1",
                             "actor_rollout_ref.actor.use_kl_loss=true"])
    (msg,) = _warnings(caplog)
    assert "policy-gradient term is zero (only actor_rollout_ref.actor.use_kl_loss move" in msg


def test_zero_learning_rate_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="aqn.config.schema"):
        load_config("tiny", ["actor_rollout_ref.actor.optim.lr=0"])
    assert _warnings(caplog) == [
        "actor_rollout_ref.actor.optim.lr=0: the optimizer makes every update zero; the "
        "policy never changes (fine for an evaluation-only run)"]


def test_an_ordinary_config_warns_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="aqn.config.schema"):
        load_config("tiny", ["actor_rollout_ref.rollout.n=2",
                             "actor_rollout_ref.actor.ppo_micro_batch_size=2"])
    assert _warnings(caplog) == []
