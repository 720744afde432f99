"""The AQN config block (``trainer.noise_injection`` in a run config)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from aqn.errors import ConfigError
from aqn.noise.schedule import EXPONENTS, PRESETS, SigmaSchedule


@dataclass(frozen=True)
class NoiseInjectionConfig:
    # Master switch for the trainer; the injector itself always applies what it is given.
    enabled: bool = False
    # Named parameter set (qerl, qerl-scripts, mild, strong, small); it fills
    # sigma_start / sigma_end / num_stages that are left null. Explicit values win.
    preset: str | None = "qerl"
    sigma_start: float | None = None
    sigma_end: float | None = None
    num_stages: int | None = None
    # Steps the schedule spans; null takes trainer.total_training_steps.
    total_steps: int | None = None
    # "qerl-code": exponent (k-1)/(K-2) as QeRL's code; "paper": (k-1)/(K-1).
    exponent: Literal["qerl-code", "paper"] = "qerl-code"
    # Stage boundaries: "qerl-code" (QeRL's float step // (T / K)) or "exact" (integer).
    boundaries: Literal["qerl-code", "exact"] = "qerl-code"
    # gaussian (QeRL); uniform with the same standard deviation; or quant_error, noise shaped
    # like real quantization error (bounded, uniform-like, deterministic): the error of
    # rounding each clean weight onto a grid of spacing sqrt(12)*sigma shifted by a random
    # offset drawn per (layer, step). |z| <= sqrt(3)*sigma, std sigma over the offset; equal
    # weights get equal error, so an untrained norm (all 1.0) gets one scalar per layer.
    distribution: Literal["gaussian", "uniform", "quant_error"] = "gaussian"
    # additive (QeRL): w + z; multiplicative: w + z * |w|.
    mode: Literal["additive", "multiplicative"] = "additive"
    # Patterns on module paths (exact path, '.'-suffix, or glob); empty = all matched norms.
    target_modules: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    # The final norm (a norm outside the numbered layers, e.g. model.norm).
    include_final_norm: bool = True
    # A module is a norm target when one of these is in its lower-cased class name.
    class_patterns: tuple[str, ...] = ("rmsnorm",)
    # Keep targeted norm weights in fp32 in the perturbed copy and run those norms in fp32
    # (output cast once to the model dtype) so small sigma survives the bf16 cast. This
    # also changes the engine's numerics slightly when the noise is zero.
    fp32_targets: bool = False
    # Noise seed; null takes trainer.seed.
    seed: int | None = None

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

    def resolved(self, total_steps: int | None = None, seed: int | None = None
                 ) -> NoiseInjectionConfig:
        """Fill preset values and the trainer's defaults; explicit values are kept."""
        updates = {}
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

    def schedule(self) -> SigmaSchedule:
        missing = [n for n in ("sigma_start", "sigma_end", "num_stages", "total_steps")
                   if getattr(self, n) is None]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} unset: name a preset or set them (total_steps comes "
                "from trainer.total_training_steps when the config is resolved)",
                missing[0],
            )
        try:
            return SigmaSchedule(self.sigma_start, self.sigma_end, self.num_stages,
                                 self.total_steps, self.exponent, self.boundaries)
        except ValueError as e:
            # the schedule's messages start with the name of the field at fault
            name = str(e).split(" ", 1)[0]
            raise ConfigError(str(e), name if hasattr(self, name) else None) from None
