"""QeRL's staged sigma schedule for Adaptive Quantization Noise.

Over ``total_steps`` optimizer steps and ``K = num_stages`` stages of equal length
``total_steps / K``: stage 0 is a warm-up without noise; stage ``k >= 1`` uses a
geometric interpolation from ``sigma_start`` to ``sigma_end``.

``repeat=True`` is the epoch-aware schedule: ``total_steps`` is one epoch's steps and each
epoch runs the whole schedule again, warm-up included.

``exponent="qerl-code"`` (default) uses ``(k - 1) / (K - 2)`` as QeRL's code does, so the
last stage reaches ``sigma_end``; ``exponent="paper"`` uses ``(k - 1) / (K - 1)`` as the
paper writes it, so the last stage stops one step short of ``sigma_end``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

Exponent = Literal["qerl-code", "paper"]
EXPONENTS: tuple[str, ...] = ("qerl-code", "paper")
# Where stages switch: "qerl-code" as QeRL's released code (a float floor division);
# "exact": floor(step * K / T) in integers (earlier aqn).
Boundaries = Literal["qerl-code", "exact"]
BOUNDARIES: tuple[str, ...] = ("qerl-code", "exact")


@dataclass(frozen=True)
class Preset:
    sigma_start: float
    sigma_end: float
    num_stages: int
    source: str


PRESETS: dict[str, Preset] = {
    "qerl": Preset(0.05, 0.0005, 10, "QeRL config defaults, paper section 4.1"),
    "qerl-scripts": Preset(0.01, 0.0001, 10, "QeRL's shipped training scripts"),
    "mild": Preset(0.025, 0.00025, 10, "half of QeRL"),
    "strong": Preset(0.10, 0.001, 10, "double QeRL"),
    "small": Preset(0.01, 0.001, 5, "the first verl port"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown AQN preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class StageRow:
    stage: int
    first_step: int
    last_step: int
    sigma: float


class SigmaSchedule:
    """Maps a global optimizer step (0-based) to a stage and a sigma."""

    def __init__(
        self,
        sigma_start: float,
        sigma_end: float,
        num_stages: int,
        total_steps: int,
        exponent: Exponent = "qerl-code",
        boundaries: Boundaries = "qerl-code",
        repeat: bool = False,
    ) -> None:
        if boundaries not in BOUNDARIES:
            raise ValueError(f"boundaries must be one of {BOUNDARIES}, got {boundaries!r}")
        if exponent not in EXPONENTS:
            raise ValueError(f"exponent must be one of {EXPONENTS}, got {exponent!r}")
        for name, value in (("sigma_start", sigma_start), ("sigma_end", sigma_end)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        # stage 0 is warm-up; the exponent's denominator (K-2 or K-1) must be positive
        min_stages = 3 if exponent == "qerl-code" else 2
        if not isinstance(num_stages, int) or num_stages < min_stages:
            raise ValueError(
                f"num_stages must be an integer >= {min_stages} with exponent={exponent!r} "
                f"(stage 0 is a noise-free warm-up), got {num_stages!r}"
            )
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be an integer > 0, got {total_steps!r}")
        if total_steps < num_stages:
            warnings.warn(
                f"total_steps ({total_steps}) < num_stages ({num_stages}): some stages "
                "have no step at all",
                stacklevel=2,
            )
        if sigma_end > sigma_start:
            warnings.warn(
                f"sigma_end ({sigma_end}) > sigma_start ({sigma_start}): noise will grow "
                "over training, the reverse of QeRL's schedule",
                stacklevel=2,
            )
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.num_stages = num_stages
        self.total_steps = total_steps
        self.exponent = exponent
        self.boundaries = boundaries
        # repeat: every total_steps steps (an epoch) the schedule starts again at stage 0
        self.repeat = repeat

    def stage(self, step: int) -> int:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return self._stage(step % self.total_steps if self.repeat else step)

    def _stage(self, step: int) -> int:
        if self.boundaries == "qerl-code":
            # QeRL's released code: a float floor division, step // (T / K). For some (K, T)
            # it puts a boundary one step before or after the exact one; runs that are to be
            # compared with QeRL's must switch stage where it does.
            stage = int(step // (self.total_steps / self.num_stages))
        else:  # floor(step / (T / K)) in exact integer arithmetic
            stage = min(step, self.total_steps) * self.num_stages // self.total_steps
        return min(stage, self.num_stages - 1)

    def stage_sigma(self, stage: int) -> float:
        if stage == 0:
            return 0.0
        denom = self.num_stages - 2 if self.exponent == "qerl-code" else self.num_stages - 1
        ratio = self.sigma_end / self.sigma_start
        return self.sigma_start * ratio ** ((stage - 1) / denom)

    def sigma(self, step: int) -> float:
        return self.stage_sigma(self.stage(step))

    def first_step(self, stage: int) -> int:
        """The smallest step of ``stage``: ceil(stage * T / K) exactly; QeRL's float rule
        moves it by at most one step, so it is searched next to that."""
        exact = -(-stage * self.total_steps // self.num_stages)
        if self.boundaries == "exact" or stage == 0:
            return exact
        return next(s for s in range(max(0, exact - 2), exact + 3) if self._stage(s) >= stage)

    def table(self) -> list[StageRow]:
        """One row per stage; the last stage also covers every step past total_steps."""
        rows = []
        for k in range(self.num_stages):
            last = (self.first_step(k + 1) - 1 if k + 1 < self.num_stages
                    else self.total_steps - 1)
            rows.append(StageRow(k, self.first_step(k), last, self.stage_sigma(k)))
        return rows
