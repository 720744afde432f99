"""Rounding of fp32 values to a 16-bit float format (bf16 or fp16), and a split-K matmul whose
running sum is kept in that format.

Every function takes and returns fp32 tensors whose values, after rounding, lie on the
format's grid (so casting them to the format afterwards is exact). Rounding is
straight-through: in the backward pass it is the identity, so an emulated model can also be
trained.

The two formats (``PRECISIONS``): bf16 has fp32's 8 exponent bits and 7 mantissa bits; fp16
has 5 exponent bits and 10 mantissa bits: 8x finer spacing, a range of +-65504 (overflow
gives inf, as a real fp16 kernel does) and subnormals below 2^-14 (spacing 2^-24).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RoundingMode = Literal["rne", "truncate", "stochastic"]
ROUNDING_MODES: tuple[str, ...] = ("rne", "truncate", "stochastic")


@dataclass(frozen=True)
class Precision:
    """A 16-bit float format: its torch dtype and the shape of its grid."""

    name: str
    dtype: torch.dtype
    mantissa_bits: int  # explicit fraction bits
    min_exponent: int  # exponent of the smallest normal number; below it the spacing is fixed

    @property
    def max_finite(self) -> float:
        return float(torch.finfo(self.dtype).max)


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", torch.bfloat16, mantissa_bits=7, min_exponent=-126),
    "fp16": Precision("fp16", torch.float16, mantissa_bits=10, min_exponent=-14),
}

_LOW_MASK = 0xFFFF  # the 16 low bits of an fp32 that bf16 drops
_HIGH_MASK = -65536  # 0xFFFF0000 as a signed int32


def _bf16_no_grad(x: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    """bf16 is fp32 with the 16 low bits dropped: truncation and stochastic rounding act on
    the bits directly (fp32 subnormals and the overflow to inf included)."""
    bits = x.view(torch.int32)
    if mode == "truncate":
        # fp32 is sign-magnitude: clearing the low mantissa bits rounds toward zero
        return (bits & _HIGH_MASK).view(torch.float32)
    # adding a uniform 16-bit integer to the magnitude carries into the kept bits with
    # probability (dropped bits) / 2^16: round away from zero with probability equal to the
    # distance to the lower neighbour, in units of the bf16 spacing -> unbiased
    noise = torch.randint(0, _LOW_MASK + 1, x.shape, generator=generator, dtype=torch.int32,
                          device=x.device)
    return ((bits + noise) & _HIGH_MASK).view(torch.float32)


def _grid_no_grad(x: Tensor, p: Precision, mode: str, generator: torch.Generator | None
                  ) -> Tensor:
    """Truncation or stochastic rounding onto ``p``'s grid by its spacing (fp16, whose
    exponent range is not fp32's). Every step is exact in fp32: the spacing is a power of two
    (2^(max(e, emin) - mantissa bits) for |x| in [2^e, 2^(e+1))), so |x| / spacing, its floor
    and the fraction dropped are computed without rounding."""
    ax = x.abs()
    _, e = torch.frexp(ax)  # ax = m 2^e with m in [0.5, 1): its binary exponent is e - 1
    exponent = torch.clamp(e - 1, min=p.min_exponent) - p.mantissa_bits
    spacing = ((exponent + 127) << 23).view(torch.float32)  # 2^exponent, built from its bits
    q = ax / spacing
    low = torch.floor(q)
    if mode == "stochastic":
        # away from zero with probability equal to the dropped fraction of a spacing (a
        # uniform draw on multiples of 2^-24): unbiased to within 2^-24 of a spacing
        u = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        low = low + (u < q - low).float()
    out = low * spacing
    # past the largest finite value: rounding toward zero saturates there (IEEE), rounding up
    # is an overflow to inf
    out = (torch.clamp(out, max=p.max_finite) if mode == "truncate"
           else torch.where(out > p.max_finite, torch.inf, out))
    out = torch.where(torch.isinf(ax), ax, out)
    return torch.copysign(out, x)  # -0.0 stays -0.0, as does a negative rounded to zero


def _round_no_grad(x: Tensor, p: Precision, mode: str, generator: torch.Generator | None
                   ) -> Tensor:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; known: {', '.join(ROUNDING_MODES)}")
    if mode == "rne":
        # PyTorch's float -> bf16 / fp16 conversion rounds to nearest, ties to even
        return x.to(p.dtype).to(torch.float32)
    out = _bf16_no_grad(x, mode, generator) if p.name == "bf16" else \
        _grid_no_grad(x, p, mode, generator)
    # NaN payloads live in the low bits: masking them could turn a NaN into an infinity
    return torch.where(torch.isnan(x), x, out)


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}") from None


def round_to(x: Tensor, precision_name: str = "bf16", mode: str = "rne",
             generator: torch.Generator | None = None) -> Tensor:
    """``x`` rounded to the nearest ``precision_name`` (bf16, fp16) values by ``mode``, in fp32.

    ``rne``: round to nearest, ties to even (PyTorch's cast; overflow to inf). ``truncate``:
    toward zero (saturating at the largest finite value). ``stochastic``: up or down with
    probabilities proportional to the distances, drawn from ``generator``; unbiased (rounding
    up past the largest finite value gives inf). Gradients pass straight through.
    """
    p = precision(precision_name)
    xf = x.float()
    with torch.no_grad():
        rounded = _round_no_grad(xf.detach(), p, mode, generator)
    if torch.is_grad_enabled() and xf.requires_grad:
        return xf + (rounded - xf).detach()
    return rounded


def round_bf16(x: Tensor, mode: str = "rne", generator: torch.Generator | None = None) -> Tensor:
    """``round_to(x, "bf16", mode, generator)``."""
    return round_to(x, "bf16", mode, generator)


def split_k_linear(x: Tensor, weight: Tensor, bias: Tensor | None, chunk: int,
                   mode: str = "rne", generator: torch.Generator | None = None,
                   precision_name: str = "bf16") -> Tensor:
    """``x @ weight.T + bias`` with the reduction dimension K cut into chunks of ``chunk``.

    Each chunk's partial product is computed in fp32 (as inside one matmul tile); the running
    sum is rounded to ``precision_name`` after every chunk (``mode``), and once more after the
    bias: the accumulation order and precision of a kernel that keeps its split-K partial
    sums in 16 bits (in fp16 a running sum past 65504 overflows to inf, as there).
    Returns fp32 values on the format's grid.
    """
    if chunk < 1:
        raise ValueError(f"split-K chunk must be >= 1, got {chunk}")
    xf, wf = x.float(), weight.float()
    k = xf.shape[-1]
    acc: Tensor | None = None
    for start in range(0, k, chunk):
        part = torch.matmul(xf[..., start:start + chunk], wf[:, start:start + chunk].T)
        acc = round_to(part if acc is None else acc + part, precision_name, mode, generator)
    if acc is None:  # K = 0
        acc = xf.new_zeros((*xf.shape[:-1], wf.shape[0]))
    if bias is not None:
        acc = round_to(acc + bias.float(), precision_name, mode, generator)
    return acc
