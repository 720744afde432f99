"""Builds what the GRPO recipe trains with: the policy (model + quantization + LoRA), its
reference copy, the rollout engine with its perturbations, and the optimizer.

The order is fixed because it consumes the seeded RNG (model init, then LoRA init) and
because the engine's copy is taken before the trainer-side perturbations are installed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from aqn.config import AQNConfig
from aqn.errors import ConfigError
from aqn.models import (
    cast_parameters,
    enable_activation_checkpointing,
    load_model,
    parse_dtype,
    stop_token_ids,
)
from aqn.models.lora import apply_lora, trainable_summary
from aqn.perturb import (
    Perturbations,
    build_load_perturbations,
    build_perturbations,
    check_engine_support,
    writes_linear_weights,
)
from aqn.quant import quantize_model
from aqn.rollout.hf import HFEngine, parameter_slots

if TYPE_CHECKING:
    from aqn.rollout.vllm import VLLMEngine

log = logging.getLogger(__name__)


@dataclass
class Policy:
    model: nn.Module  # the trainer's copy: never perturbed by the engine's perturbations
    tokenizer: object
    ref: nn.Module | None  # frozen reference for the KL loss (actor.use_kl_loss)
    # trainer-side perturbations (registry entries with side "actor"), installed by
    # build_engine once the engine's copy is taken
    perturbations: Perturbations = field(default_factory=Perturbations)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cuda was asked for but torch sees no GPU (is this the CPU build of "
                          "torch?)", "trainer.device")
    return torch.device(name)


def build_policy(cfg: AQNConfig, device: torch.device) -> Policy:
    """The trainer's model: loaded, quantized (QeRL), wrapped in LoRA adapters."""
    arr = cfg.actor_rollout_ref
    model, tokenizer = load_model(arr.model.path, dtype=arr.model.dtype, seed=cfg.trainer.seed)
    model.to(device)
    if arr.actor.quantization:  # QeRL: the base itself is quantized, adapters train
        report = quantize_model(model, arr.actor.quantization)
        log.info("policy quantized to %s:\n%s", arr.actor.quantization, report.table())
    lora = arr.actor.lora
    if lora.rank:
        model = apply_lora(model, lora.rank, lora.alpha, lora.target_modules,
                           lora.trainable_norms, lora.dropout)
    if arr.model.enable_gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = trainable_summary(model)
    log.info("policy: %d of %d parameters trainable", trainable, total)
    ref = None
    if arr.actor.use_kl_loss:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    return Policy(model, tokenizer, ref)


def build_engine(cfg: AQNConfig, policy: Policy) -> HFEngine | VLLMEngine:
    """The rollout engine on a copy of the policy, with the registry's perturbations; with
    ``rollout.share_weights`` only what a perturbation writes stays a copy. ``rollout.name``
    vllm: a vLLM engine holding its own weights, the perturbations built on its modules.

    Built from the frozen config before any rollout, so a perturbation that matches nothing
    fails now. The trainer-side perturbations are built on the policy after the copy was taken.
    """
    arr = cfg.actor_rollout_ref
    if arr.rollout.name == "vllm":
        return _build_vllm_engine(cfg, policy)
    # rollout.dtype set: every parameter cast to it (one the engine owns, each sync casts)
    dtype = parse_dtype(arr.rollout.dtype) if arr.rollout.dtype else None
    if arr.rollout.share_weights:
        engine_model = _sharing_copy(policy.model, own_linears=writes_linear_weights(cfg),
                                     dtype=dtype)
    else:
        engine_model = copy.deepcopy(policy.model)
        if dtype is not None:
            cast_parameters(engine_model, dtype)
    if dtype is not None:
        log.info("rollout engine in %s (trainer: %s)", arr.rollout.dtype, arr.model.dtype)
    perturbations = build_perturbations(engine_model, cfg)
    for spec, _ in perturbations:
        log.info("rollout perturbation %s", spec.name)
    policy.perturbations = Perturbations(build_perturbations(policy.model, cfg, side="actor"))
    for spec in policy.perturbations.specs:
        log.info("trainer perturbation %s", spec.name)
    engine = HFEngine(
        engine_model,
        pad_token_id=policy.tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids(policy.tokenizer, policy.model),
        perturbations=perturbations,
        log_prob_source=arr.rollout.log_prob_source,
        micro_batch_size=arr.rollout.micro_batch_size,
    )
    if arr.rollout.share_weights:
        shared = engine.link_weights(policy.model)  # and checks no perturbation writes those
        log.info("rollout engine shares %d parameter elements with the trainer", shared)
    return engine


def _build_vllm_engine(cfg: AQNConfig, policy: Policy) -> VLLMEngine:
    from aqn.rollout.vllm import VLLMEngine

    check_engine_support(cfg)  # what it cannot carry must not be left out silently
    rollout = cfg.actor_rollout_ref.rollout
    engine = VLLMEngine(
        policy.model,
        pad_token_id=policy.tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids(policy.tokenizer, policy.model),
        # built in vLLM's worker on its own modules (its RMSNorm class): the seed's zero-match
        # bug fails here
        noise=cfg.trainer.noise_injection,
        # vLLM packs its Linear weights at load: those are perturbed in each sync's stream,
        # selected on the trainer's model (with its module names)
        load_perturbations=build_load_perturbations(policy.model, cfg),
        dtype=rollout.dtype,  # null: the trainer's parameter dtype
        log_prob_source=rollout.log_prob_source,
        micro_batch_size=rollout.micro_batch_size,
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        seed=cfg.trainer.seed,
        enforce_eager=rollout.enforce_eager,
        enable_prefix_caching=rollout.enable_prefix_caching,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        cpu_kv_cache_space_gib=rollout.cpu_kv_cache_space_gib,
    )
    for spec in engine.perturbations.specs:
        log.info("rollout perturbation %s on vLLM's modules", spec.name)
    # as with hf: the trainer-side ones go on the policy after the engine's copy was taken
    policy.perturbations = Perturbations(build_perturbations(policy.model, cfg, side="actor"))
    return engine


def _sharing_copy(model: nn.Module, own_linears: bool, dtype: torch.dtype | None = None
                  ) -> nn.Module:
    """A copy of ``model`` whose parameters are ``model``'s own tensors, except those a
    perturbation may write, which get their own: every parameter of fewer than 2 dims (the
    norm gains AQN perturbs, biases: a tiny share) and, for a quantized rollout, the Linear
    weights; with ``dtype`` (rollout.dtype) also every floating parameter of another dtype,
    cast to it (a sync copies into it, casting). Copying no more keeps one model in memory;
    ``HFEngine.link_weights`` checks afterwards that every parameter a perturbation writes is
    an own one."""
    memo = {id(p): p for p in model.parameters()}  # deepcopy keeps these as they are
    engine_model = copy.deepcopy(model, memo)
    own: dict[int, nn.Parameter] = {}  # by the shared tensor's id, so tied weights stay tied
    for _, module, leaf, param in parameter_slots(engine_model):
        recast = dtype is not None and param.is_floating_point() and param.dtype != dtype
        if recast or param.dim() < 2 or (own_linears and isinstance(module, nn.Linear)
                                         and leaf == "weight"):
            if id(param) not in own:
                data = param.detach().to(dtype) if recast else param.detach().clone()
                own[id(param)] = nn.Parameter(data, requires_grad=False)
            module._parameters[leaf] = own[id(param)]
    return engine_model


def build_optimizer(cfg: AQNConfig, model: nn.Module) -> torch.optim.AdamW:
    optim = cfg.actor_rollout_ref.actor.optim
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)
