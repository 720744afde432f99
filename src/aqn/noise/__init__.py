"""Adaptive Quantization Noise: schedule, module selection, injector (pure PyTorch)."""

from aqn.errors import NoTargetsError
from aqn.noise.config import NoiseInjectionConfig
from aqn.noise.injector import (
    NoiseInjector,
    NoiseReport,
    NoiseSwallowedWarning,
    noise_seed,
    stage_reports,
)
from aqn.noise.schedule import PRESETS, SigmaSchedule, StageRow, get_preset
from aqn.noise.selection import NormTarget, describe_targets, select_norms

__all__ = [
    "PRESETS",
    "NoTargetsError",
    "NoiseInjectionConfig",
    "NoiseInjector",
    "NoiseReport",
    "NoiseSwallowedWarning",
    "NormTarget",
    "SigmaSchedule",
    "StageRow",
    "describe_targets",
    "get_preset",
    "noise_seed",
    "select_norms",
    "stage_reports",
]
