"""The AQN config block (``trainer.noise_injection`` in a run config)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from aqn.errors import ConfigError
from aqn.files import load_yaml_strict
from aqn.modules import layer_index
from aqn.noise.schedule import EXPONENTS, PRESETS, EpochSchedule, SigmaSchedule


@dataclass(frozen=True)
class NoiseInjectionConfig:
    enabled: bool = False
    """Master switch for the trainer; the injector itself always applies what it is given."""
    preset: str | None = "qerl"
    """Named parameter set (qerl, qerl-scripts, mild, strong, small); it fills sigma_start /
    sigma_end / num_stages that are left null. Explicit values win."""
    sigma_start: float | None = None
    """Sigma of stage 1, the first stage with noise (> 0); null: the preset's."""
    sigma_end: float | None = None
    """Sigma of the last stage (> 0); the stages between decay geometrically from sigma_start
    to it. null: the preset's."""
    num_stages: int | None = None
    """Stages of equal length over total_steps: stage 0 is a warm-up without noise, stages 1 to
    num_stages - 1 decay from sigma_start to sigma_end (at least 3 with exponent qerl-code, 2
    with paper). null: the preset's."""
    total_steps: int | None = None
    """Steps the schedule spans; null takes trainer.total_training_steps."""
    exponent: Literal["qerl-code", "paper"] = "qerl-code"
    """Stage k's sigma is sigma_start (sigma_end / sigma_start)^e. qerl-code: e = (k-1)/(K-2)
    as QeRL's code, the last stage reaching sigma_end; paper: e = (k-1)/(K-1), as the paper
    writes it."""
    boundaries: Literal["qerl-code", "exact"] = "qerl-code"
    """Stage boundaries: "qerl-code" (QeRL's float step // (T / K)) or "exact" (integer)."""
    distribution: Literal["gaussian", "uniform", "quant_error"] = "gaussian"
    """gaussian (QeRL); uniform with the same standard deviation; or quant_error, noise shaped
    like real quantization error (bounded, uniform-like, deterministic): the error of rounding
    each clean weight onto a grid of spacing sqrt(12)*sigma shifted by a random offset drawn
    per (layer, step). |z| <= sqrt(3)*sigma, std sigma over the offset; equal weights get equal
    error, so an untrained norm (all 1.0) gets one scalar per layer."""
    mode: Literal["additive", "multiplicative"] = "additive"
    """additive (QeRL): w + z; multiplicative: w + z * |w|."""
    target_modules: tuple[str, ...] = ()
    """Patterns on module paths (exact path, '.'-suffix, or glob) of the norms that get noise;
    empty = all matched norms."""
    exclude_patterns: tuple[str, ...] = ()
    """Patterns on module paths (as target_modules) of norms left out, even when
    target_modules matches them."""
    include_final_norm: bool = True
    """The final norm (a norm outside the numbered layers, e.g. model.norm) gets noise too."""
    class_patterns: tuple[str, ...] = ("rmsnorm",)
    """A module is a norm target when one of these is in its lower-cased class name."""
    fp32_targets: bool = False
    """Keep targeted norm weights in fp32 in the perturbed copy and run those norms in fp32
    (output cast once to the model dtype) so small sigma survives the bf16 cast. This also
    changes the engine's numerics slightly when the noise is zero."""
    seed: int | None = None
    """Noise seed; null takes trainer.seed."""
    layer_multipliers: tuple[float, ...] | dict[int, float] | str | None = None
    """Per-layer sigma: the norms of decoder layer i get sigma x m[i] (0: no noise there). A
    list (m[0], m[1], ...), a map {layer: m} (layers it leaves out: default_multiplier), or the
    path of a JSON / YAML file holding either, or either under the key layer_multipliers (what
    `aqn scan` writes). Resolving the config turns it into the list (a file is read then,
    once), and the list is what the run records."""
    default_multiplier: float = 1.0
    """The multiplier of layers the list does not reach and of norms outside the numbered
    layers (the final norm)."""
    schedule: Literal["global", "epoch"] = "global"
    """global: one schedule over total_steps (QeRL); epoch: the verl fork's epoch-aware one,
    sigma falling from sigma_start to sigma_end over the epochs and every epoch its own warm-up
    and num_stages - 1 decay stages (aqn.noise.schedule.EpochSchedule)."""
    steps_per_epoch: int | None = None
    """Steps of one epoch for schedule=epoch; null: from the data, floor(train prompts /
    data.train_batch_size) as verl's len(train_dataloader)."""

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}",
                              "preset")
        if self.exponent not in EXPONENTS:
            raise ConfigError(f"must be one of {EXPONENTS}", "exponent")
        if not self.class_patterns:
            raise ConfigError("must list at least one class-name pattern", "class_patterns")
        for name in ("sigma_start", "sigma_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"must be > 0, got {value}", name)
        if self.total_steps is not None and self.total_steps <= 0:
            raise ConfigError(f"must be > 0, got {self.total_steps}", "total_steps")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ConfigError(f"must be > 0, got {self.steps_per_epoch}", "steps_per_epoch")
        multipliers = self.layer_multipliers
        if isinstance(multipliers, dict):
            if any(i < 0 for i in multipliers):
                raise ConfigError("layer indices must be >= 0", "layer_multipliers")
            multipliers = tuple(multipliers.values())
        elif not isinstance(multipliers, tuple):
            multipliers = ()
        for name, value in ([("default_multiplier", self.default_multiplier)]
                            + [(f"layer_multipliers[{i}]", m) for i, m in enumerate(multipliers)]):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"must be a finite number >= 0 (0: no noise), got {value}",
                                  name)

    def multiplier(self, path: str) -> float:
        """The sigma multiplier of the norm at ``path`` (resolved config: a list or null)."""
        return self.layer_multiplier(layer_index(path))

    def layer_multiplier(self, layer: int | None) -> float:
        """The multiplier of decoder layer ``layer`` (None: outside the numbered layers)."""
        m = self.layer_multipliers
        if isinstance(m, str | dict):
            raise ConfigError("not a list yet: resolve the config first", "layer_multipliers")
        if layer is None or m is None or layer >= len(m):
            return self.default_multiplier
        return m[layer]

    def resolved(self, total_steps: int | None = None, seed: int | None = None,
                 steps_per_epoch: int | None = None) -> NoiseInjectionConfig:
        """Fill preset values and the trainer's defaults, read a multipliers file; explicit
        values are kept."""
        updates = {}
        if isinstance(self.layer_multipliers, str):
            updates["layer_multipliers"] = read_multipliers(self.layer_multipliers,
                                                            self.default_multiplier)
        elif isinstance(self.layer_multipliers, dict):
            updates["layer_multipliers"] = multipliers_by_layer(self.layer_multipliers,
                                                                self.default_multiplier)
        if self.schedule == "epoch" and self.steps_per_epoch is None:
            updates["steps_per_epoch"] = steps_per_epoch
        if self.preset is not None:
            p = PRESETS[self.preset]
            for name in ("sigma_start", "sigma_end", "num_stages"):
                if getattr(self, name) is None:
                    updates[name] = getattr(p, name)
        if self.total_steps is None and total_steps is not None:
            updates["total_steps"] = total_steps
        if self.seed is None and seed is not None:
            updates["seed"] = seed
        return replace(self, **updates)

    def sigma_schedule(self) -> SigmaSchedule | EpochSchedule:
        epoch = self.schedule == "epoch"
        missing = [n for n in ("sigma_start", "sigma_end", "num_stages", "total_steps")
                   + (("steps_per_epoch",) if epoch else ()) if getattr(self, n) is None]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} unset: name a preset or set them (total_steps comes "
                "from trainer.total_training_steps when the config is resolved)",
                missing[0],
            )
        try:
            if epoch:  # as many epochs as the run starts (the last may be partial)
                return EpochSchedule(self.sigma_start, self.sigma_end, self.num_stages,
                                     self.steps_per_epoch,
                                     -(-self.total_steps // self.steps_per_epoch),
                                     self.exponent, self.boundaries)
            return SigmaSchedule(self.sigma_start, self.sigma_end, self.num_stages,
                                 self.total_steps, self.exponent, self.boundaries)
        except ValueError as e:
            # the schedule's messages start with the name of the field at fault
            name = str(e).split(" ", 1)[0]
            raise ConfigError(str(e), name if hasattr(self, name) else None) from None


def read_multipliers(path: str, default: float) -> tuple[float, ...]:
    """A multipliers file as the list of m[layer]; layers a map leaves out take ``default``."""
    key = "trainer.noise_injection.layer_multipliers"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the multipliers file {path}: {e.strerror}", key) from None
    if path.endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys(path, key))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON / YAML: {e}", key) from None
    else:
        try:
            data = load_yaml_strict(text, path)
        except ConfigError as e:
            raise ConfigError(e.message, key) from None
    if isinstance(data, dict) and "layer_multipliers" in data:
        data = data["layer_multipliers"]
    try:
        if isinstance(data, dict):
            by_layer = {int(k): float(v) for k, v in data.items()}
            if len(by_layer) < len(data):  # 0 and "0": one layer given twice
                raise ValueError(f"a layer given twice (keys {list(data)})")
            if any(i < 0 for i in by_layer):
                raise ValueError("a negative layer index")
            values = multipliers_by_layer(by_layer, default)
        elif isinstance(data, list):
            values = [float(v) for v in data]
        else:
            raise ValueError(f"a {type(data).__name__}")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: expected a list of multipliers or a map {{layer: "
                          f"multiplier}}, found {e}", key) from None
    return tuple(values)


def _unique_keys(path: str, key: str):
    """A json ``object_pairs_hook`` that refuses a key given twice in one object (json keeps
    the last one silently)."""
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                raise ConfigError(f"{path}: duplicate key {k!r} in a JSON object", key)
            out[k] = v
        return out
    return hook


def multipliers_by_layer(by_layer: dict[int, float], default: float) -> tuple[float, ...]:
    """A map {layer: multiplier} as the list m[0..max layer]; gaps take ``default``."""
    return tuple(by_layer.get(i, default) for i in range(max(by_layer, default=-1) + 1))
