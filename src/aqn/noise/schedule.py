"""QeRL's staged sigma schedule for Adaptive Quantization Noise.

Over ``total_steps`` optimizer steps and ``K = num_stages`` stages of equal length
``total_steps / K``: stage 0 is a warm-up without noise; stage ``k >= 1`` uses a
geometric interpolation from ``sigma_start`` to ``sigma_end``.

``EpochSchedule`` is the epoch-aware schedule of the seed's verl fork: sigma falls from
``sigma_start`` to ``sigma_end`` over the epochs, and each epoch runs a staged schedule of
its own (warm-up, then geometric decay) over its part of that range.

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

    def stage(self, step: int) -> int:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
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
        return next(s for s in range(max(0, exact - 2), exact + 3) if self.stage(s) >= stage)

    def table(self) -> list[StageRow]:
        """One row per stage; the last stage also covers every step past total_steps."""
        rows = []
        for k in range(self.num_stages):
            last = (self.first_step(k + 1) - 1 if k + 1 < self.num_stages
                    else self.total_steps - 1)
            rows.append(StageRow(k, self.first_step(k), last, self.stage_sigma(k)))
        return rows


class EpochSchedule:
    """The epoch-aware schedule (the verl fork's ``epoch_aware``): epoch e of ``num_epochs``
    runs a ``SigmaSchedule`` of ``num_stages`` stages (stage 0 a warm-up) over its
    ``steps_per_epoch`` steps, from s_e to s_{e+1}, where s_i = sigma_start x (sigma_end /
    sigma_start)^(i / num_epochs). Steps past the last epoch stay in its range, the step
    within the epoch restarting. This follows the fork's design as read from its source
    (``get_sigma_by_step_epoch_aware``; its stages_per_epoch is num_stages - 1); it is not
    tested against its code, which is not on PyPI. Stage ids are global: e x num_stages + k."""

    def __init__(self, sigma_start: float, sigma_end: float, num_stages: int,
                 steps_per_epoch: int, num_epochs: int, exponent: Exponent = "qerl-code",
                 boundaries: Boundaries = "qerl-code") -> None:
        if not isinstance(num_epochs, int) or num_epochs < 1:
            raise ValueError(f"num_epochs must be an integer >= 1, got {num_epochs!r}")
        ends = [sigma_start * (sigma_end / sigma_start) ** (i / num_epochs)
                for i in range(num_epochs + 1)]
        with warnings.catch_warnings():  # the checks below say it once, for the whole run
            warnings.simplefilter("ignore")
            self.epochs = [SigmaSchedule(ends[e], ends[e + 1], num_stages, steps_per_epoch,
                                         exponent, boundaries) for e in range(num_epochs)]
        if steps_per_epoch < num_stages:
            warnings.warn(f"steps_per_epoch ({steps_per_epoch}) < num_stages ({num_stages}): "
                          "some stages of every epoch have no step at all", stacklevel=2)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.num_stages, self.num_epochs = num_stages, num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * num_epochs
        self.exponent, self.boundaries = exponent, boundaries

    def stage(self, step: int) -> int:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        epoch = min(step // self.steps_per_epoch, self.num_epochs - 1)
        return epoch * self.num_stages + self.epochs[epoch].stage(step % self.steps_per_epoch)

    def stage_sigma(self, stage: int) -> float:
        epoch, k = divmod(stage, self.num_stages)
        return self.epochs[epoch].stage_sigma(k)

    def sigma(self, step: int) -> float:
        return self.stage_sigma(self.stage(step))

    def first_step(self, stage: int) -> int:
        epoch, k = divmod(stage, self.num_stages)
        return epoch * self.steps_per_epoch + self.epochs[epoch].first_step(k)

    def table(self) -> list[StageRow]:
        """One row per stage of every epoch, in global steps."""
        return [StageRow(e * self.num_stages + r.stage, e * self.steps_per_epoch + r.first_step,
                         e * self.steps_per_epoch + r.last_step, r.sigma)
                for e, epoch in enumerate(self.epochs) for r in epoch.table()]
