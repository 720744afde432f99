"""Fake quantization of the inputs of Linear modules: the A of W4A4 (weights: ``model.py``).

A forward pre-hook replaces each targeted Linear's input ``x`` by ``Q(x)``, the formats'
``fake_quantize`` along the input dimension (MXFP4 / NVFP4 blocks of 32 / 16 per token, INT8
per token, FP8 / NVFP4's per-tensor scale over the whole input), so its values are exactly
those torchao gives for the same tensor. When gradients flow (trainer side) the estimator is
straight-through: the forward sees ``Q(x)`` to the bit, the backward passes the gradient to
``x`` unchanged. The hooks count their calls (``aqn.firing``), so hooks that never fire stop
the run. LoRA adapters (peft's ``lora_A`` / ``lora_B``) keep full-precision inputs by default.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from aqn.firing import HookedPerturbation
from aqn.quant.formats import check_format, fake_quantize
from aqn.quant.model import DEFAULT_EXCLUDE, select_linears


def quantize_input(x: Tensor, fmt: str) -> Tensor:
    """``Q(x)`` in the forward, the identity in the backward (straight-through). With
    gradients the forward value is ``Q(x) + (x - x)``: the same bits, except that -0 is +0."""
    q = fake_quantize(x.detach(), fmt)
    return q + (x - x.detach()) if x.requires_grad else q


class ActivationQuantizer(HookedPerturbation):
    """Input quantization of Linear modules as a perturbation (engine or trainer side)."""

    name = "act_quant"

    def __init__(self, model: nn.Module, fmt: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = DEFAULT_EXCLUDE) -> None:
        super().__init__()
        self.fmt = check_format(fmt)
        self._modules = dict(select_linears(model, include, exclude))
        self.targets = list(self._modules)

    def apply(self, step: int) -> dict[str, float]:
        """Hook every target (once) and start counting the calls of ``step``."""
        self.start(step, lambda: [m.register_forward_pre_hook(self._hook(path))
                                  for path, m in self._modules.items()])
        return {"act_quant/num_modules": float(len(self.targets))}

    def touches(self) -> list[str]:
        return self.targets

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple):
            x = args[0]
            q = quantize_input(x, self.fmt)
            self.last.count_call(path, x.numel(), (q.detach() != x.detach()).sum())
            return (q, *args[1:])
        return hook
