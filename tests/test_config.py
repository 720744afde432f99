import pytest

from aqn.config import ConfigError, config_hash, dump_config, load_config
from aqn.config.loader import build
from aqn.config.schema import AQNConfig


def test_defaults_resolve_noise_from_trainer():
    cfg = load_config(overrides=["trainer.total_training_steps=233", "trainer.seed=5"])
    noise = cfg.trainer.noise_injection
    assert noise.enabled is False and noise.preset == "qerl"
    assert (noise.sigma_start, noise.sigma_end, noise.num_stages) == (0.05, 0.0005, 10)
    assert noise.total_steps == 233 and noise.seed == 5


def test_dotted_overrides_and_explicit_values_win_over_preset():
    cfg = load_config(overrides=[
        "trainer.noise_injection.enabled=true",
        "trainer.noise_injection.preset=small",
        "trainer.noise_injection.sigma_start=0.02",
        "trainer.noise_injection.sigma_end=1e-4",  # YAML reads this as a string
        "trainer.noise_injection.target_modules=[input_layernorm, model.norm]",
        "trainer.noise_injection.seed=11",
    ])
    noise = cfg.trainer.noise_injection
    assert noise.enabled is True
    assert (noise.sigma_start, noise.sigma_end, noise.num_stages) == (0.02, 1e-4, 5)
    assert noise.target_modules == ("input_layernorm", "model.norm")
    assert noise.seed == 11


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("trainer:\n  total_training_steps: 50\n  noise_injection:\n"
                 "    enabled: true\n    preset: mild\n")
    cfg = load_config(f, ["trainer.noise_injection.preset=strong"])
    assert cfg.trainer.noise_injection.sigma_start == 0.10
    assert cfg.trainer.noise_injection.total_steps == 50


@pytest.mark.parametrize("override, message", [
    ("trainer.noise_injection.sigma_strat=0.1",
     "'trainer.noise_injection.sigma_strat': unknown key; did you mean 'sigma_start'?"),
    ("trainer.noise_injectoin.enabled=true",
     "'trainer.noise_injectoin': unknown key; did you mean 'noise_injection'?"),
    ("trainer.noise_injection.enabled=maybe",
     "'trainer.noise_injection.enabled': expected true or false, got 'maybe'"),
    ("trainer.noise_injection.num_stages=2.5",
     "'trainer.noise_injection.num_stages': expected int | None, got 2.5"),
    ("trainer.noise_injection.sigma_start=abc",
     "'trainer.noise_injection.sigma_start': expected float | None, got 'abc'"),
    ("trainer.noise_injection.sigma_start=-0.1",
     "'trainer.noise_injection.sigma_start': must be > 0"),
    ("trainer.noise_injection.distribution=gausian",
     "did you mean 'gaussian'?"),
    ("trainer.noise_injection.preset=qerll", "unknown preset 'qerll'; known: qerl"),
    ("trainer.total_training_steps=0", "'trainer.total_training_steps': must be > 0"),
    ("trainer.noise_injection=3", "'trainer.noise_injection': expected a mapping"),
    ("trainer.seed", "must look like key.path=value"),
])
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_schedule_errors_surface_before_anything_is_built():
    with pytest.raises(ConfigError, match="'trainer.noise_injection.num_stages'.*>= 3"):
        load_config(overrides=["trainer.noise_injection.enabled=true",
                               "trainer.noise_injection.num_stages=2"])


def test_config_is_frozen_and_hash_tracks_content(tmp_path):
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.trainer.seed = 3
    same = load_config()
    other = load_config(overrides=["trainer.seed=2"])
    assert config_hash(cfg) == config_hash(same) != config_hash(other)
    assert len(config_hash(cfg)) == 10


def test_dumped_config_reloads_to_the_same_hash(tmp_path):
    cfg = load_config(overrides=["trainer.noise_injection.enabled=true",
                                 "trainer.noise_injection.target_modules=[model.norm]"])
    text = dump_config(cfg)
    assert text.startswith(f"# aqn config, hash {config_hash(cfg)}")
    f = tmp_path / "config.yaml"
    f.write_text(text)
    assert config_hash(load_config(f)) == config_hash(cfg)


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("trainer:\n  seed: 1\n  total_training_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_build_rejects_unknown_top_level_key():
    with pytest.raises(ConfigError, match="'trainr': unknown key; did you mean 'trainer'"):
        build(AQNConfig, {"trainr": {}})


def test_aqn_that_is_zero_for_the_whole_run_is_an_error():
    """The seed's failure class: a 233-step schedule on a 4-step run stays in its warm-up."""
    with pytest.raises(ConfigError, match="sigma is 0 at every one of the run's 4 steps.*"
                                          "total_steps=233.*stage 1 .*starts at step 24"):
        load_config("smoke", ["trainer.noise_injection.enabled=true",
                              "trainer.noise_injection.preset=qerl",
                              "trainer.noise_injection.total_steps=233"])
    # the same schedule on a run that reaches stage 1 is fine
    load_config("smoke", ["trainer.noise_injection.enabled=true",
                          "trainer.noise_injection.preset=qerl",
                          "trainer.noise_injection.total_steps=233",
                          "trainer.total_training_steps=25"])


@pytest.mark.parametrize("name", ["", " ", "../x", "a/b", "..", ".hidden"])
def test_experiment_name_must_stay_inside_its_directory(name):
    with pytest.raises(ConfigError, match="trainer.experiment_name.*non-empty folder name"):
        load_config("smoke", [f"trainer.experiment_name={name}"])
