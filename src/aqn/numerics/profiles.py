"""Numerics profiles: how a simulated piece of hardware computes a transformer's forward pass.

A profile is a combination of knobs, each the numerical behaviour of one kind of kernel
(docs/reference.md#sources-of-hardware-differences lists them as the sources of GPU-vs-NPU
differences), and the 16-bit format its casts round to:

- ``precision``: ``bf16`` or ``fp16``, the low precision of the simulated deployment. Every
  cast the knobs below make (activation rounding, split-K running sums, norm casts, the
  ``bf16`` op dtypes) rounds to this format: a knob value spelt ``bf16`` means "in the
  profile's precision". ``auto`` (the default, and all a run uses) follows the model the
  profile is installed on: fp16 on an fp16 model (``actor_rollout_ref.rollout.dtype=float16``
  casts the engine's copy so), bf16 otherwise; an explicit ``bf16`` on an fp16 model, or
  ``fp16`` on a bf16 one, is refused. FP16 has 3 more mantissa bits than bf16 (spacing 8x
  finer) and a range of +-65504 (overflow to inf, as a real fp16 kernel's).
- ``matmul``: ``fp32`` leaves ``nn.Linear`` alone (fp32 accumulation, as PyTorch on CPU and
  tensor cores do); ``bf16_splitk`` cuts the reduction dimension into chunks of
  ``split_k_chunk`` and rounds the running sum to the precision after each chunk.
- ``rounding``: how activations are rounded to the precision — the outputs of every
  ``nn.Linear``, the embedding and every decoder layer (the residual stream entering the
  next layer). ``none`` leaves them in the model's dtype; ``rne`` rounds to nearest even;
  ``truncate`` rounds toward zero; ``stochastic`` rounds randomly, unbiased, from a seeded
  generator. The casts the other knobs make use the same mode (``rne`` when ``rounding`` is
  ``none``).
- ``norm_cast``: ``before_weight`` casts the normalised activation to the precision before
  the gain multiply and rounds the product again (Hugging Face Llama/Qwen2 ``RMSNorm``);
  ``after_weight`` multiplies in fp32 and casts once (a fused-kernel style).
- ``act_dtype`` (SiLU of the MLP) and ``softmax_dtype`` (attention): ``bf16`` rounds every
  elementary operation (exp, add, divide, sum) to the precision; ``fp32`` computes in fp32
  and casts the result once. ``model`` leaves either alone.

An fp32 model is treated as a 16-bit deployment wherever a knob says so; weights are never
changed (rounding weights is the job of the quantization perturbation, or of the rollout
dtype, which casts the engine's copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from aqn.errors import ConfigError
from aqn.hashing import config_hash
from aqn.numerics.rounding import PRECISIONS, ROUNDING_MODES

MATMUL_MODES = ("fp32", "bf16_splitk")
ACTIVATION_ROUNDING = ("none", *ROUNDING_MODES)
NORM_CASTS = ("model", "before_weight", "after_weight")
OP_DTYPES = ("model", "fp32", "bf16")
PROFILE_PRECISIONS = ("auto", *PRECISIONS)


def precision_of(dtype: torch.dtype) -> str:
    """The 16-bit format a profile casts to on a model of ``dtype`` (``precision: auto``):
    fp16 on an fp16 model, bf16 otherwise (an fp32 model is simulated as a bf16 deployment)."""
    return "fp16" if dtype == torch.float16 else "bf16"


def _check(value: object, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{value!r} is not one of {', '.join(allowed)}", key)


@dataclass(frozen=True)
class NumericsProfile:
    """One simulated hardware's numerics; the default changes nothing."""

    name: str = "custom"
    matmul: str = "fp32"  # "fp32" (plain nn.Linear) | "bf16_splitk"
    split_k_chunk: int = 128  # K per chunk of the 16-bit split-K accumulation
    rounding: str = "none"  # activations: "none" | "rne" | "truncate" | "stochastic"
    norm_cast: str = "model"  # RMSNorm: "model" | "before_weight" | "after_weight"
    act_dtype: str = "model"  # MLP activation (SiLU): "model" | "fp32" | "bf16"
    softmax_dtype: str = "model"  # attention softmax: "model" | "fp32" | "bf16"
    # the 16-bit format of every cast above: "auto" (the model's: fp16 on an fp16 model,
    # bf16 otherwise) | "bf16" | "fp16"
    precision: str = "auto"
    description: str = ""

    def __post_init__(self) -> None:
        _check(self.matmul, MATMUL_MODES, "matmul")
        _check(self.rounding, ACTIVATION_ROUNDING, "rounding")
        _check(self.norm_cast, NORM_CASTS, "norm_cast")
        _check(self.act_dtype, OP_DTYPES, "act_dtype")
        _check(self.softmax_dtype, OP_DTYPES, "softmax_dtype")
        _check(self.precision, PROFILE_PRECISIONS, "precision")
        if not isinstance(self.split_k_chunk, int) or self.split_k_chunk < 1:
            raise ConfigError(f"must be a positive integer, got {self.split_k_chunk!r}",
                              "split_k_chunk")

    @property
    def cast_rounding(self) -> str:
        """Rounding mode of the casts made by the matmul, norm and op knobs."""
        return "rne" if self.rounding == "none" else self.rounding

    def on(self, dtype: torch.dtype) -> NumericsProfile:
        """This profile as it runs on a model of ``dtype``: ``precision`` resolved (``auto``:
        ``precision_of(dtype)``). A 16-bit model of the other format is refused: its values
        would be rounded to a grid it cannot hold (bf16 casts on fp16 overflow past 65504,
        fp16 casts on bf16 lose what fp16 kept)."""
        wanted = precision_of(dtype)
        if self.precision == "auto":
            return dataclasses.replace(self, precision=wanted)
        if dtype in (torch.float16, torch.bfloat16) and self.precision != wanted:
            raise ConfigError(f"profile {self.name!r} casts to {self.precision}, but the model "
                              f"it runs on is {str(dtype).removeprefix('torch.')}: set "
                              f"precision to auto or {wanted}", "numerics.precision")
        return self

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
        description="16-bit deployment on fp32-accumulating tensor cores with fused fp32 "
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
        description="16-bit deployment with 16-bit split-K accumulation (chunks of 64), "
                    "RMSNorm cast before the gain multiply, SiLU and softmax computed in 16 "
                    "bits",
    ),
}
# npu-like, but every cast truncates (rounds toward zero), as some conversion paths do:
# a biased error that accumulates through the layers instead of averaging out. A stress case,
# not a claim about what any specific port did.
PROFILES["npu-naive"] = dataclasses.replace(
    PROFILES["npu-like"], name="npu-naive", rounding="truncate",
    description="npu-like with every cast truncated toward zero")


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
