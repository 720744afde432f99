"""Fake quantization of weight tensors: quantize, then dequantize back to the input dtype.

All arithmetic runs in fp32 whatever the input dtype, in the same order of operations as
torchao 0.18 (the reference the tests compare against), so results agree with it to the bit
on CPU for fp32 inputs, and for bf16 inputs that torchao is given as fp32 (on bf16 torchao
computes the int4/int8/fp8 scales in bf16); tests/test_peers.py compares the bits, signs of
zeros included. One deviation: an nvfp4 tensor of subnormals (amax < 2^-100) is quantized
scaled up, where torchao's reciprocal scale overflows into garbage. CPU and CUDA agree to
the bit too: divisions by constants are true divisions (CUDA turns ``x / 127.5`` into
``x * (1 / 127.5)``, so torchao on CUDA can be one ulp off in a scale, moving rare
elements one step).

Blocks and groups run along the last (input) dimension; a last dimension that is not a
multiple of the block size is zero-padded, which changes no scale (zeros never raise an
absolute maximum, and the int4 range always contains zero). All-zero tensors, blocks and
rows come back as zeros.

Formats:

- ``nvfp4``: E2M1 elements in blocks of 16, each block scale stored in FP8 E4M3, times
  one fp32 per-tensor scale amax / (448 * 6) (NVIDIA's two-level scaling).
- ``mxfp4``: E2M1 elements in blocks of 32, power-of-two (E8M0) block scale
  2^(floor(log2 amax) - 2): the OCP MX "floor" rule, torchao's default
  ``ScaleCalculationMode.FLOOR``. Elements above 6 after scaling saturate to 6.
- ``int4``: asymmetric min-max round-to-nearest in groups of 128, codes 0..15 with an
  integer zero point, the range stretched to contain 0: the GPTQ/AWQ RTN convention and
  torchao's affine primitives ``choose_qparams_affine(ASYMMETRIC)`` / ``quantize_affine``
  with codes 0..15 and eps 1e-6 (torchao's int4 tensor classes are GPU/XPU/NPU kernels).
- ``int8``: symmetric per output channel (per row), torchao's ``Int8Tensor`` convention:
  scale = amax / 127.5 and codes in [-128, 127], so a row's largest positive element can
  clip by half a step (the other common choice is amax / 127 over [-127, 127]).
- ``fp8_e4m3``: one fp32 per-tensor scale amax / 448, elements rounded to float8_e4m3fn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from aqn.errors import ConfigError

# (mantissa bits, smallest normal exponent, largest value) of the element formats
E2M1 = (1, 0, 6.0)
E4M3 = (3, -6, 448.0)  # float8_e4m3fn
E2M1_MAX, E4M3_MAX = E2M1[2], E4M3[2]
E4M3_TINY = 2.0**-6  # smallest normal E4M3: the smallest NVFP4 block scale, as torchao
F32_EPS = torch.finfo(torch.float32).eps
INT4_EPS = 1e-6  # smallest int4 group scale, as in the torchao reference
NVFP4_BLOCK, MXFP4_BLOCK, INT4_GROUP = 16, 32, 128


def round_e2m1(x: Tensor) -> Tensor:
    """Round to the nearest E2M1 value (+-{0, .5, 1, 1.5, 2, 3, 4, 6}), saturating; fp32 out."""
    return _round_float_(x.to(torch.float32, copy=True), *E2M1)


def round_e4m3(x: Tensor) -> Tensor:
    """Round to the nearest float8_e4m3fn value, saturating at +-448; fp32 out."""
    return _round_float_(x.to(torch.float32, copy=True), *E4M3)


def _round_float_(y: Tensor, mbits: int, min_exp: int, max_value: float) -> Tensor:
    """Round fp32 ``y`` in place to a small float format, saturating (no inf/NaN codes).

    The grid step at |y| is 2^(exponent - mbits), the exponent being that of
    clamp(|y|, 2^min_exp, max) read off the fp32 bits (below 2^min_exp: the subnormal
    step). E2M1: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]. ``round`` ties to even, which
    picks the even code, as the hardware, torch's float8 cast and torchao's E2M1 cast do
    (E2M1: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 3.5 -> 4, 5 -> 4); the sign is kept (-0.2 ->
    -0.0). Branch-free arithmetic: about 5x faster than ``torch.where`` or torch's
    float8 cast on CPU, and equal to the latter to the bit (tests).
    """
    step = y.abs().clamp_(2.0**min_exp, max_value)
    step.view(torch.int32).bitwise_and_(0x7F800000)  # keep the exponent: 2^floor(log2)
    step.mul_(2.0**-mbits)
    return y.clamp_(-max_value, max_value).div_(step).round_().mul_(step)


def _amax(x: Tensor, dim: int | None = None) -> Tensor:
    """max |x|, over ``dim`` (kept) or all."""
    return x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)


def _div(x: Tensor, c: float) -> Tensor:
    """``x / c`` rounded as a true division on every device: CUDA computes a division by a
    Python number as a multiplication by its reciprocal, which can be one ulp off."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)


def _blocks(x: Tensor, size: int) -> Tensor:
    """``x`` as [..., n_blocks, size], zero-padded along the last dimension."""
    pad = -x.shape[-1] % size
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size)


def _unblocks(xb: Tensor, width: int) -> Tensor:
    return xb.flatten(-2)[..., :width]


# Each quantizer takes fp32 ``x`` (never modified) and returns a new fp32 tensor; in-place
# ops on its own scratch tensors keep it to about two full-size allocations.

def _nvfp4(x: Tensor) -> Tensor:
    amax = _amax(x)
    # A tensor whose amax is below 2^-100 would make 1 / tensor_scale overflow to inf and
    # 0 * inf = nan (torchao turns that into garbage, e.g. -0 -> -2.5e-40). Scaling by 2^64
    # is exact and changes no ratio the format sees, so such a tensor is done scaled up.
    up = torch.where(amax < 2.0**-100, 2.0**64, 1.0)
    xb = _blocks(x, NVFP4_BLOCK) * up
    amax = amax * up
    # The per-tensor scale lets the E4M3 block scales use their whole range up to 448.
    # An all-zero tensor keeps scale 1 (torchao divides by zero and returns NaN).
    tensor_scale = torch.where(amax > 0, _div(amax, E4M3_MAX * E2M1_MAX), 1.0)
    block_scale = _div(_amax(xb, -1), E2M1_MAX) / tensor_scale
    block_scale = block_scale.clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn).float()
    # multiply by the reciprocal, in torchao's order, so the results agree to the bit
    q = _round_float_(xb * ((1.0 / tensor_scale) / block_scale), *E2M1)
    return _unblocks(q.mul_(tensor_scale * block_scale).div_(up), x.shape[-1])


def _mxfp4(x: Tensor) -> Tensor:
    xb = _blocks(x, MXFP4_BLOCK)
    # amax = m * 2^e with m in [0.5, 1), so floor(log2 amax) = e - 1; 2 is E2M1's largest
    # exponent (6 = 1.5 * 2^2). The lower clamp keeps the scale a normal fp32 as torchao
    # does; blocks that small (amax < 2^-123) dequantize with 2^-127 there, to ~0 anyway.
    _, e = torch.frexp(_amax(xb, -1))
    scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), (e - 3).clamp(min=-126))
    return _unblocks(_round_float_(xb / scale, *E2M1).mul_(scale), x.shape[-1])


def _int4(x: Tensor) -> Tensor:
    xb = _blocks(x, INT4_GROUP)
    lo = xb.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xb.amax(-1, keepdim=True).clamp(min=0.0)
    scale = _div(hi - lo, 15).clamp(min=INT4_EPS)
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    q = (xb * (1.0 / scale)).round_().add_(zero).clamp_(0, 15)
    return _unblocks(q.sub_(zero).mul_(scale), x.shape[-1])


def _int8(x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    scale = _div(_amax(rows, -1), 127.5).clamp(min=F32_EPS)
    # through int8 storage, as the format holds it: a value rounded to -0 comes back +0
    q = (rows * (1.0 / scale)).round_().clamp_(-128, 127).to(torch.int8)
    return q.float().mul_(scale).reshape(x.shape)


def _fp8_e4m3(x: Tensor) -> Tensor:
    amax = _amax(x)
    scale = torch.where(amax > 0, _div(amax, E4M3_MAX), 1.0)
    return _round_float_(x / scale, *E4M3).mul_(scale)


_FAKE_QUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "nvfp4": _nvfp4,
    "mxfp4": _mxfp4,
    "int4": _int4,
    "int8": _int8,
    "fp8_e4m3": _fp8_e4m3,
}
FORMATS: tuple[str, ...] = tuple(_FAKE_QUANT)


def check_format(fmt: str, key: str | None = None) -> str:
    """``fmt`` itself when it is a known format; else a ConfigError naming ``key`` (the config
    key or flag that gave it)."""
    if fmt not in _FAKE_QUANT:
        raise ConfigError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}",
                          key)
    return fmt


@torch.no_grad()
def fake_quantize(w: Tensor, fmt: str) -> Tensor:
    """``w`` quantized to ``fmt`` and dequantized: same shape, dtype and device, new tensor."""
    quantize = _FAKE_QUANT[check_format(fmt)]
    if not w.is_floating_point():
        raise TypeError(f"fake_quantize needs a floating-point tensor, got {w.dtype}")
    x = w.detach().float()
    if x.ndim == 0:
        x = x.reshape(1)
    return quantize(x).reshape(w.shape).to(w.dtype)


# The elements that share a scale: a block along the last dimension, a row, or the tensor.
SCALE_GROUP: dict[str, int | str] = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK,
                                     "int4": INT4_GROUP, "int8": "row", "fp8_e4m3": "tensor"}


@torch.no_grad()
def clip_stats(w: Tensor, fmt: str) -> tuple[float, float]:
    """(deadzone, saturation) of ``w`` under ``fmt``: the fraction of its non-zero elements
    rounded to zero, and the fraction of all elements above their scale group's largest
    code (clipped to it: ``|w| > |Q(w)|`` where ``|Q(w)|`` is the group's maximum)."""
    x = w.detach().float().reshape(-1, w.shape[-1]) if w.ndim else w.detach().float().reshape(1, 1)
    q = fake_quantize(x, fmt)
    nonzero = x != 0
    deadzone = float((nonzero & (q == 0)).sum()) / max(1, int(nonzero.sum()))
    group = SCALE_GROUP[check_format(fmt)]
    if group == "tensor":
        top = q.abs().amax().expand_as(q)
    elif group == "row":
        top = q.abs().amax(-1, keepdim=True).expand_as(q)
    else:
        qb = _blocks(q, group)
        top = _unblocks(_amax(qb, -1).expand_as(qb), q.shape[-1])
    saturated = (x.abs() > q.abs()) & (q.abs() == top)
    return deadzone, float(saturated.sum()) / x.numel()
