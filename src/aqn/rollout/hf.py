"""The Hugging Face rollout engine (the default, and the one every test runs).

It holds its own copy of the policy, perturbed after every weight sync (``aqn.rollout.base``).
Generation is a batched sampling loop with a KV cache that returns, for every sampled
token, its log-prob under the perturbed engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from aqn.perturb import Built
from aqn.progress import Progress
from aqn.rollout.base import Perturbations, RolloutBatch, SamplingParams
from aqn.rollout.forward import cache_kwarg, logprob_batch, position_ids
from aqn.token_math import log_probs_from_logits


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask logits outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def parameter_slots(model: nn.Module):
    """(path, module, attribute, parameter) of every parameter slot, a tied parameter in each
    of its slots; the caller may put another parameter in a slot while iterating."""
    for path, module in model.named_modules(remove_duplicate=False):
        for leaf, param in list(module._parameters.items()):
            if param is not None:
                yield f"{path}.{leaf}", module, leaf, param


class HFEngine:
    """The ``Engine`` protocol (``aqn.rollout.base``) on a Hugging Face causal LM."""

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        stop_token_ids: Sequence[int],
        perturbations: Sequence[Built] = (),
        log_prob_source: Literal["recompute", "decode"] = "recompute",
        micro_batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long,
                                           device=self.device)
        self.perturbations = Perturbations(perturbations)
        self.log_prob_source = log_prob_source
        self.micro_batch_size = micro_batch_size
        self._cache_kwarg = cache_kwarg(model)
        # the trainer's model whose tensors this one shares (link_weights), and the
        # (own tensor, trainer's tensor) pairs a sync copies then
        self._shared_with: nn.Module | None = None
        self._owned_pairs: list[tuple[Tensor, Tensor]] = []

    def link_weights(self, source: nn.Module) -> int:
        """Record that this engine's model shares ``source``'s tensors (``source``: the
        trainer's model, of which this one is a copy with the same module tree).

        Parameters that are its own tensors are the only ones ``sync_weights`` copies. One a
        perturbation writes must be its own: writing the trainer's tensor would leak the
        perturbation into training, so that is an error here. Returns the shared elements.
        """
        writes = self.perturbations.writes()
        theirs = {slot: param for slot, _, _, param in parameter_slots(source)}
        pairs, shared = {}, {}
        for slot, _, _, param in parameter_slots(self.model):
            if param is not theirs[slot]:
                pairs[id(param)] = (param, theirs[slot])
            elif id(param) in writes:
                raise RuntimeError(f"a rollout perturbation writes {slot}, a tensor the engine "
                                   "shares with the trainer: it would perturb training")
            else:
                shared[id(param)] = param.numel()
        self._owned_pairs, self._shared_with = list(pairs.values()), source
        return sum(shared.values())

    @torch.no_grad()
    def sync_weights(self, source: nn.Module) -> None:
        """Load the trainer's weights; perturbations take them as their new clean copy."""
        if self._shared_with is None:
            self.model.load_state_dict(source.state_dict())
        else:  # shared tensors are the trainer's already
            if source is not self._shared_with:
                raise ValueError("this engine shares its weights with another model; "
                                 "sync_weights must be given that model")
            for mine, theirs in self._owned_pairs:
                mine.copy_(theirs)
        self.perturbations.refresh()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: int = 0, progress: str | None = None, recompute_logprobs: bool = True
                 ) -> RolloutBatch:
        """``params.n`` completions of each prompt (token ids), sampled with a seeded RNG.

        ``progress``: a label to show a progress bar over the micro-batches.
        ``recompute_logprobs=False`` skips the recompute pass (log_prob_source=recompute),
        leaving the decode log-probs: for validation, and for an unperturbed engine whose
        recompute would equal the trainer's own log-probs bit for bit.
        """
        rows = [p for p in prompts for _ in range(params.n)]
        group_index = [i for i in range(len(prompts)) for _ in range(params.n)]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        starts = range(0, len(rows), self.micro_batch_size)
        parts = [self._generate_chunk(rows[i:i + self.micro_batch_size], params, gen)
                 for i in Progress(starts, progress or "", enabled=progress is not None
                                   and len(starts) >= 2, lines=0, unit="batch", leave=False)]
        width = max(p.response_length for p in parts)
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)

        def pad(t: Tensor, w: int, value, left: bool) -> Tensor:
            extra = t.new_full((t.shape[0], w - t.shape[1]), value)
            return torch.cat([extra, t] if left else [t, extra], dim=1)

        batch = RolloutBatch(
            prompt_ids=torch.cat([pad(p.prompt_ids, prompt_width, self.pad_token_id, True)
                                  for p in parts]),
            prompt_mask=torch.cat([pad(p.prompt_mask, prompt_width, 0, True) for p in parts]),
            response_ids=torch.cat([pad(p.response_ids, width, self.pad_token_id, False)
                                    for p in parts]),
            response_mask=torch.cat([pad(p.response_mask, width, 0.0, False) for p in parts]),
            rollout_log_probs=torch.cat([pad(p.rollout_log_probs, width, 0.0, False)
                                         for p in parts]),
            group_index=group_index,
        )
        if self.log_prob_source == "recompute" and recompute_logprobs:
            batch.rollout_log_probs = self.logprobs(batch, params.temperature)
        return batch

    def recompute_is_exact(self, trainer: nn.Module) -> bool:
        """Whether this engine's log-prob pass equals ``logprob_batch`` on ``trainer`` to the
        bit: it recomputes with that very function and micro-batching, and holds the
        trainer's weights (synced, nothing applied) in the trainer's dtypes."""
        return (self.log_prob_source == "recompute" and not self.perturbations.perturbed
                and [p.dtype for p in self.model.parameters()]
                == [p.dtype for p in trainer.parameters()])

    def logprobs(self, batch: RolloutBatch, temperature: float) -> Tensor:
        """Log-probs of the batch's responses under the engine, in one full forward pass."""
        return logprob_batch(self.model, batch, temperature, self.micro_batch_size).log_probs

    def _generate_chunk(self, prompts, params: SamplingParams, gen: torch.Generator
                        ) -> RolloutBatch:
        """One micro-batch of rows, as a batch of its own (its rows' groups: ``generate``'s)."""
        prompt_ids, prompt_mask = (t.to(self.device) for t in left_pad(prompts, self.pad_token_id))
        batch = prompt_ids.shape[0]
        cache = None
        attention = prompt_mask
        positions = position_ids(prompt_mask)
        inputs = prompt_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens, log_probs, masks = [], [], []
        for _ in range(params.max_new_tokens):
            out = self.model(input_ids=inputs, attention_mask=attention, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            cache = out[self._cache_kwarg]
            logits = out.logits[:, -1, :].float()
            if params.temperature != 1.0 and params.do_sample:
                logits = logits / params.temperature
            if params.do_sample:
                probs = filter_logits(logits, params.top_k, params.top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                token = logits.argmax(-1)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            log_probs.append(log_probs_from_logits(logits, token).masked_fill(finished, 0.0))
            masks.append((~finished).float())
            finished = finished | torch.isin(token, self.stop_token_ids)
            if finished.all():
                break
            inputs = token.unsqueeze(1)
            attention = torch.cat([attention, attention.new_ones((batch, 1))], 1)
            positions = positions[:, -1:] + 1
        return RolloutBatch(prompt_ids, prompt_mask, response_ids=torch.stack(tokens, 1),
                            response_mask=torch.stack(masks, 1),
                            rollout_log_probs=torch.stack(log_probs, 1), group_index=[])
