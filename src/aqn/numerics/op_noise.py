"""Relative Gaussian noise on matmul outputs: simulated hardware error, fresh on every call.

``y <- y + scale * |y| * eps`` (``mode: relative``; ``absolute``: ``y + scale * eps``) with
``eps ~ N(0, 1)`` drawn for each call from a generator seeded by (seed, step, module path,
call number), so a run repeats to the bit. The ops are the outputs of ``nn.Linear`` modules
(``linear``) and the output of each attention's softmax(QK^T)V product, taken where it enters
the output projection (``attention``). The noise is an error term: gradients flow through it
unchanged (straight-through); ``backward: true`` also adds noise of the same form to the
gradient arriving at each op's output, with its own seed, as hardware that errs in the
backward matmuls too. Forward hooks carry it, so every call is counted (``aqn.firing``): hooks
that never fire (a compiled or CUDA-graph model) stop the run instead of doing nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from aqn.errors import ConfigError, NoTargetsError
from aqn.firing import HookedPerturbation
from aqn.hashing import derive_seed
from aqn.modules import path_matches

OPS: tuple[str, ...] = ("linear", "attention")
# The output projection of an attention module, in the model families aqn loads.
OUTPUT_PROJECTIONS: tuple[str, ...] = ("o_proj", "out_proj", "dense")


@dataclass(frozen=True)
class OpNoiseConfig:
    scale: float = 0.0
    """Noise scale; 0: off. 0.05 is the seed's "5 % matmul noise"."""
    mode: Literal["relative", "absolute"] = "relative"
    """relative: y + scale |y| eps (error proportional to the value, as rounding); absolute:
    y + scale eps."""
    ops: tuple[Literal["linear", "attention"], ...] = ("linear", "attention")
    """linear: every nn.Linear output; attention: the softmax(QK^T)V output of each
    attention."""
    backward: bool = False
    """Noise on the gradient at each op's output too (trainer side only: rollouts take none)."""
    include: tuple[str, ...] = ()
    """Module path patterns (exact path, '.'-suffix or glob) of the ops that get noise; empty
    include = every op."""
    exclude: tuple[str, ...] = ()
    """Module path patterns (as include) of ops left out, even when include matches them."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ConfigError(f"must be a finite number >= 0 (0: off), got {self.scale}",
                              "scale")
        if not self.ops:
            raise ConfigError(f"must name at least one of {list(OPS)}", "ops")

    @property
    def enabled(self) -> bool:
        return self.scale > 0


def _attention_outputs(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(attention path, its output projection): the projection's input is the PV product."""
    found = []
    for path, module in model.named_modules():
        if "attention" not in type(module).__name__.lower():
            continue
        proj = next((getattr(module, n) for n in OUTPUT_PROJECTIONS
                     if isinstance(getattr(module, n, None), nn.Module)), None)
        if proj is not None:
            found.append((path, proj))
    return found


def select_ops(model: nn.Module, config: OpNoiseConfig) -> list[tuple[str, str, nn.Module]]:
    """(op, path, module) of every op the noise reaches, in model order; raises on none."""
    candidates = []
    if "linear" in config.ops:
        candidates += [("linear", p, m) for p, m in model.named_modules()
                       if isinstance(m, nn.Linear)]
    if "attention" in config.ops:
        candidates += [("attention", p, m) for p, m in _attention_outputs(model)]
    selected = [(op, path, m) for op, path, m in candidates
                if (not config.include or any(path_matches(path, p) for p in config.include))
                and not any(path_matches(path, p) for p in config.exclude)]
    if not selected:
        raise NoTargetsError(
            f"matmul-output noise matched 0 ops in {type(model).__name__} (ops="
            f"{list(config.ops)}, include={list(config.include)}, exclude="
            f"{list(config.exclude)}; {len(candidates)} candidate ops before the patterns), "
            "so it would do nothing. Fix the ops or the include/exclude patterns.")
    return selected


class OpNoise(HookedPerturbation):
    """Matmul-output noise as a perturbation (engine side, trainer side, or both)."""

    name = "op_noise"

    def __init__(self, model: nn.Module, config: OpNoiseConfig, seed: int) -> None:
        if not config.enabled:
            raise ValueError(f"matmul-output noise needs scale > 0, got {config.scale}")
        super().__init__()
        self.config, self.seed = config, seed
        self.targets = select_ops(model, config)

    def apply(self, step: int) -> dict[str, float]:
        """Hook every op (once) and start counting the calls of ``step``."""
        self.start(step, lambda: [
            module.register_forward_hook(self._output_hook(path)) if op == "linear"
            else module.register_forward_pre_hook(self._input_hook(f"{path}.pv"))
            for op, path, module in self.targets])
        return {"op_noise/scale": self.config.scale,
                "op_noise/num_modules": float(len(self.targets))}

    def touches(self) -> list[str]:
        return [path if op == "linear" else f"{path}.pv" for op, path, _ in self.targets]

    def _noisy(self, y: Tensor, *seed_parts: object) -> Tensor:
        gen = torch.Generator(device=y.device)
        gen.manual_seed(derive_seed(self.seed, self.step, *seed_parts))
        eps = torch.randn(y.shape, generator=gen, device=y.device)
        yf = y.detach().float()
        # one fused op each (y + scale |y| eps): the hook runs on every matmul of every call
        if self.config.mode == "relative":
            noisy = torch.addcmul(yf, yf.abs(), eps, value=self.config.scale).to(y.dtype)
        else:
            noisy = yf.add(eps, alpha=self.config.scale).to(y.dtype)
        if y.requires_grad:  # the noise is an error term: the gradient goes straight through
            noisy = noisy + (y - y.detach())
            if self.config.backward:
                noisy.register_hook(self._grad_hook(*seed_parts))
        return noisy

    def _grad_hook(self, *seed_parts: object):
        def add_noise(grad: Tensor) -> Tensor:
            self.last.count_call(seed_parts[0], grad.numel())  # same module, one more call
            return self._noisy(grad, *seed_parts, "grad")
        return add_noise

    def _perturb(self, path: str, y: Tensor) -> Tensor:
        noisy = self._noisy(y, path, self.next_call(path))
        self.last.count_call(path, y.numel(), (noisy.detach() != y.detach()).sum())
        return noisy

    def _output_hook(self, path: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return self._perturb(path, output)
        return hook

    def _input_hook(self, path: str):
        def hook(module: nn.Module, args: tuple):
            return (self._perturb(path, args[0]), *args[1:])
        return hook
