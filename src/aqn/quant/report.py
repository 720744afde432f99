"""How much a perturbation (fake quantization, weight noise) changed the weights: per layer
and pooled over the model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _rel_l2(err_sq: float, ref_sq: float) -> float:
    if ref_sq == 0:
        return 0.0 if err_sq == 0 else math.inf
    return math.sqrt(err_sq / ref_sq)


def _sqnr_db(err_sq: float, ref_sq: float) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||w||^2 / ||Q(w) - w||^2); inf when exact."""
    if err_sq == 0:
        return math.inf
    if ref_sq == 0:
        return -math.inf
    return 10.0 * math.log10(ref_sq / err_sq)


@dataclass(frozen=True)
class LayerError:
    path: str
    shape: tuple[int, ...]
    err_sq: float  # ||Q(w) - w||^2, summed in float64
    ref_sq: float  # ||w||^2

    @classmethod
    def measure(cls, path: str, clean: Tensor, quantized: Tensor) -> LayerError:
        w = clean.detach().double()
        return cls(path, tuple(clean.shape),
                   torch.sum((quantized.detach().double() - w) ** 2).item(),
                   torch.sum(w * w).item())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rel_l2(self) -> float:
        return _rel_l2(self.err_sq, self.ref_sq)

    @property
    def sqnr_db(self) -> float:
        return _sqnr_db(self.err_sq, self.ref_sq)


def error_metrics(prefix: str, layers: Sequence[LayerError]) -> dict[str, float]:
    """The error written into ``layers``, pooled over all of them (so large layers weigh
    more, not a mean of layers): ``<prefix>rel_l2`` = sqrt(sum ||err||^2 / sum ||w||^2)."""
    err_sq, ref_sq = sum(x.err_sq for x in layers), sum(x.ref_sq for x in layers)
    return {
        f"{prefix}rel_l2": _rel_l2(err_sq, ref_sq),
        f"{prefix}sqnr_db": _sqnr_db(err_sq, ref_sq),
        f"{prefix}max_layer_rel_l2": max((x.rel_l2 for x in layers), default=0.0),
        f"{prefix}num_params": float(sum(x.numel for x in layers)),
    }


@dataclass(frozen=True)
class QuantReport:
    fmt: str
    layers: tuple[LayerError, ...]
    error_scale: float = 1.0  # the layers hold w + a (Q(w) - w) (aqn.quant.model)

    @property
    def num_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    # Pooled over every targeted weight (so large layers weigh more), not a mean of layers.
    @property
    def rel_l2(self) -> float:
        return _rel_l2(sum(x.err_sq for x in self.layers), sum(x.ref_sq for x in self.layers))

    @property
    def sqnr_db(self) -> float:
        return _sqnr_db(sum(x.err_sq for x in self.layers), sum(x.ref_sq for x in self.layers))

    def metrics(self) -> dict[str, float]:
        metrics = {**error_metrics("quant/", self.layers),
                   "quant/num_layers": float(len(self.layers))}
        if self.error_scale != 1:  # logged only when set: the metrics of a = 1 stay as before
            metrics["quant/error_scale"] = self.error_scale
        return metrics

    def table(self) -> str:
        width = max([len(x.path) for x in self.layers] + [len("overall (pooled)")])
        scaled = f" (error x{self.error_scale:g})" if self.error_scale != 1 else ""
        lines = [f"fake quantization {self.fmt}{scaled}: {len(self.layers)} layers, "
                 f"{self.num_params:,} parameters",
                 f"{'layer':<{width}}  {'shape':>11}  {'rel L2 %':>8}  {'SQNR dB':>7}"]
        for x in self.layers:
            shape = "x".join(map(str, x.shape))
            lines.append(f"{x.path:<{width}}  {shape:>11}  {100 * x.rel_l2:8.3f}  "
                         f"{x.sqnr_db:7.2f}")
        lines.append(f"{'overall (pooled)':<{width}}  {'':>11}  {100 * self.rel_l2:8.3f}  "
                     f"{self.sqnr_db:7.2f}")
        return "\n".join(lines)
