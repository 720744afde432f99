"""Random noise on the Linear weights the quantizer targets: a model of quantization error.

``w <- w_clean + scale * rms(w_clean) * eps`` per targeted weight, with ``eps`` of unit
variance (gaussian N(0, 1), or uniform U(-sqrt 3, sqrt 3), the shape of rounding error), so
the relative L2 size of the written error is ``scale`` and compares with the quantizer's
``quant/rel_l2`` at matched size. ``eps`` is drawn afresh at every apply from a generator
seeded by (seed, "weight_noise", step, module path), so a run repeats to the bit, and always
added to the clean copy (``LinearWeightWriter``), so it never accumulates. It lives beside
the quantizer it models: same targets (``select_linears``), same clean-copy life, same
error measure (``record_write``, ``error_metrics``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from aqn.errors import ConfigError
from aqn.firing import Firing
from aqn.hashing import derive_seed
from aqn.quant.model import DEFAULT_EXCLUDE, LinearWeightWriter, record_write
from aqn.quant.report import LayerError, error_metrics

DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "uniform")


@dataclass(frozen=True)
class WeightNoiseConfig:
    scale: float = 0.0
    """Relative L2 size of the noise on each targeted weight, ||w_written - w|| / ||w|| ~ scale
    (to match a quantization format: scale = its quant/rel_l2). 0: off."""
    distribution: Literal["gaussian", "uniform"] = "gaussian"
    """Shape of eps (unit variance either way): gaussian N(0, 1); uniform U(-sqrt 3, sqrt 3)."""
    include: tuple[str, ...] = ()
    """Module path patterns (exact path, '.'-suffix or glob) of the nn.Linear weights it
    writes; empty include = every Linear."""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """Module path patterns (as include) of Linear weights left alone; the quantizer's
    defaults: the output head, embeddings and LoRA adapters."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ConfigError(f"must be a finite number >= 0 (0: off), got {self.scale}",
                              "scale")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"must be one of {list(DISTRIBUTIONS)}, got "
                              f"{self.distribution!r}", "distribution")

    @property
    def enabled(self) -> bool:
        return self.scale > 0


def unit_noise(shape: torch.Size, distribution: str, gen: torch.Generator,
               device: torch.device) -> Tensor:
    """float32 noise of mean 0 and variance 1 drawn from ``gen``."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, device=device)
    half = math.sqrt(3.0)  # U(-a, a) has variance a^2 / 3
    return (torch.rand(shape, generator=gen, device=device) * 2 - 1) * half


class WeightNoise(LinearWeightWriter):
    """Weight noise as a rollout-engine perturbation (see aqn.perturb and the module doc)."""

    name = "weight_noise"

    def __init__(self, model: nn.Module, config: WeightNoiseConfig, seed: int) -> None:
        if not config.enabled:
            raise ValueError(f"weight noise needs scale > 0, got {config.scale}")
        super().__init__(model, config.include, config.exclude, "weight noise")
        self.config, self.seed = config, seed
        self.last_layers: tuple[LayerError, ...] = ()

    def _noisy(self, step: int, path: str, clean: Tensor) -> Tensor:
        gen = torch.Generator(device=clean.device)
        gen.manual_seed(derive_seed(self.seed, "weight_noise", step, path))
        eps = unit_noise(clean.shape, self.config.distribution, gen, clean.device)
        w = clean.float()
        rms = w.pow(2).mean().sqrt()
        return (w + self.config.scale * rms * eps).to(clean.dtype)

    @torch.no_grad()
    def apply(self, step: int) -> dict[str, float]:
        """Write fresh noise of ``step`` onto the clean weights; returns what was written."""
        layers: list[LayerError] = []
        self.last = Firing.empty()
        for i, (path, clean) in enumerate(zip(self.targets, self._clean, strict=True)):
            self._write(i, record_write(path, clean, self._noisy(step, path, clean), layers,
                                        self.last))
        self.last_layers = tuple(layers)
        return {**error_metrics("weight_noise/", layers),
                "weight_noise/scale": self.config.scale,
                "weight_noise/num_modules": float(len(layers))}
