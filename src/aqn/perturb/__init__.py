"""The perturbation registry: every way the rollout engine's copy may differ from the trainer's.

Each entry declares its kind, the config key that turns it on, whether it stays on when the
engine is validated, the prefix of the metrics it logs, the report section that shows them,
and how it is built on the engine's model. The engine applies the built list in registry
order (simulated hardware first, then the training devices); the trainer never names one.

Adding a perturbation (docs/development.md, "Adding a perturbation"): a kernel module in ``noise/``,
``quant/`` or ``numerics/`` (pure PyTorch: the ``Perturbation`` protocol below), its config
field in ``config/schema.py``, one ``PerturbationSpec`` below, and tests. The spec declares
everything the engines, the builder and the report need; nothing else names a perturbation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import Tensor, nn

from aqn.config import AQNConfig
from aqn.errors import ConfigError
from aqn.firing import Firing, NotFiredError
from aqn.hashing import derive_seed
from aqn.noise import NoiseInjector, NoiseReport
from aqn.noise.activation import NormOutputNoise
from aqn.numerics import NumericsEmulator
from aqn.numerics.op_noise import OpNoise, OpNoiseConfig
from aqn.quant import LoadTimeWeightQuantizer, WeightQuantizer
from aqn.quant.activation import ActivationQuantizer
from aqn.quant.kv_cache import KVCacheQuantizer
from aqn.quant.weight_noise import WeightNoise

Kind = Literal["noise", "quantization", "numerics", "activation", "matmul-output",
               "weight-noise", "kv-cache"]


class Perturbation(Protocol):
    """Applied to the engine's model after each weight sync; undone for clean use. Which
    registry entry it serves is its spec's business (one kernel class may serve several)."""

    def refresh(self) -> None: ...  # new clean weights were just loaded

    def apply(self, step: int) -> Mapping[str, float]: ...  # metrics of what it wrote

    def firing(self) -> Firing: ...  # what it touched since apply (aqn.firing)

    def restore(self) -> None: ...  # the model computes as if never perturbed

    # The parameters it writes in place: the engine keeps its own copy of these and shares
    # every other one with the trainer, so this list must be complete (tests/test_perturb.py).
    def writes(self) -> list[Tensor]: ...

    def touches(self) -> list[str]: ...  # the module paths it acts on (the plan prints them)


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

    def firing(self) -> Firing:
        """The norms it wrote in the last apply and how many elements survived the cast."""
        report = self.last_report
        if report is None:
            return Firing.empty()
        noisy = {layer.layer for layer in report.layers if layer.sigma > 0}
        return Firing({path for path, m in self.injector.targets_by_layer() if m in noisy},
                      elements=sum(la.num_params for la in report.layers if la.layer in noisy),
                      changed=report.num_changed, expected=bool(noisy))

    def restore(self) -> None:
        self.injector.restore()

    def writes(self) -> list[Tensor]:
        return self.injector.target_weights()

    def touches(self) -> list[str]:
        return [t.path for t in self.injector.targets]


Side = Literal["rollout", "actor"]
# How the vLLM engine carries a rollout perturbation: "worker", in vLLM's worker process on
# vLLM's own modules, by aqn's worker extension (aqn.rollout.vllm_worker; AQN, in place on its
# RMSNorm weights); "load", in the weights each sync sends (``build_load`` on the trainer's
# model: vLLM packs its Linear weights at load); None: not at all (hooks and in-place Linear
# writes do not reach its packed kernels).
VLLMSupport = Literal["worker", "load"] | None


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
    # rollout: on the engine's copy (applied after each sync); actor: on the trainer's copy,
    # in every forward and backward it runs (its metrics logged under actor/).
    side: Side = "rollout"
    vllm: VLLMSupport = None
    build_load: Callable[[nn.Module, AQNConfig], Perturbation] | None = None  # vllm "load"
    # It writes the engine's Linear weights, so a weight-sharing engine keeps its own copy of
    # them (every other Linear weight stays the trainer's tensor).
    writes_linear_weights: bool = False
    # Its metric_prefix metrics have a report section of their own (AQN's schedule and
    # measured noise); the registry's per-perturbation section then shows only its firing.
    own_report_section: bool = False

    def unsupported_on(self, engine: str) -> bool:
        return engine == "vllm" and self.side == "rollout" and self.vllm is None


def _rollout(cfg: AQNConfig):
    return cfg.actor_rollout_ref.rollout


def _actor(cfg: AQNConfig):
    return cfg.actor_rollout_ref.actor


def _op_noise(model: nn.Module, config: OpNoiseConfig, cfg: AQNConfig, side: str) -> OpNoise:
    # rollout and trainer draw apart: the same (step, module, call) must not repeat one eps
    return OpNoise(model, config, derive_seed(cfg.trainer.seed, "op_noise", side))


REGISTRY: tuple[PerturbationSpec, ...] = (
    PerturbationSpec(
        name="quant", kind="quantization", config_key="actor_rollout_ref.rollout.quantization",
        in_validation=True, metric_prefix="quant/",
        report_section="Simulated weight quantization of the rollout",
        enabled=lambda cfg: _rollout(cfg).quantization is not None,
        build=lambda model, cfg: WeightQuantizer(
            model, _rollout(cfg).quantization,
            error_scale=_rollout(cfg).quant_error_scale),
        writes_linear_weights=True, vllm="load",
        build_load=lambda source, cfg: LoadTimeWeightQuantizer(
            source, _rollout(cfg).quantization,
            error_scale=_rollout(cfg).quant_error_scale)),
    PerturbationSpec(
        name="weight_noise", kind="weight-noise",
        config_key="actor_rollout_ref.rollout.weight_noise",
        in_validation=True, metric_prefix="weight_noise/",
        report_section="Weight noise of the rollout (a model of quantization error)",
        enabled=lambda cfg: _rollout(cfg).weight_noise.enabled,
        build=lambda model, cfg: WeightNoise(model, _rollout(cfg).weight_noise,
                                             cfg.trainer.seed),
        writes_linear_weights=True),
    PerturbationSpec(
        name="act_quant", kind="quantization",
        config_key="actor_rollout_ref.rollout.activation_quantization",
        in_validation=True, metric_prefix="act_quant/",
        report_section="Simulated activation quantization of the rollout (the A of W4A4)",
        enabled=lambda cfg: _rollout(cfg).activation_quantization is not None,
        build=lambda model, cfg: ActivationQuantizer(model,
                                                     _rollout(cfg).activation_quantization)),
    PerturbationSpec(
        name="kv_cache", kind="kv-cache", config_key="actor_rollout_ref.rollout.kv_cache_dtype",
        in_validation=True, metric_prefix="kv_cache/",
        report_section="KV cache quantization of the rollout (vLLM's kv_cache_dtype=fp8)",
        enabled=lambda cfg: _rollout(cfg).kv_cache_dtype != "auto",
        build=lambda model, cfg: KVCacheQuantizer(model, _rollout(cfg).kv_cache_dtype)),
    PerturbationSpec(
        name="numerics", kind="numerics", config_key="actor_rollout_ref.rollout.numerics",
        in_validation=True, metric_prefix="numerics/",
        report_section="Simulated rollout hardware numerics",
        enabled=lambda cfg: _rollout(cfg).numerics != "reference",
        build=lambda model, cfg: NumericsEmulator(model, _rollout(cfg).numerics,
                                                  cfg.trainer.seed)),
    PerturbationSpec(
        name="op_noise", kind="matmul-output", config_key="actor_rollout_ref.rollout.op_noise",
        in_validation=True, metric_prefix="op_noise/",
        report_section="Matmul-output noise of the rollout (simulated hardware error)",
        enabled=lambda cfg: _rollout(cfg).op_noise.enabled,
        build=lambda model, cfg: _op_noise(model, _rollout(cfg).op_noise, cfg, "rollout")),
    PerturbationSpec(
        name="aqn", kind="noise", config_key="trainer.noise_injection.enabled",
        in_validation=False, metric_prefix="aqn/",
        report_section="AQN: what the injector touched each step (proof of firing)",
        enabled=lambda cfg: cfg.trainer.noise_injection.enabled,
        # built from the frozen config before any rollout: fails now if nothing matches
        build=lambda model, cfg: AQNNoise(NoiseInjector(model, cfg.trainer.noise_injection)),
        vllm="worker", own_report_section=True),
    PerturbationSpec(
        name="activation_noise", kind="activation",
        config_key="actor_rollout_ref.rollout.activation_noise",
        in_validation=False, metric_prefix="act_noise/",
        report_section="Activation noise on the norm outputs",
        enabled=lambda cfg: _rollout(cfg).activation_noise > 0,
        build=lambda model, cfg: NormOutputNoise(model, _rollout(cfg).activation_noise,
                                                 cfg.trainer.seed)),
    # The trainer's copy ("pre-trained elsewhere", W4A4 training with a straight-through
    # estimator, hardware error in the training forward and backward).
    PerturbationSpec(
        name="actor_act_quant", kind="quantization",
        config_key="actor_rollout_ref.actor.activation_quantization",
        in_validation=False, metric_prefix="actor/act_quant/",
        report_section="Activation quantization of the trainer (straight-through)",
        enabled=lambda cfg: _actor(cfg).activation_quantization is not None,
        build=lambda model, cfg: ActivationQuantizer(model, _actor(cfg).activation_quantization),
        side="actor"),
    PerturbationSpec(
        name="actor_numerics", kind="numerics", config_key="actor_rollout_ref.actor.numerics",
        in_validation=False, metric_prefix="actor/numerics/",
        report_section="Simulated trainer hardware numerics",
        enabled=lambda cfg: _actor(cfg).numerics != "reference",
        build=lambda model, cfg: NumericsEmulator(model, _actor(cfg).numerics, cfg.trainer.seed),
        side="actor"),
    PerturbationSpec(
        name="actor_op_noise", kind="matmul-output", config_key="actor_rollout_ref.actor.op_noise",
        in_validation=False, metric_prefix="actor/op_noise/",
        report_section="Matmul-output noise of the trainer (forward, and backward if set)",
        enabled=lambda cfg: _actor(cfg).op_noise.enabled,
        build=lambda model, cfg: _op_noise(model, _actor(cfg).op_noise, cfg, "actor"),
        side="actor"),
)
SPECS: dict[str, PerturbationSpec] = {s.name: s for s in REGISTRY}

Built = tuple[PerturbationSpec, Perturbation]  # a kernel and the registry entry it serves


def enabled_specs(cfg: AQNConfig, side: Side = "rollout") -> list[PerturbationSpec]:
    """The entries of ``side`` that ``cfg`` turns on, in registry order."""
    return [spec for spec in REGISTRY if spec.side == side and spec.enabled(cfg)]


def check_engine_support(cfg: AQNConfig) -> None:
    """Refuse a perturbation the configured rollout engine cannot carry (before anything is
    built: a run must not start that would roll out without it)."""
    engine = cfg.actor_rollout_ref.rollout.name
    for spec in enabled_specs(cfg):
        if spec.unsupported_on(engine):
            raise ConfigError(
                f"is not supported with name={engine}: it acts through Python hooks or "
                f"in-place Linear weights, which {engine}'s packed kernels never run; run it on "
                "the hf engine (actor_rollout_ref.rollout.name=hf). On vllm: "
                + ", ".join(s.config_key for s in REGISTRY if s.vllm is not None),
                spec.config_key)


def build_perturbations(model: nn.Module, cfg: AQNConfig, side: Side = "rollout"
                        ) -> list[Built]:
    """The perturbations of ``side`` that ``cfg`` turns on, built on ``model``, in order."""
    return [(spec, spec.build(model, cfg)) for spec in enabled_specs(cfg, side)]


def build_load_perturbations(source: nn.Module, cfg: AQNConfig) -> list[Built]:
    """The rollout perturbations a vLLM engine applies to the weights each sync streams in
    from ``source`` (the trainer's model)."""
    return [(spec, spec.build_load(source, cfg)) for spec in enabled_specs(cfg)
            if spec.vllm == "load"]


def writes_linear_weights(cfg: AQNConfig) -> bool:
    """Whether a rollout perturbation ``cfg`` turns on writes the engine's Linear weights."""
    return any(spec.writes_linear_weights for spec in enabled_specs(cfg))


def registered(*kernels: Perturbation) -> list[Built]:
    """Kernels built by hand, each for the rollout entry of its class's own ``name``."""
    built = []
    for kernel in kernels:
        spec = SPECS.get(getattr(kernel, "name", None))
        if spec is None:
            raise ValueError(f"{type(kernel).__name__} is not a registered perturbation "
                             f"(name {getattr(kernel, 'name', None)!r}; registered: "
                             f"{', '.join(SPECS)})")
        built.append((spec, kernel))
    return built


class Perturbations:
    """Perturbations in registry order, and which of them are on now.

    Every engine keeps its perturbations here (and the trainer its own, ``side: actor``), so
    applying, skipping in validation, proving they fired and restoring mean the same thing
    for all of them.
    """

    def __init__(self, built: Sequence[Built] = ()) -> None:
        self.specs = [spec for spec, _ in built]
        self.all = [kernel for _, kernel in built]
        self.active: list[Built] = []
        self.step: int | None = None

    def refresh(self) -> None:
        """New clean weights were loaded; nothing is applied until the next ``apply``."""
        for p in self.all:
            p.refresh()
        self.active, self.step = [], None

    def apply(self, step: int, validation: bool = False) -> dict[str, float]:
        """Apply them in order; ``validation`` leaves out those not declared ``in_validation``."""
        metrics: dict[str, float] = {}
        self.active = []
        for spec, p in zip(self.specs, self.all, strict=True):
            if validation and not spec.in_validation:
                continue
            metrics.update({f"actor/{k}" if spec.side == "actor" else k: v
                            for k, v in p.apply(step).items()})
            self.active.append((spec, p))
        self.step = step if self.active else None
        return metrics

    @property
    def perturbed(self) -> bool:
        """False when the model holds exactly the synced weights, unperturbed."""
        return bool(self.active)

    def check_firing(self, where: str) -> dict[str, float]:
        """What each active perturbation touched since ``apply``, as ``perturb/<name>/*``
        metrics; raises ``NotFiredError`` naming one that should have acted and did not."""
        metrics: dict[str, float] = {}
        for spec, p in self.active:
            firing = p.firing()
            firing.check(spec.name, self.step, where)
            metrics.update(firing.metrics(spec.name))
        return metrics

    def restore(self) -> None:
        for p in reversed(self.all):
            p.restore()
        self.active, self.step = [], None

    def writes(self) -> set[int]:
        """The ids of the parameters any of them writes in place."""
        return {id(t) for p in self.all for t in p.writes()}


# --------------------------------------------------------------------------- the plan


def check_aqn_plan(cfg: AQNConfig, perturbations: Perturbations, step: int) -> None:
    """The engine's AQN applied, layer by layer, the sigma the trainer's resolved config plans.

    The plan comes from ``cfg`` (what the trainer resolved and recorded), the applied sigma
    from the engine's injector: a schedule or multipliers that did not reach the engine (the
    verl fork's per-layer multipliers never forwarded to the rollout workers) stop the run.
    """
    noise = cfg.trainer.noise_injection
    for spec, p in perturbations.active:
        if spec is not SPECS["aqn"] or p.last_report is None:
            continue
        sigma = noise.sigma_schedule().sigma(step)
        for layer in p.last_report.layers:
            planned = sigma * noise.layer_multiplier(layer.layer)
            if layer.sigma != planned:
                where = "the final norm" if layer.layer is None else f"layer {layer.layer}"
                raise NotFiredError(
                    f"AQN on the rollout engine applied sigma {layer.sigma:g} to {where} at "
                    f"step {step}, but the plan of trainer.noise_injection says {planned:g} "
                    f"(schedule {sigma:g} x multiplier {noise.layer_multiplier(layer.layer):g}): "
                    "the engine does not run the config the trainer resolved (a schedule or "
                    "layer_multipliers that never reached it)")


def describe_plan(cfg: AQNConfig, sides: Mapping[str, Perturbations]) -> str:
    """The resolved per-step plan, printed before step 0: what each perturbation touches and,
    for AQN, the sigma of every stage and layer."""
    lines = ["perturbation plan:"]
    for side, perturbations in sides.items():
        for spec, p in zip(perturbations.specs, perturbations.all, strict=True):
            paths = p.touches()
            lines.append(f"  {side} {spec.name} ({spec.config_key}; in validation: "
                         f"{'yes' if spec.in_validation else 'no'}): {len(paths)} modules, "
                         f"e.g. {', '.join(paths[:3])}")
            if spec is SPECS["aqn"]:
                lines += _aqn_plan(cfg, p)
    if len(lines) == 1:
        lines.append("  none: the engine rolls out the trainer's weights, unperturbed")
    return "\n".join(lines)


def _aqn_plan(cfg: AQNConfig, p: AQNNoise) -> list[str]:
    noise = cfg.trainer.noise_injection
    schedule = noise.sigma_schedule()
    span = (f"{schedule.num_epochs} epochs of {schedule.steps_per_epoch} steps, each with "
            "its own warm-up" if noise.schedule == "epoch" else f"{schedule.total_steps} steps")
    lines = [f"    sigma per stage ({noise.distribution}, {noise.mode}, {span}):"]
    lines += [f"      stage {r.stage}: steps {r.first_step}-{r.last_step} sigma {r.sigma:.4g}"
              for r in schedule.table()]
    if noise.layer_multipliers is not None:
        layers = sorted({layer for _, layer in p.injector.targets_by_layer()},
                        key=lambda i: (i is None, i or 0))
        lines.append("    sigma x multiplier per layer: " + ", ".join(
            f"{'final' if i is None else i}: x{noise.layer_multiplier(i):g}" for i in layers))
    return lines
