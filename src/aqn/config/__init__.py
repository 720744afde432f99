"""Load, override, validate, resolve, freeze and hash the run config."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from aqn.config.loader import build, deep_merge, parse_override, read_yaml, set_dotted, to_yaml
from aqn.config.schema import AQNConfig, resolve
from aqn.errors import ConfigError
from aqn.hashing import config_hash, to_plain


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("aqn.configs").iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("aqn.configs") / f"{name}.yaml"))
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return path


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> AQNConfig:
    """A resolved, frozen config from a YAML file or preset name plus dotted overrides."""
    data: dict = {}
    if source is not None:
        path = Path(source)
        if not path.exists() and not str(source).endswith((".yaml", ".yml")):
            path = preset_path(str(source))
        data = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return resolve(build(AQNConfig, data))


def config_to_dict(cfg: AQNConfig) -> dict:
    return to_plain(cfg)


def dump_config(cfg: AQNConfig) -> str:
    return f"# aqn config, hash {config_hash(cfg)}\n" + to_yaml(config_to_dict(cfg))


__all__ = ["AQNConfig", "ConfigError", "config_hash", "config_to_dict", "deep_merge",
           "dump_config", "load_config", "preset_names"]
