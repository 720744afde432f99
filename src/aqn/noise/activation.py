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

import torch
from torch import Tensor, nn

from aqn.errors import NoTargetsError
from aqn.firing import HookedPerturbation
from aqn.hashing import derive_seed
from aqn.noise.selection import select_norms


class NormOutputNoise(HookedPerturbation):
    name = "activation_noise"

    def __init__(self, model: nn.Module, sigma: float, seed: int,
                 class_patterns: tuple[str, ...] = ("rmsnorm",)) -> None:
        if not sigma > 0:
            raise ValueError(f"activation noise needs sigma > 0, got {sigma}")
        super().__init__()
        self.sigma, self.seed = float(sigma), seed
        try:
            self.targets = select_norms(model, class_patterns)
        except NoTargetsError as e:
            raise NoTargetsError(f"activation noise: {e}") from None

    def apply(self, step: int) -> dict[str, float]:
        """Hook every target (once) and start counting the calls of ``step``."""
        self.start(step, lambda: [module.register_forward_hook(self._hook(path))
                                  for path, module in self.targets])
        return {"act_noise/sigma": self.sigma, "act_noise/num_modules": float(len(self.targets))}

    def touches(self) -> list[str]:
        return [path for path, _ in self.targets]

    def _hook(self, path: str):
        def add_noise(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            gen = torch.Generator(device=output.device)
            gen.manual_seed(derive_seed(self.seed, self.step, path, self.next_call(path)))
            eps = torch.randn(output.shape, generator=gen, device=output.device)
            y = output.float()
            noisy = (y + self.sigma * y.abs() * eps).to(output.dtype)
            self.last.count_call(path, output.numel(), (noisy != output).sum())
            return noisy

        return add_noise
