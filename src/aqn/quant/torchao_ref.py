"""The same fake quantization done by torchao 0.18 (optional extra ``quant``): the reference.

Used by the tests (equality with ours) and bench/bench_quant.py (speed). It takes a 2-D
fp32 or bf16 weight and returns the dequantized tensor in the input dtype. On bf16 input
torchao computes the int4/int8/fp8 scales in bf16, ours always in fp32: pass fp32 to
compare bit for bit.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def _torchao():
    with warnings.catch_warnings():  # its optional CUDA kernels fail to load on CPU, noisily
        warnings.simplefilter("ignore")
        import torchao.quantization.quant_primitives as qp
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    return qp, MXTensor, NVFP4Tensor, per_tensor_amax_to_scale, PerRow, Int8Tensor


def _nvfp4(w: Tensor) -> Tensor:
    _, _, NVFP4Tensor, per_tensor_amax_to_scale, _, _ = _torchao()
    scale = per_tensor_amax_to_scale(w.abs().amax())
    return NVFP4Tensor.to_nvfp4(w, per_tensor_scale=scale).dequantize(w.dtype)


def _mxfp4(w: Tensor) -> Tensor:
    _, MXTensor, *_ = _torchao()
    return MXTensor.to_mx(w, torch.float4_e2m1fn_x2, 32).dequantize(w.dtype)


def _int4(w: Tensor) -> Tensor:
    # torchao's affine quantization primitives with int4 codes 0..15 in groups of 128 (its
    # int4 tensor classes, e.g. Int4PlainInt32Tensor, are XPU/NPU kernels, not a CPU path)
    qp, *_ = _torchao()
    block = (1, 128)
    scale, zero = qp.choose_qparams_affine(w, qp.MappingType.ASYMMETRIC, block, torch.int32,
                                           0, 15, 1e-6, None, torch.int32)
    q = qp.quantize_affine(w, block, scale, zero, torch.int32, 0, 15)
    return qp.dequantize_affine(q, block, scale, zero, torch.int32, 0, 15, output_dtype=w.dtype)


def _int8(w: Tensor) -> Tensor:
    *_, PerRow, Int8Tensor = _torchao()
    return Int8Tensor.from_hp(w, PerRow()).dequantize(w.dtype)


def _fp8_e4m3(w: Tensor) -> Tensor:
    qp, *_ = _torchao()
    scale = qp._choose_scale_float8(w, list(w.shape), torch.float8_e4m3fn)
    q = qp._quantize_affine_float8(w, scale, torch.float8_e4m3fn)
    return qp._dequantize_affine_float8(q, scale, w.dtype)


TORCHAO_FAKE_QUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "nvfp4": _nvfp4,
    "mxfp4": _mxfp4,
    "int4": _int4,
    "int8": _int8,
    "fp8_e4m3": _fp8_e4m3,
}


# torchao asserts the last dimension is a multiple of these; ours zero-pads, which changes
# no scale, so the reference pads the same way (SmolLM2's width 576 is not a multiple of 128).
BLOCK = {"nvfp4": 16, "mxfp4": 32, "int4": 128, "int8": 1, "fp8_e4m3": 1}


@torch.no_grad()
def torchao_fake_quantize(w: Tensor, fmt: str) -> Tensor:
    """torchao's quantize + dequantize of a 2-D weight; raises ImportError without torchao."""
    width = w.shape[-1]
    x = F.pad(w.detach(), (0, -width % BLOCK[fmt])).contiguous()
    return TORCHAO_FAKE_QUANT[fmt](x)[..., :width]
