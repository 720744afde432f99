"""One forward pass over prompt + response, shared by the trainer and the rollout engine,
so that identical weights give bit-identical log-probs on both sides."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import Tensor, nn

from aqn.token_math import entropy_from_logits, log_probs_from_logits


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class TokenLogProbs:
    log_probs: Tensor  # [B, T] log-prob of each response token
    entropy: Tensor | None  # [B, T] entropy of the next-token distribution


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_length: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> TokenLogProbs:
    """Log-probs (and entropy) of the last ``response_length`` tokens of ``input_ids``.

    ``input_ids`` is ``[B, P + T]``: left-padded prompts followed by right-padded responses.
    Logits are divided by ``temperature`` as the rollout sampled from them (verl does the same).
    ``entropy_grad=False`` computes the entropy outside autograd (for a metric): no graph.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), use_cache=False,
                logits_to_keep=response_length + 1)
    # logits at position i predict token i + 1; the last one predicts past the sequence
    logits = out.logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, -response_length:]
    log_probs = log_probs_from_logits(logits, labels)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return TokenLogProbs(log_probs, entropy)
