"""The engine protocol: what the trainer asks of a rollout engine, whatever runs it.

An engine holds its own copy of the policy (as vLLM does in verl and QeRL). After each
weight sync the registry's perturbations (``aqn.perturb``) are applied to that copy only;
the trainer's copy is never touched. ``HFEngine`` (``aqn.rollout.hf``) implements it with a
Hugging Face model; a vLLM engine implements the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from aqn.perturb import Perturbations


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    do_sample: bool = True  # False: greedy


@dataclass
class RolloutBatch:
    """``n`` consecutive rows per prompt; prompts left-padded, responses right-padded."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, T]
    response_mask: Tensor  # [B, T] 1 up to and including the stop token
    rollout_log_probs: Tensor  # [B, T] under the (perturbed) engine
    group_index: list[int]  # the prompt each row answers

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]


class Engine(Protocol):
    micro_batch_size: int
    perturbations: Perturbations

    def sync_weights(self, source: nn.Module) -> None:
        """Load the trainer's weights; perturbations take them as their new clean copy."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seed: int = 0,
                 progress: str | None = None, recompute_logprobs: bool = True
                 ) -> RolloutBatch:
        """``params.n`` completions of each prompt with the log-prob of every sampled token
        under the (perturbed) engine; ``recompute_logprobs=False`` keeps the decode ones."""

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        """Log-probs of the batch's responses under the engine, in one forward pass."""

    def recompute_is_exact(self, trainer: nn.Module) -> bool:
        """Whether ``logprobs`` would equal the trainer's own (``logprob_batch`` on
        ``trainer``) bit for bit right now; then the trainer skips it and reuses its own."""
