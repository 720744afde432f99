"""Which modules AQN perturbs.

A module is a target when one of ``class_patterns`` is in its lower-cased class name, so
Hugging Face's ``LlamaRMSNorm``/``Qwen2RMSNorm``/``Gemma3RMSNorm``, vLLM's ``RMSNorm`` and
user classes all match (QeRL's ``isinstance`` check against HF classes matched nothing in
vLLM's model). Per-head ``q_norm``/``k_norm`` are matched like any other norm. The
"final norm" is a matched norm whose path has no numeric part, i.e. one that sits outside
the numbered decoder layers (``model.norm``). Matching nothing is an error, never a no-op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from aqn.errors import NoTargetsError
from aqn.modules import path_matches


@dataclass(frozen=True)
class NormTarget:
    path: str
    class_name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    is_final: bool


def is_final_norm(path: str) -> bool:
    return not any(part.isdigit() for part in path.split("."))


def select_norms(
    model: nn.Module,
    class_patterns: Sequence[str] = ("rmsnorm",),
    target_modules: Sequence[str] = (),
    exclude_patterns: Sequence[str] = (),
    include_final_norm: bool = True,
) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs to perturb, in model order; raises when there are none."""
    patterns = [p.lower() for p in class_patterns]
    selected = []
    for path, module in model.named_modules():
        name = type(module).__name__.lower()
        if not any(p in name for p in patterns):
            continue
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue  # a norm without a learnable gain has nothing to perturb
        if target_modules and not any(path_matches(path, p) for p in target_modules):
            continue
        if any(path_matches(path, p) for p in exclude_patterns):
            continue
        if not include_final_norm and is_final_norm(path):
            continue
        selected.append((path, module))
    if not selected:
        raise NoTargetsError(_no_targets_message(model, class_patterns, target_modules,
                                                 exclude_patterns, include_final_norm))
    return selected


def _no_targets_message(model, class_patterns, target_modules, exclude_patterns,
                        include_final_norm) -> str:
    norm_like = Counter(type(m).__name__ for _, m in model.named_modules()
                        if "norm" in type(m).__name__.lower())
    have = (", ".join(f"{name} x{n}" for name, n in norm_like.items())
            if norm_like else "none (no class name contains 'norm')")
    return (
        f"AQN matched 0 modules in {type(model).__name__}, so the noise would do nothing. "
        f"class_patterns={list(class_patterns)}, target_modules={list(target_modules)}, "
        f"exclude_patterns={list(exclude_patterns)}, include_final_norm={include_final_norm}. "
        f"Norm-like classes in this model: {have}. Widen class_patterns "
        "(e.g. add 'layernorm') or fix the target/exclude patterns."
    )


def describe_targets(targets: Sequence[tuple[str, nn.Module]]) -> list[NormTarget]:
    return [
        NormTarget(
            path=path,
            class_name=type(m).__name__,
            shape=tuple(m.weight.shape),
            dtype=str(m.weight.dtype).removeprefix("torch."),
            numel=m.weight.numel(),
            is_final=is_final_norm(path),
        )
        for path, m in targets
    ]
