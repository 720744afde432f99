"""Adapters that carry aqn's AQN into other engines (layer 9: nothing below imports these).

``aqn.integrations.trl``: TRL's ``GRPOTrainer`` (HF generation, or vLLM colocated).
``aqn.integrations.verl``: verl's rollout weight sync, configured by ``trainer.noise_injection``.

Both reuse ``aqn.noise.NoiseInjector`` on the engine's own model, so the count of targeted
norms, the effective std after the cast and the refusal to match nothing are aqn's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aqn.config.loader import build
from aqn.errors import ConfigError
from aqn.noise import NoiseInjectionConfig

KEY = "trainer.noise_injection"


def resolve_noise(noise: NoiseInjectionConfig | Mapping[str, Any], total_steps: int | None,
                  seed: int | None, key: str = KEY) -> NoiseInjectionConfig:
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
