"""bf16 rounding of fp32 values and a split-K matmul with a bf16 running sum.

Every function takes and returns fp32 tensors whose values, after rounding, lie on the bf16
grid (so casting them to bf16 afterwards is exact). Rounding is straight-through: in the
backward pass it is the identity, so an emulated model can also be trained.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

RoundingMode = Literal["rne", "truncate", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("rne", "truncate", "stochastic")

_LOW_MASK = 0xFFFF  # the 16 low bits of an fp32 that bf16 drops
_HIGH_MASK = -65536  # 0xFFFF0000 as a signed int32


def _round_no_grad(x: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    if mode == "rne":
        # PyTorch's float -> bf16 conversion rounds to nearest, ties to even
        return x.to(torch.bfloat16).to(torch.float32)
    bits = x.view(torch.int32)
    if mode == "truncate":
        # fp32 is sign-magnitude: clearing the low mantissa bits rounds toward zero
        out = (bits & _HIGH_MASK).view(torch.float32)
    elif mode == "stochastic":
        # adding a uniform 16-bit integer to the magnitude carries into the kept bits with
        # probability (dropped bits) / 2^16: round away from zero with probability equal to
        # the distance to the lower neighbour, in units of the bf16 spacing -> unbiased
        noise = torch.randint(0, _LOW_MASK + 1, x.shape, generator=generator,
                              dtype=torch.int32, device=x.device)
        out = ((bits + noise) & _HIGH_MASK).view(torch.float32)
    else:
        raise ValueError(f"unknown rounding mode {mode!r}; known: {', '.join(ROUNDING_MODES)}")
    # NaN payloads live in the low bits: masking them could turn a NaN into an infinity
    return torch.where(torch.isnan(x), x, out)


def round_bf16(x: Tensor, mode: str = "rne", generator: torch.Generator | None = None) -> Tensor:
    """``x`` rounded to the nearest bf16 values by ``mode``, returned in fp32.

    ``rne``: round to nearest, ties to even (PyTorch's cast). ``truncate``: toward zero.
    ``stochastic``: up or down with probabilities proportional to the distances, drawn from
    ``generator``; unbiased. Gradients pass straight through.
    """
    xf = x.float()
    with torch.no_grad():
        rounded = _round_no_grad(xf.detach(), mode, generator)
    if torch.is_grad_enabled() and xf.requires_grad:
        return xf + (rounded - xf).detach()
    return rounded


def split_k_linear(x: Tensor, weight: Tensor, bias: Tensor | None, chunk: int,
                   mode: str = "rne", generator: torch.Generator | None = None) -> Tensor:
    """``x @ weight.T + bias`` with the reduction dimension K cut into chunks of ``chunk``.

    Each chunk's partial product is computed in fp32 (as inside one matmul tile); the running
    sum is rounded to bf16 after every chunk (``mode``), and once more after the bias: the
    accumulation order and precision of a kernel that keeps its split-K partial sums in bf16.
    Returns fp32 values on the bf16 grid.
    """
    if chunk < 1:
        raise ValueError(f"split-K chunk must be >= 1, got {chunk}")
    xf, wf = x.float(), weight.float()
    k = xf.shape[-1]
    acc: Tensor | None = None
    for start in range(0, k, chunk):
        part = torch.matmul(xf[..., start:start + chunk], wf[:, start:start + chunk].T)
        acc = round_bf16(part if acc is None else acc + part, mode, generator)
    if acc is None:  # K = 0
        acc = xf.new_zeros((*xf.shape[:-1], wf.shape[0]))
    if bias is not None:
        acc = round_bf16(acc + bias.float(), mode, generator)
    return acc
