"""One forward pass over prompt + response, shared by the trainer and the rollout engine,
so that identical weights give bit-identical log-probs on both sides."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aqn.token_math import entropy_from_logits, log_probs_from_logits


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# Positions per LM-head chunk in a pass without gradients: the logits are computed a
# [batch, LOGIT_CHUNK, vocab] slice at a time, never [batch, length, vocab] (SmolLM2's vocab
# is 49,152: 12.6 MB per sequence of 64 tokens in fp32, against 3.1 MB per chunk).
LOGIT_CHUNK = 16


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
    Without gradients (``torch.no_grad``) the LM head runs in chunks of positions.
    """
    labels = input_ids[:, -response_length:]
    if not torch.is_grad_enabled() and _chunkable(model):
        return _chunked(model, input_ids, attention_mask, labels, temperature, with_entropy)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), use_cache=False,
                logits_to_keep=response_length + 1)
    # logits at position i predict token i + 1; the last one predicts past the sequence
    logits = out.logits[:, :-1, :]
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = log_probs_from_logits(logits, labels)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return TokenLogProbs(log_probs, entropy)


def _chunkable(model: nn.Module) -> bool:
    """A causal LM whose logits are ``lm_head(decoder output)``, nothing after (no softcap)."""
    config = getattr(model, "config", None)
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and not getattr(config, "final_logit_softcapping", None))


def _chunked(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
             temperature: float, with_entropy: bool) -> TokenLogProbs:
    """``response_logprobs`` without gradients, the LM head applied LOGIT_CHUNK positions
    at a time to the decoder's output (the same products, row by row, as the full head)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask),
                                 use_cache=False).last_hidden_state
    length = labels.shape[1]
    hidden = hidden[:, -(length + 1):-1]  # position i predicts token i + 1
    head = model.get_output_embeddings()
    log_probs, entropy = [], []
    for start in range(0, length, LOGIT_CHUNK):
        logits = head(hidden[:, start:start + LOGIT_CHUNK])
        if temperature != 1.0:
            logits = logits / temperature
        log_probs.append(log_probs_from_logits(logits, labels[:, start:start + LOGIT_CHUNK]))
        if with_entropy:
            entropy.append(entropy_from_logits(logits))
    return TokenLogProbs(torch.cat(log_probs, 1), torch.cat(entropy, 1) if with_entropy else None)
