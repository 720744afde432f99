"""The shipped YAML: run presets here, sweep presets under ``sweeps/``. Listing them imports
nothing heavy (``aqn train --help`` names them)."""

from __future__ import annotations

from importlib import resources


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml"))
