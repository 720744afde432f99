"""Every config key is documented once, where it is defined (a string under the field, as
cleanrl's Args), and ``aqn.config.docs`` reads it back with its type, default, choices and
verl / TRL names; ``render`` prints a resolved config with the docs and loads back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_type_hints

import pytest
import yaml

from aqn.config import ConfigError, config_hash, docs, load_config
from aqn.config.schema import AQNConfig
from aqn.noise.config import NoiseInjectionConfig
from aqn.noise.schedule import PRESETS
from aqn.numerics import PROFILES
from aqn.quant import FORMATS


def test_every_config_key_has_a_doc_where_it_is_defined():
    assert docs.undocumented() == [], "write a docstring under each of these fields"
    assert all(d.doc.strip() for d in docs.key_docs().values())


# A tree with one field lacking its docstring (a section's field), one with a comment only.
@dataclass(frozen=True)
class _Inner:
    documented: int = 1
    """What it does."""
    # a comment is not a doc
    bare: float = 0.0


@dataclass(frozen=True)
class _Root:
    inner: _Inner = field(default_factory=_Inner)
    """A section."""
    flag: bool = False


def test_the_check_fails_on_a_field_without_a_docstring():
    assert docs.undocumented(_Root) == ["inner.bare", "flag"]
    assert docs.field_docs(_Inner) == {"documented": "What it does."}


def test_every_dataclass_of_the_tree_is_reached():
    names = {cls.__name__ for _, cls, _, _ in docs._fields(AQNConfig)}
    assert names == {"AQNConfig", "DataConfig", "ActorRolloutRefConfig", "ModelConfig",
                     "ActorConfig", "OptimConfig", "LoraConfig", "OpNoiseConfig",
                     "RolloutConfig", "ValKwargs", "WeightNoiseConfig", "AlgorithmConfig",
                     "RolloutCorrectionConfig", "RewardConfig", "TrainerConfig", "ResourcesConfig",
                     "NoiseInjectionConfig"}


def test_doc_lookup_returns_the_text_under_the_field():
    assert docs.doc("trainer.noise_injection.sigma_start") == (
        "Sigma of stage 1, the first stage with noise (> 0); null: the preset's.")
    assert docs.doc("trainer.noise_injection.total_steps") == docs.field_docs(
        NoiseInjectionConfig)["total_steps"]
    assert docs.doc("actor_rollout_ref.rollout.dtype").startswith(
        "The engine's parameter dtype (verl's key and spelling)")
    assert "IcePop" in docs.doc("algorithm.rollout_correction.rollout_is_threshold")
    assert docs.lookup("actor_rollout_ref.actor.optim").is_section


def test_type_and_default():
    d = docs.lookup("trainer.noise_injection.sigma_start")
    assert (d.type, d.default) == ("float | null", None)
    d = docs.lookup("trainer.logger")
    assert (d.type, d.default) == ("list[str]", ["console", "jsonl"])
    d = docs.lookup("trainer.noise_injection.layer_multipliers")
    assert d.type == "list[float] | map[int, float] | str | null"
    assert docs.lookup("actor_rollout_ref.rollout.weight_noise.exclude").default == [
        "lm_head", "*embed*", "*lora_*"]


def test_choices_come_from_the_literals_and_the_registries():
    assert list(docs.lookup("data.source").choices) == ["arith", "gsm8k"]
    assert list(docs.lookup("trainer.logger").choices) == ["console", "jsonl", "tensorboard",
                                                           "wandb"]
    assert list(docs.lookup("actor_rollout_ref.rollout.dtype").choices) == [
        "float32", "bfloat16", "float16", "null"]
    for side in ("actor", "rollout"):
        assert list(docs.lookup(f"actor_rollout_ref.{side}.quantization").choices) == [
            *FORMATS, "null"]
        assert list(docs.lookup(f"actor_rollout_ref.{side}.numerics").choices) == list(PROFILES)
    numerics = docs.lookup("actor_rollout_ref.rollout.numerics").choices
    assert numerics["npu-naive"] == PROFILES["npu-naive"].description
    assert list(docs.lookup("trainer.noise_injection.preset").choices) == [*PRESETS, "null"]
    assert list(docs.lookup("data.difficulty").choices) == ["1", "2", "3"]
    assert docs.lookup("actor_rollout_ref.rollout.temperature").choices == {}  # a number


def test_choices_are_what_the_config_accepts():
    for fmt in FORMATS:
        load_config("smoke", [f"actor_rollout_ref.rollout.quantization={fmt}"])
    with pytest.raises(ConfigError, match="difficulty"):
        load_config("smoke", ["data.difficulty=[4]"])


def test_verl_and_trl_names():
    d = docs.lookup("actor_rollout_ref.actor.clip_ratio_low")
    assert d.verl.startswith("actor_rollout_ref.actor.clip_ratio_low (verl's own key")
    assert d.trl == "GRPOConfig epsilon"
    assert docs.lookup("data.max_train_samples").verl == "data.train_max_samples"
    assert docs.lookup("actor_rollout_ref.rollout.share_weights").verl is None
    assert docs.lookup("trainer.noise_injection.sigma_start").verl.startswith(
        "+trainer.noise_injection.sigma_start=... on verl's command line")
    keys = docs.key_docs()
    for mapping in (docs.VERL_SAME, docs.VERL_OTHER, docs.TRL):
        assert set(mapping) <= set(keys), "a verl / TRL name for a key that is gone"


def test_keys_called_verls_own_are_in_verls_config():
    verl = pytest.importorskip("verl")
    path = Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"

    def flat(data, prefix=""):
        for k, v in data.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")

    verl_keys = set(flat(yaml.safe_load(path.read_text())))
    assert set(docs.VERL_SAME) - verl_keys == set()


def test_an_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean trainer.noise_injection.sigma_start"):
        docs.lookup("trainer.noise_injection.sigma_strat")
    with pytest.raises(ConfigError, match="did you mean trainer.noise_injection.sigma_start"):
        docs.lookup("sigma_start")  # the last part alone
    with pytest.raises(ConfigError, match="rollout_correction.rollout_is"):
        docs.lookup("algorithm.rollout_is")  # renamed


def test_explain_prints_one_key_in_full():
    text = docs.explain("actor_rollout_ref.rollout.quantization")
    assert text.splitlines()[0] == "actor_rollout_ref.rollout.quantization"
    assert "  type:    str | null" in text and "  default: null" in text
    assert f"  choices: {', '.join(FORMATS)}, null" in text
    assert "verl's own key" in text and "fake weight quantization" in text
    section = docs.explain("actor_rollout_ref.rollout.val_kwargs")
    assert "    do_sample    bool = false" in section


@pytest.mark.parametrize("overrides", [[], ["aqn=mild",
                                            "actor_rollout_ref.rollout.quantization=nvfp4",
                                            "trainer.noise_injection.layer_multipliers=[1, 0.5]"]])
def test_render_loads_back_as_the_same_config(tmp_path, overrides):
    cfg = load_config("smoke", overrides)
    text = docs.render(cfg, "title")
    assert text.startswith("# title\n")
    assert "  # Completions per prompt (GRPO group size).\n    n: 4  # default: 8\n" in text
    (tmp_path / "shown.yaml").write_text(text)
    assert config_hash(load_config(tmp_path / "shown.yaml")) == config_hash(cfg)
    changed = docs.render(cfg, "title", changed_only=True)  # only what differs from defaults
    assert "    n: 4  # default: 8\n" in changed and "top_p:" not in changed
    assert len(changed.splitlines()) < len(text.splitlines()) / 3
    (tmp_path / "changed.yaml").write_text(changed)
    assert config_hash(load_config(tmp_path / "changed.yaml")) == config_hash(cfg)


def test_documenting_leaves_the_config_hash_alone():
    # docs are strings in the class bodies, not fields. The hash is logged and written to every
    # config.yaml and checkpoint, so it changes only on purpose: a new key (trainer.resources last)
    # changes it, and a run stored before that key still resumes (tests/test_trainer.py)
    assert config_hash(AQNConfig()) == "0c6b241e0b"
    assert config_hash(load_config("tiny")) == "0d64290836"


@dataclass(frozen=True)
class _Typed:
    a: Literal["x", "y"] | None = None
    """a"""
    b: tuple[Literal["p", "q"], ...] = ()
    """b"""


def test_type_names_as_a_config_file_spells_them():
    hints = get_type_hints(_Typed)
    assert docs.type_name(hints["a"]) == "str | null"
    assert docs.type_name(hints["b"]) == "list[str]"
    assert docs._literal_choices(hints["a"]) == ["x", "y", None]
    assert docs._literal_choices(hints["b"]) == ["p", "q"]
