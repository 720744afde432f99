"""Numerics profiles: how a simulated piece of hardware computes a transformer's forward pass.

A profile is a combination of four knobs, each the numerical behaviour of one kind of
kernel (docs/reference.md#sources-of-hardware-differences lists them as the sources of
GPU-vs-NPU differences):

- ``matmul``: ``fp32`` leaves ``nn.Linear`` alone (fp32 accumulation, as PyTorch on CPU and
  tensor cores do); ``bf16_splitk`` cuts the reduction dimension into chunks of
  ``split_k_chunk`` and rounds the running sum to bf16 after each chunk.
- ``rounding``: how activations are rounded to bf16 — the outputs of every ``nn.Linear``,
  the embedding and every decoder layer (the residual stream entering the next layer).
  ``none`` leaves them in the model's dtype; ``rne`` rounds to nearest even; ``truncate``
  rounds toward zero; ``stochastic`` rounds randomly, unbiased, from a seeded generator.
  The casts the other knobs make use the same mode (``rne`` when ``rounding`` is ``none``).
- ``norm_cast``: ``before_weight`` casts the normalised activation to bf16 before the gain
  multiply and rounds the product again (Hugging Face Llama/Qwen2 ``RMSNorm``);
  ``after_weight`` multiplies in fp32 and casts once (a fused-kernel style).
- ``act_dtype`` (SiLU of the MLP) and ``softmax_dtype`` (attention): ``bf16`` rounds every
  elementary operation (exp, add, divide, sum) to bf16; ``fp32`` computes in fp32 and
  casts the result once. ``model`` leaves either alone.

An fp32 model is treated as a bf16 deployment wherever a knob says bf16; weights are never
changed (rounding weights is the job of the quantization perturbation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from aqn.errors import ConfigError
from aqn.hashing import config_hash
from aqn.numerics.rounding import ROUNDING_MODES

MATMUL_MODES = ("fp32", "bf16_splitk")
ACTIVATION_ROUNDING = ("none", *ROUNDING_MODES)
NORM_CASTS = ("model", "before_weight", "after_weight")
OP_DTYPES = ("model", "fp32", "bf16")


def _check(value: object, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{value!r} is not one of {', '.join(allowed)}", key)


@dataclass(frozen=True)
class NumericsProfile:
    """One simulated hardware's numerics; the default changes nothing."""

    name: str = "custom"
    matmul: str = "fp32"  # "fp32" (plain nn.Linear) | "bf16_splitk"
    split_k_chunk: int = 128  # K per chunk of the bf16 split-K accumulation
    rounding: str = "none"  # activations: "none" | "rne" | "truncate" | "stochastic"
    norm_cast: str = "model"  # RMSNorm: "model" | "before_weight" | "after_weight"
    act_dtype: str = "model"  # MLP activation (SiLU): "model" | "fp32" | "bf16"
    softmax_dtype: str = "model"  # attention softmax: "model" | "fp32" | "bf16"
    description: str = ""

    def __post_init__(self) -> None:
        _check(self.matmul, MATMUL_MODES, "matmul")
        _check(self.rounding, ACTIVATION_ROUNDING, "rounding")
        _check(self.norm_cast, NORM_CASTS, "norm_cast")
        _check(self.act_dtype, OP_DTYPES, "act_dtype")
        _check(self.softmax_dtype, OP_DTYPES, "softmax_dtype")
        if not isinstance(self.split_k_chunk, int) or self.split_k_chunk < 1:
            raise ConfigError(f"must be a positive integer, got {self.split_k_chunk!r}",
                              "split_k_chunk")

    @property
    def cast_rounding(self) -> str:
        """Rounding mode of the bf16 casts made by the matmul, norm and op knobs."""
        return "rne" if self.rounding == "none" else self.rounding

    @property
    def is_reference(self) -> bool:
        """True when the profile changes nothing (applying it patches no module)."""
        return (self.matmul == "fp32" and self.rounding == "none" and self.norm_cast == "model"
                and self.act_dtype == "model" and self.softmax_dtype == "model")

    def knobs(self) -> dict[str, object]:
        """The fields that change numerics (everything but the name and description)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "description")}

    def knobs_hash(self) -> str:
        """Short stable hash of the knobs, for logs (the name does not enter it)."""
        return config_hash(self.knobs())

    def replace(self, **changes) -> NumericsProfile:
        """A copy with some knobs changed, named ``<name>+custom`` unless a name is given."""
        changes.setdefault("name", f"{self.name}+custom")
        return dataclasses.replace(self, **changes)


# These are simulations, not measurements of any specific chip: each knob reproduces one
# *kind* of difference that public reports name, at a plausible setting
# (docs/reference.md#sources-of-hardware-differences).
PROFILES: dict[str, NumericsProfile] = {
    "reference": NumericsProfile(
        name="reference",
        description="the model's own PyTorch CPU numerics; nothing is patched",
    ),
    "gpu-like": NumericsProfile(
        name="gpu-like",
        # tensor cores accumulate in fp32 over the whole K: no split-K rounding
        matmul="fp32",
        # a bf16 deployment: every activation written to memory is bf16, rounded to nearest
        rounding="rne",
        # vLLM/TensorRT-style fused RMSNorm: normalise and multiply by the gain in fp32,
        # cast once (training-side HF code casts before the multiply)
        norm_cast="after_weight",
        # fused SiLU*up kernels compute the activation in fp32 registers and store bf16
        act_dtype="fp32",
        # flash/SDPA kernels keep the softmax in fp32: leave the model's attention alone
        softmax_dtype="model",
        description="bf16 deployment on fp32-accumulating tensor cores with fused fp32 "
                    "norm and activation kernels",
    ),
    "npu-like": NumericsProfile(
        name="npu-like",
        # kernels that split K across cores / pipeline stages and write the partial sums
        # back in bf16: both the accumulation order and its precision differ from the GPU
        matmul="bf16_splitk",
        split_k_chunk=64,
        rounding="rne",
        # a non-fused RMSNorm made of separate ops: the normalised activation is stored in
        # bf16 before the gain multiply (the source of the 74 %-bitwise-equal report)
        norm_cast="before_weight",
        # vector units computing exp/sigmoid and the softmax sum in bf16, op by op
        act_dtype="bf16",
        softmax_dtype="bf16",
        description="bf16 deployment with bf16 split-K accumulation (chunks of 64), RMSNorm "
                    "cast before the gain multiply, SiLU and softmax computed in bf16",
    ),
}
# npu-like, but every bf16 cast truncates (rounds toward zero), as some conversion paths do:
# a biased error that accumulates through the layers instead of averaging out. A stress case,
# not a claim about what any specific port did.
PROFILES["npu-naive"] = dataclasses.replace(
    PROFILES["npu-like"], name="npu-naive", rounding="truncate",
    description="npu-like with every bf16 cast truncated toward zero")


def get_profile(profile: str | NumericsProfile | Mapping[str, object]) -> NumericsProfile:
    """A profile from its name in ``PROFILES``, a mapping of knobs, or a profile itself.

    A mapping may name a base profile under ``base`` and override some of its knobs.
    """
    if isinstance(profile, NumericsProfile):
        return profile
    if isinstance(profile, str):
        try:
            return PROFILES[profile]
        except KeyError:
            raise ConfigError(f"unknown numerics profile {profile!r}; known: "
                              f"{', '.join(PROFILES)}", "numerics.profile") from None
    if isinstance(profile, Mapping):
        fields = dict(profile)
        base = get_profile(str(fields.pop("base", "reference")))
        known = {f.name for f in dataclasses.fields(NumericsProfile)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown numerics knobs {unknown}; known: {sorted(known)}",
                              "numerics")
        fields.setdefault("name", "custom" if base.name == "reference" else f"{base.name}+custom")
        return dataclasses.replace(base, **fields)
    raise ConfigError(f"a numerics profile must be a name, a mapping or a NumericsProfile, "
                      f"got {type(profile).__name__}", "numerics.profile")
