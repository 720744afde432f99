"""Load, override, validate, resolve, freeze and hash the run config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from aqn.config.loader import build, deep_merge, parse_override, read_yaml, set_dotted, to_yaml
from aqn.config.schema import AQNConfig, resolve
from aqn.configs import preset_names
from aqn.errors import ConfigError
from aqn.hashing import config_hash, to_plain
from aqn.noise import NoiseInjectionConfig
from aqn.noise.schedule import PRESETS


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("aqn.configs") / f"{name}.yaml"))
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return path


# Shorthand overrides: `aqn=<preset>` turns AQN on with a schedule preset, `aqn=off` off.
AQN_SHORTHAND = (*PRESETS, "off")


def expand_shorthand(text: str) -> list[str]:
    """``aqn=mild`` -> the two dotted overrides it stands for; other overrides unchanged."""
    key, _, value = text.partition("=")
    if key.strip() != "aqn":
        return [text]
    value = value.strip()
    if value not in AQN_SHORTHAND:
        raise ConfigError(f"override {text!r}: aqn= takes one of {', '.join(AQN_SHORTHAND)}",
                          "aqn")
    if value == "off":
        return ["trainer.noise_injection.enabled=false"]
    return ["trainer.noise_injection.enabled=true", f"trainer.noise_injection.preset={value}"]


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> AQNConfig:
    """A resolved, frozen config from a YAML file or preset name plus dotted overrides
    (``aqn=qerl|mild|strong|small|off`` is shorthand for the AQN switch and preset)."""
    data: dict = {}
    if source is not None:
        path = Path(source)
        if not path.exists() and not str(source).endswith((".yaml", ".yml")):
            path = preset_path(str(source))
        data = read_yaml(path)
    for text in (t for given in overrides for t in expand_shorthand(given)):
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return resolve(build(AQNConfig, data))


def config_to_dict(cfg: AQNConfig) -> dict:
    return to_plain(cfg)


def dump_config(cfg: AQNConfig) -> str:
    return f"# aqn config, hash {config_hash(cfg)}\n" + to_yaml(config_to_dict(cfg))


NOISE_KEY = "trainer.noise_injection"


def resolve_noise(noise: NoiseInjectionConfig | Mapping[str, Any], total_steps: int | None,
                  seed: int | None, key: str = NOISE_KEY) -> NoiseInjectionConfig:
    """The AQN block as aqn resolves it (preset values, schedule length, seed), frozen.

    ``noise`` is the config or a mapping of its keys (an unknown or mistyped key is a
    ConfigError naming ``<key>.<name>``, ``trainer.noise_injection.<name>`` by default);
    ``total_steps`` and ``seed`` fill what the block leaves null, as
    ``trainer.total_training_steps`` and ``trainer.seed`` do.
    """
    if not isinstance(noise, NoiseInjectionConfig):
        noise = build(NoiseInjectionConfig, dict(noise), key)
    resolved = noise.resolved(total_steps=total_steps, seed=seed)
    if resolved.enabled:
        for name in ("total_steps", "seed"):
            if getattr(resolved, name) is None:
                raise ConfigError("unset, and the engine's config does not give it either",
                                  f"{key}.{name}")
        try:
            resolved.sigma_schedule()  # a schedule that cannot be built fails now
        except ConfigError as e:
            raise e.under(key) from None
    return resolved


__all__ = ["AQNConfig", "ConfigError", "config_hash", "config_to_dict", "deep_merge",
           "dump_config", "load_config", "preset_names", "resolve_noise"]
