"""A quantized KV cache: the keys and values attention reads, rounded as vLLM stores them with
``kv_cache_dtype=fp8`` (a common source of rollout-vs-training mismatch: the trainer's
attention reads full-precision K and V).

A forward hook replaces the output of every key and value projection (``k_proj`` /
``v_proj``: the K and V a cache would hold) by its float8_e4m3fn rounding with vLLM's default
unit scale (``k_scale = v_scale = 1.0``), saturating at +-448. vLLM rounds the keys after the
rotary embedding, this before it: a rotation, so the error has the same size, not the same
bits (docs/experiments.md, "An FP8 KV cache"). The rounding is per element
(no scale computed over the batch), so it does not depend on how tokens are batched; the
newest token's K and V are rounded too, as by an engine that writes the cache before attention
reads it. The hooks count their calls (``aqn.firing``).
"""

from __future__ import annotations

from torch import Tensor, nn

from aqn.errors import NoTargetsError
from aqn.firing import HookedPerturbation
from aqn.quant.formats import round_e4m3

KV_PROJECTIONS = ("k_proj", "v_proj")  # Llama, Qwen2, Mistral, SmolLM2 (HF module names)
KV_CACHE_DTYPES = ("auto", "fp8")  # vLLM's names; auto: the model's dtype, no rounding


class KVCacheQuantizer(HookedPerturbation):
    """Keys and values rounded to FP8 (E4M3, unit scale) as the engine's attention reads them."""

    name = "kv_cache"

    def __init__(self, model: nn.Module, dtype: str = "fp8") -> None:
        if dtype != "fp8":
            raise ValueError(f"KV cache dtype {dtype!r} is not simulated; known: fp8")
        super().__init__()
        self._modules = {path: m for path, m in model.named_modules()
                         if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in KV_PROJECTIONS}
        if not self._modules:
            raise NoTargetsError(f"KV cache quantization: no Linear module named "
                                 f"{' or '.join(KV_PROJECTIONS)} (the attention's K and V)")

    def apply(self, step: int) -> dict[str, float]:
        """Hook every K and V projection (once) and start counting the calls of ``step``."""
        self.start(step, lambda: [m.register_forward_hook(self._hook(path))
                                  for path, m in self._modules.items()])
        return {"kv_cache/num_modules": float(len(self._modules))}

    def _hook(self, path: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            q = round_e4m3(out.detach()).to(out.dtype)
            self.last.count_call(path, out.numel(), (q != out.detach()).sum())
            return q
        return hook

    def touches(self) -> list[str]:
        return list(self._modules)
