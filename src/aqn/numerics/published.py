"""Published rollout-vs-training mismatch figures (docs/reference.md#published-mismatch-figures)
and a report against them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedMismatch:
    """A reported range of mean ``|logp_train - logp_rollout|`` per token."""

    low: float
    high: float
    setting: str


PUBLISHED_MISMATCH: dict[str, PublishedMismatch] = {
    "gpu": PublishedMismatch(0.011, 0.025, "GPU: vLLM rollout vs FSDP training"),
    "npu-naive": PublishedMismatch(0.075, 0.178, "Ascend 910B, naive weight conversion "
                                                 "(GRPO did not converge)"),
    "npu-fixed": PublishedMismatch(0.014, 0.039, "Ascend 910B after the fix"),
}


def compare_to_published(mean_abs_logp_diff: float) -> dict[str, str]:
    """For each published range: ``below``, ``within`` or ``above``."""
    out = {}
    for key, ref in PUBLISHED_MISMATCH.items():
        if mean_abs_logp_diff < ref.low:
            out[key] = "below"
        elif mean_abs_logp_diff > ref.high:
            out[key] = "above"
        else:
            out[key] = "within"
    return out


def mismatch_report(mean_abs_logp_diff: float, label: str = "measured",
                    max_abs_logp_diff: float | None = None, k3_kl: float | None = None,
                    num_tokens: int | None = None) -> str:
    """A short text report placing a measured mean ``|Δlogp|`` among the published ranges."""
    lines = [f"{label}: mean |logp_train - logp_rollout| = {mean_abs_logp_diff:.4g}"]
    extra = []
    if max_abs_logp_diff is not None:
        extra.append(f"max {max_abs_logp_diff:.4g}")
    if k3_kl is not None:
        extra.append(f"k3 KL {k3_kl:.3g}")
    if num_tokens is not None:
        extra.append(f"{num_tokens} tokens")
    if extra:
        lines[0] += f" ({', '.join(extra)})"
    lines.append("published (docs/reference.md#published-mismatch-figures), "
                 "mean |Δlogp| per token:")
    place = compare_to_published(mean_abs_logp_diff)
    width = max(len(r.setting) for r in PUBLISHED_MISMATCH.values())
    for key, ref in PUBLISHED_MISMATCH.items():
        ratio = mean_abs_logp_diff / ref.high if ref.high else float("inf")
        lines.append(f"  {ref.setting:<{width}}  {ref.low:.3f}-{ref.high:.3f}  -> "
                     f"{place[key]} ({ratio:.2g}x the upper end)")
    return "\n".join(lines)
