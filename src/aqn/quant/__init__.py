"""Simulated weight quantization (NVFP4, MXFP4, INT4, INT8, FP8 E4M3), pure PyTorch.

torchao (the optional extra ``quant``) is only the reference in tests and benchmarks
(``aqn.quant.torchao_ref``); nothing here needs it.
"""

from aqn.errors import NoTargetsError
from aqn.quant.formats import FORMATS, check_format, fake_quantize, round_e2m1, round_e4m3
from aqn.quant.model import (
    DEFAULT_EXCLUDE,
    LoadTimeWeightQuantizer,
    WeightQuantizer,
    quantize_model,
    select_linears,
)
from aqn.quant.report import LayerError, QuantReport

__all__ = [
    "DEFAULT_EXCLUDE",
    "FORMATS",
    "LayerError",
    "LoadTimeWeightQuantizer",
    "NoTargetsError",
    "QuantReport",
    "WeightQuantizer",
    "check_format",
    "fake_quantize",
    "quantize_model",
    "round_e2m1",
    "round_e4m3",
    "select_linears",
]
