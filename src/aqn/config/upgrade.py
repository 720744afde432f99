"""Config keys that aqn renamed, and the one place a stored run config is brought up to date.

A key given by a user (a YAML file, an override, a sweep's variant) under its old name is an
error naming the new one (``renamed_key_error``, raised by ``loader.build``); a run directory's
``config.yaml`` written by an older aqn is read with its old keys moved to the new ones
(``upgrade_stored_config``), so that the run resumes (``aqn.rl.run_dir.config_changes``) and
reports (``aqn.experiments.runs.load_run``) as it did.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aqn.errors import ConfigError

# old dotted key -> (new dotted key, why it moved)
RENAMED: dict[str, tuple[str, str]] = {
    "algorithm.rollout_is": ("algorithm.rollout_correction.rollout_is", "verl 0.8's name"),
    "algorithm.rollout_is_threshold": ("algorithm.rollout_correction.rollout_is_threshold",
                                       "verl 0.8's name"),
}


def renamed_key_error(key: str) -> ConfigError | None:
    """The error for a key given under an old name (None when ``key`` was not renamed)."""
    if key not in RENAMED:
        return None
    new, why = RENAMED[key]
    return ConfigError(f"{key} is {why}; verl 0.9 (and aqn) use {new}", key)


def _copy(data: Mapping) -> dict:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def upgrade_stored_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored run config (``config.yaml`` as read) with every renamed key moved to its new
    place; ``data`` itself is left as it is. Where both names are present the new one wins."""
    out = _copy(data)
    for old, (new, _) in RENAMED.items():
        *path, name = old.split(".")
        node: Any = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            continue
        value = node.pop(name)
        *new_path, new_name = new.split(".")
        target = out
        for part in new_path:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target.setdefault(new_name, value)
    return out
