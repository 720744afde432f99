"""Simulated hardware numerics (layer 1): bf16 / fp16 rounding modes, split-K accumulation,
RMSNorm cast order and low-precision activations, installed on a model in place.

    from aqn.numerics import NumericsEmulator, emulate, PROFILES
    with emulate(model, "npu-like", seed=0, step=3):
        logits = model(ids).logits

This is a simulation of kinds of numerical difference, not a measurement of a chip.
"""

from aqn.numerics.emulator import NumericsEmulator, emulate
from aqn.numerics.profiles import (
    ACTIVATION_ROUNDING,
    MATMUL_MODES,
    NORM_CASTS,
    OP_DTYPES,
    PROFILE_PRECISIONS,
    PROFILES,
    NumericsProfile,
    get_profile,
    precision_of,
)
from aqn.numerics.published import (
    PUBLISHED_MISMATCH,
    PublishedMismatch,
    compare_to_published,
    mismatch_report,
)
from aqn.numerics.rounding import PRECISIONS, ROUNDING_MODES, round_bf16, round_to, split_k_linear

__all__ = [
    "ACTIVATION_ROUNDING",
    "MATMUL_MODES",
    "NORM_CASTS",
    "OP_DTYPES",
    "PRECISIONS",
    "PROFILES",
    "PROFILE_PRECISIONS",
    "PUBLISHED_MISMATCH",
    "ROUNDING_MODES",
    "NumericsEmulator",
    "NumericsProfile",
    "PublishedMismatch",
    "compare_to_published",
    "emulate",
    "get_profile",
    "mismatch_report",
    "precision_of",
    "round_bf16",
    "round_to",
    "split_k_linear",
]
