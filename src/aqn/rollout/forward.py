"""One forward pass over prompt + response, shared by the trainer and the rollout engine,
so that identical weights give bit-identical log-probs on both sides."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqn.token_math import entropy_from_logits, log_probs_from_logits

if TYPE_CHECKING:
    from aqn.rollout.base import RolloutBatch


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
    fused_head: bool = False,
) -> TokenLogProbs:
    """Log-probs (and entropy) of the last ``response_length`` tokens of ``input_ids``.

    ``input_ids`` is ``[B, P + T]``: left-padded prompts followed by right-padded responses.
    Logits are divided by ``temperature`` as the rollout sampled from them (verl does the same).
    ``entropy_grad=False`` computes the entropy outside autograd (for a metric): no graph.
    Without gradients (``torch.no_grad``) the LM head runs in chunks of positions; with
    them, ``fused_head`` does the same in a custom autograd function that recomputes the
    chunk's logits in the backward (off by default: measured slower on CPU, same peak at
    micro-batch 8; ``actor_rollout_ref.actor.fused_lm_head``).
    """
    labels = input_ids[:, -response_length:]
    if _chunkable(model):
        if not torch.is_grad_enabled():
            return _chunked(model, input_ids, attention_mask, labels, temperature, with_entropy)
        head = model.get_output_embeddings()
        if fused_head and _plain_linear(head) and not (with_entropy and entropy_grad):
            hidden = _decoder_output(model, input_ids, attention_mask, response_length)
            log_probs, entropy = _ChunkedHeadLogProbs.apply(hidden, head.weight, labels,
                                                            temperature, with_entropy)
            return TokenLogProbs(log_probs, entropy)
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


def _plain_linear(head: nn.Module) -> bool:
    """A bias-free nn.Linear computing exactly ``x W^T``: not LoRA-wrapped, its forward not
    replaced (numerics profiles patch it), no hooks. Only then may the fused head stand in."""
    return (type(head) is nn.Linear and head.bias is None and "forward" not in vars(head)
            and not head._forward_hooks and not head._forward_pre_hooks)


def _decoder_output(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    length: int) -> Tensor:
    """The decoder's (normed) output at the positions that predict the last ``length``
    tokens: position i predicts token i + 1."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids(attention_mask),
                                 use_cache=False).last_hidden_state
    return hidden[:, -(length + 1):-1]


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """Logits / temperature in fp32, rounded as the full-logits path rounds them."""
    if temperature != 1.0:
        logits = logits / temperature
    return logits.float()


def _chunk_by_chunk(logits_of, hidden: Tensor, labels: Tensor, with_entropy: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-probs at ``labels``, their logsumexp and (optionally) the entropy, with the fp32
    logits ``logits_of(hidden chunk)`` of LOGIT_CHUNK positions at a time."""
    log_probs, lse, entropy = [], [], []
    for start in range(0, labels.shape[1], LOGIT_CHUNK):
        sl = slice(start, start + LOGIT_CHUNK)
        logits = logits_of(hidden[:, sl])
        lse.append(torch.logsumexp(logits, dim=-1))
        picked = torch.gather(logits, -1, labels[:, sl].unsqueeze(-1)).squeeze(-1)
        log_probs.append(picked - lse[-1])  # log_probs_from_logits, keeping the logsumexp
        if with_entropy:
            entropy.append(entropy_from_logits(logits))
    return (torch.cat(log_probs, 1), torch.cat(lse, 1),
            torch.cat(entropy, 1) if with_entropy else None)


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """``log_softmax(h W^T / t)`` at the labels, LOGIT_CHUNK positions at a time in the
    forward and again in the backward, so autograd keeps no [batch, length, vocab] logits
    (the fused-head idea of TRL / Liger). The entropy it can return is a detached metric.
    The log-probs have the bits of the full-logits path; the gradient is the same sum in
    another order (tests/test_sampling.py)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, with_entropy):
        log_probs, lse, entropy = _chunk_by_chunk(
            lambda h: _scaled(F.linear(h, weight), temperature), hidden, labels, with_entropy)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature = temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, labels.shape[1], LOGIT_CHUNK):
            sl = slice(start, start + LOGIT_CHUNK)
            g = grad_log_probs[:, sl].float().unsqueeze(-1)
            probs = torch.exp(_scaled(F.linear(hidden[:, sl], weight), ctx.temperature)
                              - lse[:, sl].unsqueeze(-1))
            # d log p_label / d logits = onehot(label) - softmax, then through the / t
            grad_logits = (-probs * g).scatter_add_(-1, labels[:, sl].unsqueeze(-1), g)
            grad_logits = (grad_logits / ctx.temperature).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[:, sl] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.flatten(0, 1).T @ hidden[:, sl].flatten(0, 1)).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunked(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
             temperature: float, with_entropy: bool) -> TokenLogProbs:
    """``response_logprobs`` without gradients, the LM head applied LOGIT_CHUNK positions
    at a time to the decoder's output (the same products, row by row, as the full head)."""
    hidden = _decoder_output(model, input_ids, attention_mask, labels.shape[1])
    head = model.get_output_embeddings()  # called as a module: LoRA and patches apply
    log_probs, _, entropy = _chunk_by_chunk(lambda h: _scaled(head(h), temperature), hidden,
                                            labels, with_entropy)
    return TokenLogProbs(log_probs, entropy)


@torch.no_grad()
def logprob_batch(model: nn.Module, batch: RolloutBatch, temperature: float,
                  micro_batch_size: int, with_entropy: bool = False) -> TokenLogProbs:
    """Response log-probs (and entropy) of a rollout batch under ``model``, masked. The engine
    and the trainer both compute them here, in the same micro-batches, so copies with the
    same weights agree to the bit."""
    parts = []
    for i in range(0, batch.input_ids.shape[0], micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        parts.append(response_logprobs(model, batch.input_ids[sl], batch.attention_mask[sl],
                                     batch.response_length, temperature, with_entropy))
    log_probs = torch.cat([p.log_probs for p in parts]) * batch.response_mask
    entropy = torch.cat([p.entropy for p in parts]) if with_entropy else None
    return TokenLogProbs(log_probs, entropy)
