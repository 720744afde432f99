"""LoRA adapters through PEFT, as QeRL trains them (optionally with trainable RMSNorm gains)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from aqn.errors import ConfigError


def apply_lora(model: nn.Module, rank: int, alpha: float | None,
               target_modules: Sequence[str], trainable_norms: bool = False,
               dropout: float = 0.0) -> nn.Module:
    """``model`` with fresh adapters injected in place: only they (and the norms if asked)
    train. Returned is the model itself, not PEFT's wrapper, so that its forward signature
    (and so the engine's KV-cache calls) stays the model's own.

    The B matrices start at zero (PEFT's default), so the model computes exactly what the
    base does until the first update.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("LoRA needs the peft package: pip install 'aqn[lora]'",
                          "actor_rollout_ref.actor.lora.rank") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ConfigError(f"no Linear module named {', '.join(missing)} in the model; its "
                          f"Linear names are {', '.join(sorted(names))}",
                          "actor_rollout_ref.actor.lora.target_modules")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(target_modules), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if trainable_norms:
        for module in peft_model.modules():
            if "rmsnorm" in type(module).__name__.lower():
                module.requires_grad_(True)
    return peft_model.get_base_model()


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
