"""Applies AQN noise to the norm weights of a model copy, provably and reversibly.

Every apply writes ``w = cast(w_clean + z)`` from a clean fp32 copy, so noise never
accumulates however often it is applied; ``restore()`` writes the clean weights back bit
for bit. ``z`` comes from a generator seeded by (seed, step, module path): the same noise
whatever the module order, process, device or tensor-parallel rank. Each apply measures
what survived the cast to the weight dtype and warns when the cast swallowed it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from aqn import metric_keys as keys
from aqn.errors import NoTargetsError
from aqn.hashing import config_hash, derive_seed
from aqn.modules import layer_index
from aqn.noise.config import NoiseInjectionConfig
from aqn.noise.selection import NormTarget, describe_targets, select_norms

log = logging.getLogger(__name__)

# Most elements unchanged, or less than half the drawn std left: the cast ate the noise.
SWALLOWED_FRACTION = 0.5


class NoiseSwallowedWarning(UserWarning):
    """The cast to the weight dtype removed most of the AQN noise."""


@dataclass(frozen=True)
class LayerNoise:
    """What one decoder layer's norms (or the norms outside the layers: ``layer`` None) got."""

    layer: int | None
    sigma: float  # the step's sigma times this layer's multiplier
    num_params: int
    effective_std: float  # std of (written - clean) over its norm weights, after the cast
    changed: int  # elements whose written value differs from clean


@dataclass(frozen=True)
class NoiseReport:
    step: int
    stage: int
    sigma: float
    num_modules: int
    num_params: int
    drawn_std: float  # std of z as drawn in fp32
    effective_std: float  # std of (written weight - clean weight), after the cast
    frac_changed: float  # fraction of elements whose written value differs from clean
    dtype: str
    layers: tuple[LayerNoise, ...] = ()  # per layer, in model order
    per_layer_metrics: bool = False  # layer_multipliers are set: log them per layer

    @property
    def num_changed(self) -> int:
        return sum(layer.changed for layer in self.layers)

    @property
    def swallowed(self) -> bool:
        if self.sigma == 0:
            return False
        return (self.frac_changed < SWALLOWED_FRACTION
                or self.effective_std < SWALLOWED_FRACTION * self.drawn_std)

    def metrics(self) -> dict[str, float]:
        return {
            keys.AQN_STEP: float(self.step),  # the schedule's step: metrics row step - 1
            keys.AQN_SIGMA: self.sigma,
            keys.AQN_STAGE: float(self.stage),
            keys.AQN_NUM_MODULES: float(self.num_modules),
            keys.AQN_EFFECTIVE_STD: self.effective_std,
            keys.AQN_FRAC_CHANGED: self.frac_changed,
            "aqn/drawn_std": self.drawn_std,
            # the one swallowed rule: the injector warns on it, the report reads this flag
            keys.AQN_SWALLOWED: float(self.swallowed),
        } | ({m: v for layer in self.layers for m, v in (
            (keys.aqn_layer(layer.layer, "sigma"), layer.sigma),
            (keys.aqn_layer(layer.layer, "effective_std"), layer.effective_std))}
             if self.per_layer_metrics else {})


def noise_seed(seed: int, step: int, path: str) -> int:
    return derive_seed(seed, step, path)


def grid_error(w: torch.Tensor, sigma: float | torch.Tensor, offset: torch.Tensor
               ) -> torch.Tensor:
    """The ``quant_error`` noise: the error of rounding ``w`` onto a shifted uniform grid.

    With spacing ``d = sqrt(12) * sigma`` and ``offset`` in [0, d) (per element, one value
    per layer), ``z = d * round((w + offset) / d) - (w + offset)``. Like real quantization
    error, z is bounded (|z| <= d / 2 = sqrt(3) * sigma), uniform-like (zero mean and std
    sigma over a uniform offset, and over weights spread over many grid steps) and
    deterministic: equal weights get equal error. Computed in float64 so that the small
    error of a weight near 1 is exact; returned as fp32. ``sigma`` may be a float64 tensor
    of one sigma per element (layer multipliers).
    """
    if isinstance(sigma, torch.Tensor):
        d = math.sqrt(12.0) * sigma.to(torch.float64)
    else:
        d = torch.full((), math.sqrt(12.0) * sigma, dtype=torch.float64, device=w.device)
    u = (w.double() + offset.double()) / d  # a tensor divisor: CUDA would multiply by 1/d
    return (d * (torch.round(u) - u)).float()


def _to_fp32_input(module: nn.Module, args: tuple):
    # Norms cast to the low dtype *before* the gain multiply (HF, vLLM): a bf16 x times
    # (1 + z/w) rounds straight back to x when |z/w| < half a bf16 ulp. Running the whole
    # norm in fp32 and casting its output once lets small noise survive (as dithering).
    x = args[0]
    module._aqn_out_dtype = x.dtype
    return (x.float(), *args[1:])


def _to_input_dtype(module: nn.Module, args: tuple, output):
    dtype = module._aqn_out_dtype
    if isinstance(output, tuple):  # e.g. vLLM's fused (normed, residual)
        return tuple(o.to(dtype) if isinstance(o, torch.Tensor) else o for o in output)
    return output.to(dtype)


class NoiseInjector:
    """Owns the clean copy of the targeted norm weights of one (rollout) model."""

    def __init__(self, model: nn.Module, noise_config: NoiseInjectionConfig,
                 seed: int | None = None) -> None:
        self.config = noise_config
        self.seed = seed if seed is not None else noise_config.seed
        if self.seed is None:
            raise ValueError("NoiseInjector needs a seed: pass seed= or set noise_config.seed")
        self.schedule = noise_config.sigma_schedule()
        self._targets = select_norms(
            model,
            class_patterns=noise_config.class_patterns,
            target_modules=noise_config.target_modules,
            exclude_patterns=noise_config.exclude_patterns,
            include_final_norm=noise_config.include_final_norm,
        )
        self._hooks = []
        if noise_config.fp32_targets:
            for _, module in self._targets:
                module.weight.data = module.weight.data.float()
                self._hooks.append(module.register_forward_pre_hook(_to_fp32_input))
                self._hooks.append(module.register_forward_hook(_to_input_dtype))
        self._slices = []
        offset = 0
        for _, module in self._targets:
            n = module.weight.numel()
            self._slices.append(slice(offset, offset + n))
            offset += n
        self.num_params = offset
        # sigma x multiplier: the per-layer sigma (1.0 everywhere unless layer_multipliers)
        self.multipliers = [noise_config.multiplier(path) for path, _ in self._targets]
        self.layers = sorted({layer_index(path) for path, _ in self._targets},
                             key=lambda i: (i is None, i or 0))
        if noise_config.layer_multipliers is not None:
            self._check_multipliers(model)
        self._clean = self._read_weights()
        self._written: torch.Tensor | None = None  # what the last apply wrote, as fp32
        self.applied_step: int | None = None
        self._warned_stage: int | None = None
        dtypes = sorted({str(m.weight.dtype).removeprefix("torch.") for _, m in self._targets})
        self.dtype = ",".join(dtypes)
        self.config_hash = config_hash(noise_config)
        log.info("AQN injector: %d modules, %d parameters (%s), seed %d, noise config %s",
                 len(self._targets), self.num_params, self.dtype, self.seed, self.config_hash)

    def _check_multipliers(self, model: nn.Module) -> None:
        """Multipliers that name layers the model lacks, or that zero every target, reach
        nothing: an error, never a silent no-op."""
        given = len(self.config.layer_multipliers)
        numbered = [i for i in self.layers if i is not None]
        if given > max(numbered, default=-1) + 1:
            raise NoTargetsError(
                f"trainer.noise_injection.layer_multipliers lists {given} layers, but the "
                f"norms AQN targets in {type(model).__name__} sit in layers 0-"
                f"{max(numbered, default=-1)}: multipliers past that reach no module")
        if not any(self.multipliers):
            raise NoTargetsError(
                "trainer.noise_injection.layer_multipliers (with default_multiplier "
                f"{self.config.default_multiplier:g}) is 0 for every one of the "
                f"{len(self._targets)} targeted norms: the noise would do nothing")

    def targets_by_layer(self) -> list[tuple[str, int | None]]:
        """(path, decoder layer) of every target; layer None outside the numbered layers."""
        return [(path, layer_index(path)) for path, _ in self._targets]

    @property
    def targets(self) -> list[NormTarget]:
        return describe_targets(self._targets)

    def target_weights(self) -> list[torch.Tensor]:
        """The norm weights it writes, in target order."""
        return [m.weight for _, m in self._targets]

    def _read_weights(self) -> torch.Tensor:
        return torch.cat([m.weight.detach().reshape(-1) for _, m in self._targets]).float()

    @torch.no_grad()
    def _write(self, values: torch.Tensor) -> None:
        for (_, module), sl in zip(self._targets, self._slices, strict=True):
            module.weight.copy_(values[sl].view_as(module.weight))

    def draw(self, step: int, sigma: float) -> torch.Tensor:
        """The fp32 noise of one step, for all targets, in target order (a target's sigma is
        ``sigma`` times its layer multiplier; multiplier 0: no noise there)."""
        z = torch.zeros(self.num_params, dtype=torch.float32)
        sigmas = torch.zeros(self.num_params, dtype=torch.float64)  # quant_error's, per element
        gen = torch.Generator(device="cpu")
        for (path, _), sl, m in zip(self._targets, self._slices, self.multipliers, strict=True):
            s = sigma * m
            if s == 0:
                continue
            gen.manual_seed(noise_seed(self.seed, step, path))
            if self.config.distribution == "gaussian":
                z[sl].normal_(0.0, s, generator=gen)
            elif self.config.distribution == "uniform":  # on [-a, a]: std a / sqrt(3)
                a = s * math.sqrt(3.0)
                z[sl].uniform_(-a, a, generator=gen)
            else:  # quant_error: here the layer's grid offset, one draw in [0, spacing)
                z[sl].fill_(torch.rand((), generator=gen).item() * math.sqrt(12.0) * s)
                sigmas[sl] = s
        z = z.to(self._clean.device)
        if self.config.distribution == "quant_error":
            sigmas = sigmas.to(z.device)
            z = torch.where(sigmas > 0, grid_error(self._clean, sigmas.clamp_min(1e-300),
                                                   offset=z), torch.zeros_like(z))
        if self.config.mode == "multiplicative":
            z = z * self._clean.abs()
        return z

    def apply(self, step: int) -> NoiseReport:
        """Write cast(w_clean + z(step)) into the targets and measure what survived."""
        stage = self.schedule.stage(step)
        sigma = self.schedule.stage_sigma(stage)
        if sigma == 0.0:
            z = torch.zeros_like(self._clean)
        else:
            z = self.draw(step, sigma)
        self._write(self._clean + z)
        self._written = self._read_weights()
        delta = self._written - self._clean
        layers = []
        for layer in self.layers:
            idx = [i for i, (path, _) in enumerate(self._targets) if layer_index(path) == layer]
            d = torch.cat([delta[self._slices[i]] for i in idx])
            # one multiplier per layer (outside the layers: default_multiplier)
            layers.append(LayerNoise(layer, sigma * self.multipliers[idx[0]], d.numel(),
                                     d.std(correction=0).item(), int((d != 0).sum())))
        report = NoiseReport(
            step=step,
            stage=stage,
            sigma=sigma,
            num_modules=len(self._targets),
            num_params=self.num_params,
            drawn_std=z.std(correction=0).item(),
            effective_std=delta.std(correction=0).item(),
            frac_changed=(delta != 0).float().mean().item(),
            dtype=self.dtype,
            layers=tuple(layers),
            per_layer_metrics=self.config.layer_multipliers is not None,
        )
        self.applied_step = step
        if report.swallowed and self._warned_stage != stage:
            self._warned_stage = stage
            warnings.warn(
                f"AQN step {step} (stage {stage}, sigma {sigma:g}): the {self.dtype} cast "
                f"changed only {report.frac_changed:.1%} of the elements (effective std "
                f"{report.effective_std:.2e} vs {report.drawn_std:.2e} drawn). "
                "Set fp32_targets=true to keep small noise.",
                NoiseSwallowedWarning,
                stacklevel=2,
            )
        return report

    def restore(self) -> None:
        """Write the clean weights back, bit for bit."""
        self._write(self._clean)
        self._written = None
        self.applied_step = None

    @contextmanager
    def applied(self, step: int) -> Iterator[NoiseReport]:
        report = self.apply(step)
        try:
            yield report
        finally:
            self.restore()

    @torch.no_grad()
    def refresh_clean(self) -> int:
        """Take the weights now in the model as the new clean copy (call after a sync).

        A target whose weight still holds exactly what the last apply wrote was not
        re-sent by the sync (the final norm, or every norm when only adapters are synced):
        it keeps its previous clean value, so noise is never taken for a clean weight and
        never accumulates. Returns how many targets took new values.
        """
        current = self._read_weights()
        refreshed = 0
        for sl in self._slices:
            if self._written is not None and torch.equal(current[sl], self._written[sl]):
                continue
            self._clean[sl] = current[sl]
            refreshed += 1
        return refreshed

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def stage_reports(injector: NoiseInjector) -> list[NoiseReport]:
    """Apply the first step of every stage once and report what the cast left of it."""
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoiseSwallowedWarning)  # the table shows it
        for row in injector.schedule.table():
            with injector.applied(row.first_step) as report:
                reports.append(report)
    return reports
