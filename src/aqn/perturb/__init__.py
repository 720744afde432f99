"""The perturbation registry: every way the rollout engine's copy may differ from the trainer's.

Each entry declares its kind, the config key that turns it on, whether it stays on when the
engine is validated, the prefix of the metrics it logs, the report section that shows them,
and how it is built on the engine's model. The engine applies the built list in registry
order (simulated hardware first, then the training devices); the trainer never names one.

Adding a perturbation (README, "Adding a perturbation"): a kernel module in ``noise/``,
``quant/`` or ``numerics/`` (pure PyTorch: ``refresh``, ``apply``, ``usage``, ``restore``),
its config field in ``config/schema.py``, one ``PerturbationSpec`` below, and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor, nn

from aqn.config import AQNConfig
from aqn.noise import NoiseInjector, NoiseReport
from aqn.noise.activation import NormOutputNoise
from aqn.numerics import NumericsEmulator
from aqn.quant import WeightQuantizer

Kind = Literal["noise", "quantization", "numerics", "activation", "matmul-output"]


class Perturbation(Protocol):
    """Applied to the engine's model after each weight sync; undone for clean use."""

    name: str  # the registry entry it belongs to

    def refresh(self) -> None: ...  # new clean weights were just loaded

    def apply(self, step: int) -> Mapping[str, float]: ...  # metrics of what it wrote

    def usage(self) -> Mapping[str, float]: ...  # what it touched since apply (may raise)

    def restore(self) -> None: ...  # the model computes as if never perturbed

    # The parameters it writes in place: the engine keeps its own copy of these and shares
    # every other one with the trainer, so this list must be complete (tests/test_perturb.py).
    def writes(self) -> list[Tensor]: ...


class AQNNoise:
    """AQN (``aqn.noise.NoiseInjector``) as an engine perturbation."""

    name = "aqn"

    def __init__(self, injector: NoiseInjector) -> None:
        self.injector = injector
        self.last_report: NoiseReport | None = None

    def refresh(self) -> None:
        self.injector.refresh_clean()

    def apply(self, step: int) -> Mapping[str, float]:
        self.last_report = self.injector.apply(step)
        return self.last_report.metrics()

    def usage(self) -> Mapping[str, float]:
        return {}  # the weights were written (and measured) by apply

    def restore(self) -> None:
        self.injector.restore()

    def writes(self) -> list[Tensor]:
        return self.injector.target_weights()


@dataclass(frozen=True)
class PerturbationSpec:
    name: str
    kind: Kind
    config_key: str  # where a user turns it on
    in_validation: bool  # simulated hardware stays on (it is where the model runs); noise not
    metric_prefix: str
    report_section: str
    enabled: Callable[[AQNConfig], bool]
    build: Callable[[nn.Module, AQNConfig], Perturbation]


def _rollout(cfg: AQNConfig):
    return cfg.actor_rollout_ref.rollout


REGISTRY: tuple[PerturbationSpec, ...] = (
    PerturbationSpec(
        name="quant", kind="quantization", config_key="actor_rollout_ref.rollout.quantization",
        in_validation=True, metric_prefix="quant/",
        report_section="Simulated weight quantization of the rollout",
        enabled=lambda cfg: _rollout(cfg).quantization is not None,
        build=lambda model, cfg: WeightQuantizer(model, _rollout(cfg).quantization)),
    PerturbationSpec(
        name="numerics", kind="numerics", config_key="actor_rollout_ref.rollout.numerics",
        in_validation=True, metric_prefix="numerics/",
        report_section="Simulated rollout hardware numerics",
        enabled=lambda cfg: _rollout(cfg).numerics != "reference",
        build=lambda model, cfg: NumericsEmulator(model, _rollout(cfg).numerics,
                                                  cfg.trainer.seed)),
    PerturbationSpec(
        name="aqn", kind="noise", config_key="trainer.noise_injection.enabled",
        in_validation=False, metric_prefix="aqn/",
        report_section="AQN noise actually applied",
        enabled=lambda cfg: cfg.trainer.noise_injection.enabled,
        # built from the frozen config before any rollout: fails now if nothing matches
        build=lambda model, cfg: AQNNoise(NoiseInjector(model, cfg.trainer.noise_injection))),
    PerturbationSpec(
        name="activation_noise", kind="activation",
        config_key="actor_rollout_ref.rollout.activation_noise",
        in_validation=False, metric_prefix="act_noise/",
        report_section="Activation noise on the norm outputs",
        enabled=lambda cfg: _rollout(cfg).activation_noise > 0,
        build=lambda model, cfg: NormOutputNoise(model, _rollout(cfg).activation_noise,
                                                 cfg.trainer.seed)),
)
SPECS: dict[str, PerturbationSpec] = {s.name: s for s in REGISTRY}


def spec_of(perturbation: Perturbation) -> PerturbationSpec:
    """The registry entry of a built perturbation (an unregistered one is an error)."""
    try:
        return SPECS[perturbation.name]
    except (KeyError, AttributeError):
        raise ValueError(f"{type(perturbation).__name__} is not a registered perturbation "
                         f"(name {getattr(perturbation, 'name', None)!r}; registered: "
                         f"{', '.join(SPECS)})") from None


def build_perturbations(model: nn.Module, cfg: AQNConfig) -> list[Perturbation]:
    """The perturbations ``cfg`` turns on, built on ``model`` (the engine's copy), in order."""
    return [spec.build(model, cfg) for spec in REGISTRY if spec.enabled(cfg)]
