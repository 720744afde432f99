"""Fake quantization of a model's Linear weights: once in place, or as an engine perturbation.

Only weights are quantized (activations keep the model dtype), as QeRL's NVFP4 rollouts.
Targets are ``nn.Linear`` modules and subclasses, selected by path patterns (exact path,
'.'-suffix or glob, as AQN's). By default the output head and embeddings are left alone,
and so are LoRA adapters (peft's ``lora_A``/``lora_B`` are Linears too): in a QeRL-style
setup the quantized base is frozen and the adapters train in full precision.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from aqn.errors import NoTargetsError
from aqn.firing import Firing, NotFiredError
from aqn.modules import path_matches
from aqn.quant.formats import check_format, fake_quantize
from aqn.quant.report import LayerError, QuantReport

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*embed*", "*lora_*")


def select_linears(model: nn.Module, include: Sequence[str] = (),
                   exclude: Sequence[str] = DEFAULT_EXCLUDE, what: str = "weight quantization"
                   ) -> list[tuple[str, nn.Linear]]:
    """The (path, module) pairs to quantize, in model order; raises when there are none
    (``what``: the perturbation the error message names).

    A weight shared by several modules is taken once, at its first path. With tied
    embeddings, including ``lm_head`` quantizes the input embedding too (same tensor).
    """
    selected, seen = [], set()
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include and not any(path_matches(path, p) for p in include):
            continue
        if any(path_matches(path, p) for p in exclude):
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        selected.append((path, module))
    if not selected:
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        have = (f"{len(linears)} Linear modules, e.g. {', '.join(linears[:4])}" if linears
                else "no nn.Linear modules at all")
        raise NoTargetsError(
            f"{what} matched 0 modules in {type(model).__name__}, so it would "
            f"do nothing. include={list(include)}, exclude={list(exclude)}. The model has "
            f"{have}. Fix the include/exclude patterns."
        )
    return selected


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, include: Sequence[str] = (),
                   exclude: Sequence[str] = DEFAULT_EXCLUDE) -> QuantReport:
    """Replace the targeted Linear weights by their fake-quantized values, for good.

    For a policy that *is* the quantized base (QeRL: NVFP4 base + LoRA): the weights keep
    their dtype and hold exactly the values the quantized format can represent.
    """
    check_format(fmt)
    layers = []
    for path, module in select_linears(model, include, exclude):
        q = fake_quantize(module.weight, fmt)
        layers.append(LayerError.measure(path, module.weight, q))
        module.weight.copy_(q)
    return QuantReport(fmt, tuple(layers))


def check_error_scale(error_scale: float) -> float:
    """``error_scale`` as a float; a ValueError unless finite and >= 0."""
    if not (math.isfinite(error_scale) and error_scale >= 0):
        raise ValueError(f"the quantization error scale must be finite and >= 0, got "
                         f"{error_scale}")
    return float(error_scale)


def record_write(path: str, clean: Tensor, written: Tensor, layers: list[LayerError],
                 firing: Firing) -> Tensor:
    """``written``, its error (as written, after any cast) appended to ``layers`` and the
    write counted in ``firing``: how every weight writer here measures what it did."""
    layers.append(LayerError.measure(path, clean, written))
    firing.modules.add(path)
    firing.elements += written.numel()
    firing.changed += int((written != clean).sum())
    return written


def _quantize_measured(path: str, weight: Tensor, fmt: str, layers: list[LayerError],
                       firing: Firing, error_scale: float = 1.0) -> Tensor:
    """``w + a (Q(w) - w)`` (``a = error_scale``; Q(w) at a = 1), recorded (``record_write``):
    the one step both quantizers take per weight, so their metrics agree to the bit."""
    q = fake_quantize(weight, fmt)
    if error_scale != 1:  # at a = 1 exactly Q(w): no round trip through float32
        w = weight.detach().float()
        q = (w + error_scale * (q.float() - w)).to(weight.dtype)
    return record_write(path, weight, q, layers, firing)


class LinearWeightWriter:
    """The life of a perturbation that writes the weights of some Linear modules (weight
    quantization, weight noise): one clean copy of the targets (in their own dtype, nothing
    else) that every ``apply`` writes from (``_write``), so nothing compounds; ``refresh``
    takes the engine's newly synced weights as the clean copy; ``restore`` writes it back
    bit for bit. Subclasses implement ``apply`` and count their writes in ``self.last``.
    """

    def __init__(self, model: nn.Module, include: Sequence[str], exclude: Sequence[str],
                 what: str) -> None:
        self._targets = select_linears(model, include, exclude, what)
        self._clean = [m.weight.detach().clone() for _, m in self._targets]
        # (weight, version counter) right after our last write: tells a weight the sync did
        # not re-send (it still holds our perturbed values) from one it did.
        self._written: list[tuple[weakref.ref, int] | None] = [None] * len(self._targets)
        self.last = Firing.empty()
        self.last_refreshed = 0

    @property
    def targets(self) -> list[str]:
        return [path for path, _ in self._targets]

    @property
    def num_params(self) -> int:
        return sum(c.numel() for c in self._clean)

    def _untouched_since_write(self, i: int) -> bool:
        if self._written[i] is None:
            return False
        ref, version = self._written[i]
        weight = self._targets[i][1].weight
        return ref() is weight and weight._version == version

    @torch.no_grad()
    def refresh(self) -> None:
        """Take the weights now in the model as the clean copy (the engine just synced).

        A weight still holding what the last ``apply`` wrote was not re-sent (e.g. only
        LoRA adapters are synced): it keeps its clean value, so perturbed values are never
        taken for clean ones.
        """
        self.last_refreshed = 0
        for i, (_, module) in enumerate(self._targets):
            if self._untouched_since_write(i):
                continue
            self._clean[i].copy_(module.weight)
            self._written[i] = None
            self.last_refreshed += 1

    def _write(self, i: int, value: Tensor) -> None:
        """Write ``value`` into target ``i`` (under ``torch.no_grad``), remembering the write."""
        weight = self._targets[i][1].weight
        weight.copy_(value)
        self._written[i] = (weakref.ref(weight), weight._version)

    def firing(self) -> Firing:
        return self.last  # the weights it wrote, and how many of their elements moved

    def writes(self) -> list[Tensor]:
        """The Linear weights it writes in place."""
        return [m.weight for _, m in self._targets]

    def touches(self) -> list[str]:
        return self.targets

    @torch.no_grad()
    def restore(self) -> None:
        """Write the clean weights back, bit for bit."""
        for i, ((_, module), clean) in enumerate(zip(self._targets, self._clean, strict=True)):
            module.weight.copy_(clean)
            self._written[i] = None


class WeightQuantizer(LinearWeightWriter):
    """Fake weight quantization as a rollout-engine perturbation (see aqn.perturb).

    Every ``apply`` writes ``w + a (Q(w) - w)`` from the clean copy, ``a = error_scale``:
    ``Q(w)`` itself at 1 (the quantized rollout), the clean weights at 0, an amplified
    quantization error above 1 (a dose of the same error). Quantization is deterministic:
    ``step`` only names the apply.
    """

    name = "quant"

    def __init__(self, model: nn.Module, fmt: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, error_scale: float = 1.0) -> None:
        self.fmt = check_format(fmt)
        self.error_scale = check_error_scale(error_scale)
        super().__init__(model, include, exclude, "weight quantization")
        self.last_report: QuantReport | None = None

    @torch.no_grad()
    def apply(self, step: int) -> dict[str, float]:
        """Write the (scaled) fake-quantized clean weights; returns the report's metrics."""
        layers: list[LayerError] = []
        # at a = 0 it writes the clean weights: nothing to change, nothing to prove
        self.last = Firing.empty(expected=self.error_scale > 0)
        for i, (path, clean) in enumerate(zip(self.targets, self._clean, strict=True)):
            self._write(i, _quantize_measured(path, clean, self.fmt, layers, self.last,
                                              self.error_scale))
        self.last_report = QuantReport(self.fmt, tuple(layers), self.error_scale)
        return self.last_report.metrics()


class LoadTimeWeightQuantizer:
    """Fake weight quantization of the weights an engine loads, for an engine whose Linear
    weights cannot be written once loaded (vLLM packs them into oneDNN / CUDA kernels).

    The engine calls it on each Linear weight of the trainer's model while it streams them
    in at a sync (``quantize(path, weight)``, the module paths of ``source``), so the engine
    holds ``Q(w)`` for the targets, with ``WeightQuantizer``'s targets and values. A LoRA
    layer's base weight is quantized before its (full-precision) delta is added, as on the
    hf engine, scaled by ``error_scale`` as there. Quantization stays in validation
    (``in_validation``), so every use of the engine wants it on: ``apply`` reports the last
    sync's quantization and ``restore`` leaves it (the engine holds no clean copy to put back).
    """

    name = "quant"

    def __init__(self, source: nn.Module, fmt: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = DEFAULT_EXCLUDE, error_scale: float = 1.0) -> None:
        self.fmt = check_format(fmt)
        self.error_scale = check_error_scale(error_scale)
        self.targets = [path for path, _ in select_linears(source, include, exclude)]
        self._targets = set(self.targets)
        self._loading: list[LayerError] = []
        self._firing = self._new_firing()
        self.last_report: QuantReport | None = None  # of the weights the engine holds
        self.last = self._new_firing()

    def _new_firing(self) -> Firing:
        return Firing.empty(expected=self.error_scale > 0)  # as WeightQuantizer's

    @torch.no_grad()
    def quantize(self, path: str, weight: Tensor) -> Tensor:
        """The weight to load for the module at ``path``: w + a (Q(w) - w) for a target."""
        if path not in self._targets:
            return weight
        return _quantize_measured(path, weight, self.fmt, self._loading, self._firing,
                                  self.error_scale)

    def refresh(self) -> None:
        """The sync is done: what it quantized is what the engine now holds."""
        missed = self._targets - self._firing.modules
        if missed:  # a target the sync did not stream would hold clean weights
            raise NotFiredError(f"weight quantization: the engine's sync did not load "
                                f"{len(missed)} targeted weights, e.g. {sorted(missed)[:3]}")
        self.last_report = QuantReport(self.fmt, tuple(self._loading), self.error_scale)
        self.last, self._firing, self._loading = self._firing, self._new_firing(), []

    def apply(self, step: int) -> dict[str, float]:
        if self.last_report is None:
            raise RuntimeError("weight quantization applied before the engine's first sync")
        return self.last_report.metrics()

    def firing(self) -> Firing:
        return self.last  # the weights the last sync quantized, and how many moved

    def writes(self) -> list[Tensor]:
        return []  # it writes nothing in the engine's model: the sync loads its values

    def touches(self) -> list[str]:
        return self.targets  # the trainer's module paths of the weights it quantizes

    def restore(self) -> None:
        pass  # in the loaded weights until the next sync (see the class docstring)
