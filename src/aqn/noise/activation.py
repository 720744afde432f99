"""Activation noise on the outputs of the RMSNorm modules (a rollout-engine perturbation).

Where AQN perturbs the norms' *weights* once per step, this perturbs what the norms
*compute*, on every call: ``y <- y + sigma * |y| * eps`` with ``eps ~ N(0, 1)`` drawn fresh
for each call, seeded by (seed, step, module path, call number), so a run repeats to the bit.
It is relative noise on an activation, the shape of error that low-precision hardware adds,
and the norm output feeds every attention and MLP block. Forward hooks carry it, so it counts
the calls it saw: a step where it was applied and no hook fired is an error (hooks do not
fire in compiled or CUDA-graph models; ``aqn.firing``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from aqn.errors import NoTargetsError
from aqn.firing import Firing
from aqn.hashing import derive_seed
from aqn.noise.selection import select_norms


class NormOutputNoise:
    name = "activation_noise"

    def __init__(self, model: nn.Module, sigma: float, seed: int,
                 class_patterns: tuple[str, ...] = ("rmsnorm",)) -> None:
        if not sigma > 0:
            raise ValueError(f"activation noise needs sigma > 0, got {sigma}")
        self.sigma, self.seed = float(sigma), seed
        try:
            self.targets = select_norms(model, class_patterns)
        except NoTargetsError as e:
            raise NoTargetsError(f"activation noise: {e}") from None
        self.step: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, int] = defaultdict(int)
        self.last = Firing.empty(by_calls=True)

    def writes(self) -> list[Tensor]:
        return []  # hooks on outputs, never weights

    def refresh(self) -> None:
        """New weights were loaded: nothing to do, the hooks read only the outputs."""

    def apply(self, step: int) -> dict[str, float]:
        """Hook every target (once) and start counting the calls of ``step``."""
        self.step = step
        self._calls.clear()
        self.last = Firing.empty(by_calls=True)
        if not self._handles:
            self._handles = [module.register_forward_hook(self._hook(path))
                             for path, module in self.targets]
        return {"act_noise/sigma": self.sigma, "act_noise/num_modules": float(len(self.targets))}

    def firing(self) -> Firing:
        return self.last

    def restore(self) -> None:
        """Remove the hooks: the model computes exactly as before ``apply``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, path: str):
        def add_noise(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            call = self._calls[path]
            self._calls[path] += 1
            gen = torch.Generator(device=output.device)
            gen.manual_seed(derive_seed(self.seed, self.step, path, call))
            eps = torch.randn(output.shape, generator=gen, device=output.device)
            y = output.float()
            noisy = (y + self.sigma * y.abs() * eps).to(output.dtype)
            self.last.count_call(path, output.numel(), (noisy != output).sum())
            return noisy

        return add_noise
